//! Text generation on a dedicated engine thread.
//!
//! Requests wait in a bounded queue ([`GenerateHandle::submit`] refuses at once when it is
//! full). The thread keeps up to `max_active` sequences in flight and advances them all
//! one step per round, so a long answer does not hold up a short one: a new sequence's
//! prompt runs alone, a chunk per round (prefill), and every sequence past its prompt gets
//! its next token from one batched forward pass (decode), which reads the weights once for
//! all of them. Every sequence owns its state ([`Sequence`]: tokens, KV cache, sampler, text
//! decoder) and no operation mixes rows of a batch, so an answer is the same bits whatever
//! runs beside it.
//!
//! Each sequence reports on its own unbounded channel: text deltas, then one final event.
//! A closed channel (the client went away) ends the sequence at its next step.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use candle_transformers::generation::{LogitsProcessor, Sampling};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::decoder::{SeqCache, TextWeights};
use super::gguf_tokenizer::GgufTokenizer;
use super::text_state::TextState;
use super::{EngineError, QueueObserver, Unobserved};

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f64,
    /// Seed of the sampler's random numbers.
    pub seed: u64,
    /// OpenAI presence penalty: subtracted once from every token already generated.
    pub presence_penalty: f32,
    /// OpenAI frequency penalty: subtracted per occurrence of a generated token.
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            seed: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// One generation request.
#[derive(Debug)]
pub struct GenerateRequest {
    /// Prompt token ids (validated against the context window by the caller).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Sampling.
    pub sampling: SamplingParams,
    /// Stop strings: generation ends before the first occurrence, which is not returned.
    pub stop: Vec<String>,
    /// Whose kept caches this request may use, and whom its own cache is kept for: a
    /// cache is reused only within one scope (a tenant, or a principal), so no client can
    /// learn from the time to its first token what another client's prompts began with.
    pub cache_scope: String,
    /// The request's span, so engine work is traced under it.
    pub span: tracing::Span,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl FinishReason {
    /// OpenAI's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What a sequence reports.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// The engine took the request from its queue; prefill begins. Always the first event
    /// unless the request timed out in the queue.
    Started,
    /// More text. Deltas concatenate to the whole answer.
    Delta(String),
    /// The end.
    Done {
        /// Why.
        reason: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Of those, the tokens whose keys and values came from an earlier sequence's cache
        /// (a shared prefix) instead of being computed again.
        cached_tokens: usize,
        /// Generated tokens (an end-of-generation token counts; the stop text's tokens too).
        completion_tokens: usize,
    },
    /// The engine failed on this sequence. The last event.
    Failed(EngineError),
}

/// Settings of the generation thread.
#[derive(Debug, Clone)]
pub struct GenerateConfig {
    /// Requests that may wait for a place; more are refused.
    pub queue_capacity: usize,
    /// Sequences advanced together.
    pub max_active: usize,
    /// A request that waited longer than this for a place fails with
    /// [`EngineError::QueueTimeout`] instead of starting.
    pub queue_timeout: Duration,
    /// Hears about the queue.
    pub observer: Arc<dyn QueueObserver>,
    /// Positions of finished sequences' caches kept for reuse: a prompt that starts with
    /// what one of them holds (the next turn of a conversation, the same system prompt)
    /// feeds only the rest. 0 keeps none.
    pub prefix_cache_tokens: usize,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            max_active: 4,
            queue_timeout: Duration::from_secs(30),
            prefix_cache_tokens: 0,
            observer: Arc::new(Unobserved),
        }
    }
}

/// What the engine thread runs: a decoder's forward passes over per-sequence caches. The
/// text model's weights implement it; a test can put a scripted model in their place and
/// drive the scheduler (queue, rounds, batching, cancellation, stops) without one.
pub trait Forward: Send + Sync + 'static {
    /// One sequence's cache.
    type Cache: Send + 'static;
    /// The context window, in tokens.
    fn context_length(&self) -> usize;
    /// A new, empty cache.
    fn new_cache(&self) -> Self::Cache;
    /// Positions `cache` holds.
    fn cached(cache: &Self::Cache) -> usize;
    /// Keep the first `len` positions of `cache`.
    fn truncate(cache: &mut Self::Cache, len: usize) -> candle_core::Result<()>;
    /// Logits of the last of `tokens`, fed after what `cache` holds.
    fn forward(&self, tokens: &[u32], cache: &mut Self::Cache) -> candle_core::Result<Vec<f32>>;
    /// One decoding step of several sequences at once: one token each.
    fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Self::Cache],
    ) -> candle_core::Result<Vec<Vec<f32>>>;
}

impl Forward for TextWeights {
    type Cache = SeqCache;

    fn context_length(&self) -> usize {
        self.config().context_length
    }

    fn new_cache(&self) -> SeqCache {
        TextWeights::new_cache(self)
    }

    fn cached(cache: &SeqCache) -> usize {
        cache.len()
    }

    fn truncate(cache: &mut SeqCache, len: usize) -> candle_core::Result<()> {
        cache.truncate(len)
    }

    fn forward(&self, tokens: &[u32], cache: &mut SeqCache) -> candle_core::Result<Vec<f32>> {
        TextWeights::forward(self, tokens, cache)
    }

    fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SeqCache],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        TextWeights::forward_batch(self, tokens, caches)
    }
}

/// Most prompt tokens one sequence feeds per round. Prefill runs near full speed at this
/// size (about 1 s of work on two cores), and other sequences wait at most one chunk.
pub const PREFILL_CHUNK: usize = 256;

struct Job {
    request: GenerateRequest,
    events: UnboundedSender<GenerateEvent>,
    queued: Instant,
}

/// Live counters of a generation thread.
#[derive(Debug, Default)]
pub struct GenerateStats {
    /// Sequences being generated now.
    pub active: AtomicUsize,
    /// Tokens generated since start (prompt tokens not included).
    pub generated_tokens: AtomicU64,
    /// Sequences ended early because their client went away.
    pub cancelled: AtomicU64,
    /// Prompt tokens taken from kept caches instead of computed.
    pub reused_tokens: AtomicU64,
    /// Test hook: this many coming steps fail as if the model had failed.
    inject_failures: AtomicUsize,
}

/// A cloneable handle to a text model's engine thread.
#[derive(Clone)]
pub struct GenerateHandle {
    tx: SyncSender<Job>,
    name: Arc<str>,
    observer: Arc<dyn QueueObserver>,
    tokenizer: Arc<GgufTokenizer>,
    context_length: usize,
    stats: Arc<GenerateStats>,
}

impl std::fmt::Debug for GenerateHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerateHandle")
            .field("context_length", &self.context_length)
            .finish_non_exhaustive()
    }
}

impl GenerateHandle {
    /// Start the engine thread.
    pub fn spawn<F: Forward>(
        name: &str,
        weights: Arc<F>,
        tokenizer: Arc<GgufTokenizer>,
        config: GenerateConfig,
    ) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(config.queue_capacity.max(1));
        let context_length = weights.context_length();
        let stats = Arc::new(GenerateStats::default());
        let engine = Engine {
            weights,
            tokenizer: tokenizer.clone(),
            max_active: config.max_active.max(1),
            queue_timeout: config.queue_timeout,
            observer: config.observer.clone(),
            model: name.to_string(),
            stats: stats.clone(),
            kept: std::cell::RefCell::new(Kept::new(config.prefix_cache_tokens)),
        };
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || engine.run(rx))?;
        Ok(Self {
            tx,
            name: name.into(),
            observer: config.observer,
            tokenizer,
            context_length,
            stats,
        })
    }

    /// The thread's live counters.
    pub fn stats(&self) -> &GenerateStats {
        &self.stats
    }

    /// Fault injection for tests: make the next `n` engine steps fail, through the same path
    /// as a real model failure.
    #[doc(hidden)]
    pub fn inject_failures(&self, n: usize) {
        self.stats.inject_failures.store(n, Ordering::SeqCst);
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Arc<GgufTokenizer> {
        &self.tokenizer
    }

    /// The model's context window, in tokens.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Queue a request. Events arrive on the returned channel; dropping it cancels.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<UnboundedReceiver<GenerateEvent>, EngineError> {
        let (events, rx) = unbounded_channel();
        let job = Job {
            request,
            events,
            queued: Instant::now(),
        };
        match self.tx.try_send(job) {
            Ok(()) => {
                self.observer.depth(&self.name, 1);
                Ok(rx)
            }
            Err(TrySendError::Full(_)) => Err(EngineError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(EngineError::Stopped),
        }
    }
}

/// Everything one sequence owns.
struct Sequence<C> {
    job: Job,
    cache: C,
    sampler: LogitsProcessor,
    generated: Vec<u32>,
    /// Next tokens to feed: the prompt first, then each sampled token.
    pending: Vec<u32>,
    text: TextState,
    span: tracing::Span,
    /// Its last event was sent.
    ended: bool,
    /// Its cache is not to be trusted (a pass failed on it).
    failed: bool,
    /// Prompt tokens that came with its cache.
    reused: usize,
}

/// Caches of finished sequences, with the tokens each holds, oldest first, up to a total
/// of `budget` positions.
struct Kept<C> {
    /// Scope, tokens, cache.
    entries: std::collections::VecDeque<(String, Vec<u32>, C)>,
    held: usize,
    budget: usize,
}

impl<C> Kept<C> {
    fn new(budget: usize) -> Self {
        Self {
            entries: std::collections::VecDeque::new(),
            held: 0,
            budget,
        }
    }

    /// Keep `cache`, which holds `tokens`, for `scope`; the oldest go to make room.
    fn keep(&mut self, scope: &str, tokens: Vec<u32>, cache: C) {
        if tokens.is_empty() || tokens.len() > self.budget {
            return;
        }
        self.held += tokens.len();
        self.entries.push_back((scope.to_string(), tokens, cache));
        while self.held > self.budget {
            match self.entries.pop_front() {
                Some((_, t, _)) => self.held -= t.len(),
                None => break,
            }
        }
    }

    /// The cache kept for `scope` sharing the longest prefix with `prompt`, taken out, and
    /// the length of that prefix, at most all of `prompt` but its last token (whose logits
    /// the sequence needs).
    fn take(&mut self, scope: &str, prompt: &[u32]) -> Option<(C, usize)> {
        let usable = prompt.len().saturating_sub(1);
        let (best, shared) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, (kept_for, _, _))| kept_for == scope)
            .map(|(i, (_, tokens, _))| {
                let shared = tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, shared.min(usable))
            })
            .max_by_key(|&(i, shared)| (shared, i))?;
        if shared == 0 {
            return None;
        }
        let (_, tokens, cache) = self.entries.remove(best)?;
        self.held -= tokens.len();
        Some((cache, shared))
    }
}

struct Engine<F: Forward> {
    weights: Arc<F>,
    tokenizer: Arc<GgufTokenizer>,
    max_active: usize,
    queue_timeout: Duration,
    observer: Arc<dyn QueueObserver>,
    model: String,
    stats: Arc<GenerateStats>,
    /// Caches kept for reuse; only the engine thread touches them.
    kept: std::cell::RefCell<Kept<F::Cache>>,
}

impl<F: Forward> Engine<F> {
    /// Start `job` unless it waited too long (then it fails with a timeout).
    fn admit(&self, job: Job, active: &mut Vec<Sequence<F::Cache>>) {
        self.observer.depth(&self.model, -1);
        self.observer.waited(&self.model, job.queued.elapsed());
        if job.queued.elapsed() > self.queue_timeout {
            let _ = job
                .events
                .send(GenerateEvent::Failed(EngineError::QueueTimeout));
            return;
        }
        let _ = job.events.send(GenerateEvent::Started);
        active.push(self.start(job));
    }

    fn run(self, rx: Receiver<Job>) {
        let mut active: Vec<Sequence<F::Cache>> = Vec::new();
        loop {
            if active.is_empty() {
                match rx.recv() {
                    Ok(job) => self.admit(job, &mut active),
                    Err(_) => return,
                }
            }
            self.stats.active.store(active.len(), Ordering::Relaxed);
            while active.len() < self.max_active {
                match rx.try_recv() {
                    Ok(job) => self.admit(job, &mut active),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if active.is_empty() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.step_all(&mut active);
            self.stats.active.store(active.len(), Ordering::Relaxed);
        }
    }

    fn start(&self, job: Job) -> Sequence<F::Cache> {
        let s = job.request.sampling;
        let sampling = if s.temperature <= 0.0 {
            Sampling::ArgMax
        } else if s.top_p < 1.0 {
            Sampling::TopP {
                p: s.top_p,
                temperature: s.temperature,
            }
        } else {
            Sampling::All {
                temperature: s.temperature,
            }
        };
        let prompt = &job.request.prompt;
        let reused = self
            .kept
            .borrow_mut()
            .take(&job.request.cache_scope, prompt)
            .and_then(|(mut cache, shared)| {
                F::truncate(&mut cache, shared).ok()?;
                Some((cache, shared))
            });
        let (cache, reused) = reused.unwrap_or_else(|| (self.weights.new_cache(), 0));
        self.stats
            .reused_tokens
            .fetch_add(reused as u64, Ordering::Relaxed);
        let span = tracing::debug_span!(parent: &job.request.span, "engine.generate",
            queue_wait_ms = job.queued.elapsed().as_millis() as u64, reused);
        Sequence {
            cache,
            sampler: LogitsProcessor::from_sampling(s.seed, sampling),
            generated: Vec::new(),
            pending: prompt[reused..].to_vec(),
            text: TextState::new(job.request.stop.clone()),
            job,
            span,
            ended: false,
            failed: false,
            reused,
        }
    }

    /// Take the ended sequences out of `active`, keeping the caches of those that did not
    /// fail for a later prompt that starts the same way.
    fn retire(&self, active: &mut Vec<Sequence<F::Cache>>) {
        let mut kept = self.kept.borrow_mut();
        let mut i = 0;
        while i < active.len() {
            if !active[i].ended {
                i += 1;
                continue;
            }
            let seq = active.swap_remove(i);
            if seq.failed || kept.budget == 0 {
                continue;
            }
            let held = F::cached(&seq.cache);
            let tokens: Vec<u32> = seq
                .job
                .request
                .prompt
                .iter()
                .chain(&seq.generated)
                .take(held)
                .copied()
                .collect();
            if tokens.len() == held {
                kept.keep(&seq.job.request.cache_scope, tokens, seq.cache);
            }
        }
    }

    /// One step of every active sequence; ended ones leave `active`. A sequence with a
    /// prompt to feed runs alone (prefill, at most [`PREFILL_CHUNK`] tokens per round); all
    /// sequences with one token to feed run in one batched forward pass (decode), which
    /// reads the weights once for all of them.
    fn step_all(&self, active: &mut Vec<Sequence<F::Cache>>) {
        for seq in active.iter_mut() {
            seq.ended = !self.prepare(seq);
        }
        self.retire(active);
        type Refs<'a, C> = Vec<&'a mut Sequence<C>>;
        let (mut batch, mut alone): (Refs<'_, F::Cache>, Refs<'_, F::Cache>) =
            active.iter_mut().partition(|seq| seq.pending.len() == 1);
        if batch.len() == 1 {
            alone.append(&mut batch);
        }
        for seq in alone {
            // A long prompt runs a chunk per round, so the other sequences' next tokens wait
            // for one chunk, not for the whole prompt.
            let n = seq.pending.len().min(PREFILL_CHUNK);
            let logits = guarded(|| self.weights.forward(&seq.pending[..n], &mut seq.cache));
            match logits {
                Ok(_) if n < seq.pending.len() => {
                    seq.pending.drain(..n);
                }
                logits => self.conclude(seq, logits),
            }
        }
        if !batch.is_empty() {
            let tokens: Vec<u32> = batch.iter().map(|seq| seq.pending[0]).collect();
            let rows = guarded(|| {
                let mut caches: Vec<&mut F::Cache> =
                    batch.iter_mut().map(|seq| &mut seq.cache).collect();
                self.weights.forward_batch(&tokens, &mut caches)
            });
            match rows {
                Ok(rows) => {
                    for (seq, logits) in batch.into_iter().zip(rows) {
                        self.conclude(seq, Ok(logits));
                    }
                }
                // The pass failed for all of them.
                Err(e) => {
                    for seq in batch {
                        self.conclude(seq, Err(e.clone()));
                    }
                }
            }
        }
        self.retire(active);
    }

    /// Before the model runs: whether `seq` still wants a step. A sequence whose client went
    /// away, that asks for no tokens, or that meets an injected fault ends here.
    fn prepare(&self, seq: &mut Sequence<F::Cache>) -> bool {
        if seq.job.events.is_closed() {
            tracing::debug!(parent: &seq.span, "client gone; generation stopped");
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let request = &seq.job.request;
        if request.max_tokens == 0 {
            let _ = seq.job.events.send(GenerateEvent::Done {
                reason: FinishReason::Length,
                prompt_tokens: request.prompt.len(),
                cached_tokens: seq.reused,
                completion_tokens: 0,
            });
            return false;
        }
        let injected =
            self.stats
                .inject_failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if injected.is_ok() {
            let e = EngineError::Model("injected fault".into());
            let _ = seq.job.events.send(GenerateEvent::Failed(e));
            return false;
        }
        true
    }

    /// After the model ran: sample from `logits` and report, or report the failure. Marks
    /// `seq` ended when it is.
    fn conclude(&self, seq: &mut Sequence<F::Cache>, logits: Result<Vec<f32>, EngineError>) {
        let span = seq.span.clone();
        let _enter = span.enter();
        let outcome = logits.and_then(|logits| {
            std::panic::catch_unwind(AssertUnwindSafe(|| self.sample(seq, logits)))
                .unwrap_or_else(|_| Err(panicked()))
        });
        let end = match outcome {
            Ok(None) => return,
            Ok(Some(event)) => event,
            Err(e) => {
                seq.failed = true;
                GenerateEvent::Failed(e)
            }
        };
        let _ = seq.job.events.send(end);
        seq.ended = true;
    }

    /// Pick the next token from `logits`, report its text. `Some(event)` ends the sequence.
    fn sample(
        &self,
        seq: &mut Sequence<F::Cache>,
        mut logits: Vec<f32>,
    ) -> Result<Option<GenerateEvent>, EngineError> {
        let request = &seq.job.request;
        apply_penalties(&mut logits, &seq.generated, &request.sampling);
        let logits_t = candle_core::Tensor::new(logits.as_slice(), &candle_core::Device::Cpu)?;
        let next = seq.sampler.sample(&logits_t)?;
        seq.generated.push(next);
        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
        seq.pending.clear();
        seq.pending.push(next);

        let finished = if self.tokenizer.is_stop(next) {
            Some(FinishReason::Stop)
        } else {
            let piece = seq
                .text
                .push(&self.tokenizer, &seq.generated)
                .map_err(|e| EngineError::Model(e.to_string()))?;
            if let Some(delta) = piece.delta
                && !delta.is_empty()
            {
                let _ = seq.job.events.send(GenerateEvent::Delta(delta));
            }
            if piece.stopped {
                Some(FinishReason::Stop)
            } else if seq.generated.len() >= request.max_tokens
                || F::cached(&seq.cache) >= self.weights.context_length()
            {
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        let Some(reason) = finished else {
            return Ok(None);
        };
        // The answer's tokens, without the end-of-turn token that ended it.
        let answer =
            &seq.generated[..seq.generated.len() - usize::from(self.tokenizer.is_stop(next))];
        if let Some(rest) = seq
            .text
            .finish(&self.tokenizer, answer)
            .map_err(|e| EngineError::Model(e.to_string()))?
        {
            let _ = seq.job.events.send(GenerateEvent::Delta(rest));
        }
        Ok(Some(GenerateEvent::Done {
            reason,
            prompt_tokens: request.prompt.len(),
            cached_tokens: seq.reused,
            completion_tokens: seq.generated.len(),
        }))
    }
}

/// Run the model, turning a panic into an error so one sequence's fault cannot stop the
/// engine thread.
fn guarded<T>(f: impl FnOnce() -> candle_core::Result<T>) -> Result<T, EngineError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(EngineError::from),
        Err(_) => Err(panicked()),
    }
}

fn panicked() -> EngineError {
    EngineError::Model("the model panicked".into())
}

/// OpenAI's presence and frequency penalties, over the tokens generated so far.
fn apply_penalties(logits: &mut [f32], generated: &[u32], s: &SamplingParams) {
    if s.presence_penalty == 0.0 && s.frequency_penalty == 0.0 {
        return;
    }
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in generated {
        *counts.entry(t).or_default() += 1;
    }
    for (t, n) in counts {
        if let Some(l) = logits.get_mut(t as usize) {
            *l -= s.presence_penalty + s.frequency_penalty * n as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// The id of `<|im_end|>` in [`GgufTokenizer::one_token_per_byte`].
    const END: u32 = 256;

    /// A scripted model over the byte tokenizer: after `a` comes `b`, … after `z` the end of
    /// the turn; after `!` it panics; after anything else, `a`. It records every batch size,
    /// and every pass waits while a test holds `gate`.
    #[derive(Default)]
    struct Counting {
        batches: Mutex<Vec<usize>>,
        gate: Mutex<()>,
    }

    impl Counting {
        fn logits(last: u32) -> Vec<f32> {
            let next = match u8::try_from(last) {
                Ok(b @ b'a'..=b'y') => u32::from(b + 1),
                Ok(b'z') => END,
                Ok(b'!') => panic!("scripted panic"),
                _ => u32::from(b'a'),
            };
            let mut logits = vec![0.0; END as usize + 1];
            logits[next as usize] = 1.0;
            logits
        }
    }

    impl Forward for Counting {
        type Cache = usize;

        fn context_length(&self) -> usize {
            64
        }

        fn new_cache(&self) -> usize {
            0
        }

        fn cached(cache: &usize) -> usize {
            *cache
        }

        fn truncate(cache: &mut usize, len: usize) -> candle_core::Result<()> {
            *cache = (*cache).min(len);
            Ok(())
        }

        fn forward(&self, tokens: &[u32], cache: &mut usize) -> candle_core::Result<Vec<f32>> {
            drop(self.gate.lock());
            *cache += tokens.len();
            Ok(Self::logits(*tokens.last().expect("a token")))
        }

        fn forward_batch(
            &self,
            tokens: &[u32],
            caches: &mut [&mut usize],
        ) -> candle_core::Result<Vec<Vec<f32>>> {
            drop(self.gate.lock());
            self.batches.lock().unwrap().push(tokens.len());
            for c in caches.iter_mut() {
                **c += 1;
            }
            Ok(tokens.iter().map(|&t| Self::logits(t)).collect())
        }
    }

    fn engine(model: Arc<Counting>, config: GenerateConfig) -> GenerateHandle {
        let tokenizer = Arc::new(GgufTokenizer::one_token_per_byte());
        GenerateHandle::spawn("counting", model, tokenizer, config).expect("engine thread")
    }

    fn request(prompt: &str, max_tokens: usize, stop: &[&str]) -> GenerateRequest {
        GenerateRequest {
            prompt: prompt.bytes().map(u32::from).collect(),
            max_tokens,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: stop.iter().map(|s| s.to_string()).collect(),
            span: tracing::Span::none(),
            cache_scope: "tenant:a".into(),
        }
    }

    /// Every event to the last: the text, and the last event.
    fn answer(mut events: UnboundedReceiver<GenerateEvent>) -> (String, GenerateEvent) {
        let mut text = String::new();
        loop {
            match events.blocking_recv().expect("a last event") {
                GenerateEvent::Started => {}
                GenerateEvent::Delta(t) => text.push_str(&t),
                last => return (text, last),
            }
        }
    }

    fn done(reason: FinishReason, prompt_tokens: usize, completion_tokens: usize) -> GenerateEvent {
        GenerateEvent::Done {
            reason,
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens,
        }
    }

    #[test]
    fn a_prompt_that_starts_as_a_finished_sequence_did_reuses_its_cache() {
        let config = GenerateConfig {
            prefix_cache_tokens: 64,
            ..GenerateConfig::default()
        };
        let handle = engine(Arc::default(), config);
        let run = |r| answer(handle.submit(r).expect("queued"));
        // "ab" then "c", "d", "e": the cache holds what was fed, "abcd" (not the last "e").
        assert_eq!(
            run(request("ab", 3, &[])),
            ("cde".into(), done(FinishReason::Length, 2, 3))
        );
        // The next turn starts with all of it: only "x" is computed.
        assert_eq!(
            run(request("abcdx", 5, &[])),
            (
                "yz".into(),
                GenerateEvent::Done {
                    reason: FinishReason::Stop,
                    prompt_tokens: 5,
                    cached_tokens: 4,
                    completion_tokens: 3,
                }
            )
        );
        // A prompt that parts earlier takes the shared part only; a prompt all kept has its
        // last token computed all the same, for its logits.
        let cached = |r| match run(r) {
            (_, GenerateEvent::Done { cached_tokens, .. }) => cached_tokens,
            (_, last) => panic!("{last:?}"),
        };
        assert_eq!(cached(request("abcdx", 2, &[])), 4);
        assert_eq!(cached(request("abq", 1, &[])), 2);
        // Nothing in common: nothing reused.
        assert_eq!(cached(request("zz", 1, &[])), 0);
        // Another tenant's prompt, the same tokens: never another scope's cache.
        let other = GenerateRequest {
            cache_scope: "tenant:b".into(),
            ..request("abq", 1, &[])
        };
        assert_eq!(cached(other), 0);
        assert_eq!(handle.stats().reused_tokens.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn kept_caches_stay_within_their_budget_and_the_oldest_go_first() {
        let mut kept = Kept::new(10);
        kept.keep("a", vec![1, 2, 3, 4], 4usize);
        kept.keep("a", vec![5, 6, 7, 8], 4);
        assert_eq!(kept.held, 8);
        kept.keep("a", vec![9, 10, 11], 3);
        // 11 > 10: the oldest went.
        assert_eq!(kept.held, 7);
        assert!(kept.take("a", &[1, 2, 3, 4, 5]).is_none());
        assert!(kept.take("b", &[5, 6, 0]).is_none());
        assert_eq!(kept.take("a", &[5, 6, 0]), Some((4, 2)));
        assert_eq!(kept.held, 3);
        // Larger than the whole budget: not kept.
        kept.keep("a", (0..11).collect(), 11);
        assert_eq!(kept.held, 3);
    }

    #[test]
    fn a_sequence_runs_to_its_end_token_its_length_or_its_stop_string() {
        let handle = engine(Arc::default(), GenerateConfig::default());
        let run = |r| answer(handle.submit(r).expect("queued"));
        // The end-of-turn token counts as generated but is not text.
        assert_eq!(
            run(request("w", 10, &[])),
            ("xyz".into(), done(FinishReason::Stop, 1, 4))
        );
        assert_eq!(
            run(request("a", 3, &[])),
            ("bcd".into(), done(FinishReason::Length, 1, 3))
        );
        // The stop string's tokens are generated, its text is not returned.
        assert_eq!(
            run(request("a", 10, &["de"])),
            ("bc".into(), done(FinishReason::Stop, 1, 4))
        );
        assert_eq!(
            run(request("a", 0, &[])),
            (String::new(), done(FinishReason::Length, 1, 0))
        );
        // A long prompt runs in chunks; the window ends the answer.
        let long = "q".repeat(PREFILL_CHUNK + 40);
        let (_, last) = run(request(&long, 1000, &[]));
        assert!(matches!(last, GenerateEvent::Done { .. }), "{last:?}");
    }

    #[test]
    fn sequences_run_together_in_batches_of_at_most_max_active() {
        let model = Arc::new(Counting::default());
        let config = GenerateConfig {
            max_active: 3,
            ..GenerateConfig::default()
        };
        let handle = engine(model.clone(), config);
        let prompts = ["a", "b", "c", "d", "e", "f", "g"];
        // Everything is queued before the first pass ends, however loaded the machine.
        let gate = model.gate.lock().unwrap();
        let pending: Vec<_> = prompts
            .iter()
            .map(|p| handle.submit(request(p, 5, &[])).expect("queued"))
            .collect();
        drop(gate);
        for (prompt, events) in prompts.iter().zip(pending) {
            let first = prompt.as_bytes()[0];
            let expected: String = (1..=5).map(|i| char::from(first + i)).collect();
            assert_eq!(answer(events), (expected, done(FinishReason::Length, 1, 5)));
        }
        let batches = model.batches.lock().unwrap().clone();
        assert!(batches.iter().all(|&n| (2..=3).contains(&n)), "{batches:?}");
        assert!(batches.contains(&3), "no batch of three: {batches:?}");
        // The gauge is stored after the pass that sent the last events: it returns to zero
        // right after, not before the client reads them.
        let waited = std::time::Instant::now();
        while handle.stats().active.load(Ordering::Relaxed) != 0
            && waited.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(handle.stats().active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_client_that_goes_away_stops_its_sequence_and_a_panic_fails_only_its_own() {
        let model = Arc::new(Counting::default());
        let handle = engine(model.clone(), GenerateConfig::default());
        // The client leaves while its first pass waits: the sequence cannot end first.
        let gate = model.gate.lock().unwrap();
        let mut events = handle.submit(request("a", 50, &[])).expect("queued");
        assert!(matches!(
            events.blocking_recv(),
            Some(GenerateEvent::Started)
        ));
        drop(events);
        drop(gate);
        let started = Instant::now();
        while handle.stats().cancelled.load(Ordering::Relaxed) == 0 {
            assert!(started.elapsed() < Duration::from_secs(10), "not cancelled");
            std::thread::sleep(Duration::from_millis(1));
        }

        let (_, last) = answer(handle.submit(request("!", 5, &[])).expect("queued"));
        assert_eq!(
            last,
            GenerateEvent::Failed(EngineError::Model("the model panicked".into()))
        );
        assert_eq!(
            answer(handle.submit(request("x", 5, &[])).expect("queued")),
            ("yz".into(), done(FinishReason::Stop, 1, 3))
        );
    }

    #[test]
    fn a_request_that_waited_past_the_queue_timeout_does_not_start() {
        let config = GenerateConfig {
            queue_timeout: Duration::ZERO,
            ..GenerateConfig::default()
        };
        let handle = engine(Arc::default(), config);
        let (text, last) = answer(handle.submit(request("a", 5, &[])).expect("queued"));
        assert_eq!(
            (text.as_str(), last),
            ("", GenerateEvent::Failed(EngineError::QueueTimeout))
        );
    }
}
