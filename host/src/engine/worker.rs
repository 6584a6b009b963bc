//! The engine thread: a bounded queue in, oneshot replies out, batching across requests.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{EmbedInput, Embedder, Embedding, EngineError, QueueObserver, Unobserved, Vocabulary};

/// Queue and batching settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Requests that may wait; one more is refused with [`EngineError::QueueFull`].
    pub queue_capacity: usize,
    /// Most texts in one forward pass.
    pub max_batch: usize,
    /// A request that waited longer than this for the engine fails with
    /// [`EngineError::QueueTimeout`] instead of running.
    pub queue_timeout: Duration,
    /// Hears about the queue.
    pub observer: Arc<dyn QueueObserver>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 64,
            max_batch: 32,
            queue_timeout: Duration::from_secs(30),
            observer: Arc::new(Unobserved),
        }
    }
}

struct Job {
    inputs: Vec<EmbedInput>,
    reply: oneshot::Sender<Result<Vec<Embedding>, EngineError>>,
    span: tracing::Span,
    queued: Instant,
}

/// A cheap, cloneable handle to an embedding model's thread.
#[derive(Clone)]
pub struct EmbeddingsHandle {
    id: std::sync::Arc<str>,
    dimensions: usize,
    vocabulary: Option<Arc<dyn Vocabulary>>,
    tx: SyncSender<Job>,
    observer: Arc<dyn QueueObserver>,
}

impl std::fmt::Debug for EmbeddingsHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddingsHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl EmbeddingsHandle {
    /// Start the engine thread for `model`.
    pub fn spawn(id: &str, model: impl Embedder, config: WorkerConfig) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(config.queue_capacity.max(1));
        let dimensions = model.dimensions();
        let vocabulary = model.vocabulary();
        let observer = config.observer.clone();
        let queue = Queue {
            model: id.to_string(),
            observer: config.observer.clone(),
            timeout: config.queue_timeout,
        };
        std::thread::Builder::new()
            .name(format!("engine-{id}"))
            .spawn(move || run(model, rx, config.max_batch.max(1), queue))?;
        Ok(Self {
            id: id.into(),
            dimensions,
            vocabulary,
            tx,
            observer,
        })
    }

    /// The model id clients use.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Vector dimensions.
    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// The model's token ids, if it takes them as input.
    pub fn vocabulary(&self) -> Option<&dyn Vocabulary> {
        self.vocabulary.as_deref()
    }

    /// Embed `inputs`; waits for the engine thread without blocking the caller's thread.
    pub async fn embed(&self, inputs: Vec<EmbedInput>) -> Result<Vec<Embedding>, EngineError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            inputs,
            reply,
            span: tracing::Span::current(),
            queued: Instant::now(),
        };
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => EngineError::QueueFull,
            TrySendError::Disconnected(_) => EngineError::Stopped,
        })?;
        self.observer.depth(&self.id, 1);
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}

/// What the engine thread needs to know about its queue.
struct Queue {
    model: String,
    observer: Arc<dyn QueueObserver>,
    timeout: Duration,
}

/// A request the engine thread has taken, with its progress.
struct Active {
    job: Job,
    /// The next input not yet in a pass.
    next: usize,
    results: Vec<Option<Embedding>>,
    failed: Option<EngineError>,
}

impl Active {
    fn done(&self) -> bool {
        self.failed.is_some() || self.results.iter().all(Option::is_some)
    }

    fn waiting(&self) -> bool {
        self.failed.is_none() && self.next < self.job.inputs.len()
    }
}

/// The scheduling policy: each forward pass holds at most `max_batch` inputs, shared
/// round-robin among the requests the thread has taken, oldest first, one input each per
/// turn; requests that arrived while a pass ran join before the next one is formed. A
/// request therefore waits for at most the pass in progress before its first input runs,
/// however large the requests ahead of it, and a large request is split over as many
/// passes as it needs, interleaved with the others. Each request is answered as soon as
/// its last input is done.
fn run(mut model: impl Embedder, rx: Receiver<Job>, max_batch: usize, queue: Queue) {
    let mut active: Vec<Active> = Vec::new();
    loop {
        if active.is_empty() {
            match rx.recv() {
                Ok(job) => admit(&mut active, job, &queue),
                Err(_) => return,
            }
        }
        while let Ok(job) = rx.try_recv() {
            admit(&mut active, job, &queue);
        }
        // A client that went away no longer needs its answer.
        active.retain(|a| !a.job.reply.is_closed());
        let pass = form_pass(&mut active, max_batch);
        if !pass.is_empty() {
            run_pass(&mut model, &mut active, &pass);
        }
        let (done, rest): (Vec<Active>, Vec<Active>) = active.into_iter().partition(Active::done);
        active = rest;
        for a in done {
            let result = match a.failed {
                Some(e) => Err(e),
                None => Ok(a.results.into_iter().flatten().collect()),
            };
            let _ = a.job.reply.send(result);
        }
    }
}

/// Take `job` from the queue: one that waited too long gets a timeout rather than a late
/// answer.
fn admit(active: &mut Vec<Active>, job: Job, queue: &Queue) {
    queue.observer.depth(&queue.model, -1);
    queue.observer.waited(&queue.model, job.queued.elapsed());
    if job.queued.elapsed() > queue.timeout {
        let _ = job.reply.send(Err(EngineError::QueueTimeout));
        return;
    }
    {
        let _enter = job.span.enter();
        tracing::debug!(
            inputs = job.inputs.len(),
            queued_ms = job.queued.elapsed().as_secs_f64() * 1e3,
            "engine.embed"
        );
    }
    let n = job.inputs.len();
    active.push(Active {
        job,
        next: 0,
        results: vec![None; n],
        failed: None,
    });
}

/// The next pass: (request, input) pairs, round-robin over the waiting requests.
fn form_pass(active: &mut [Active], max_batch: usize) -> Vec<(usize, usize)> {
    let mut pass = Vec::with_capacity(max_batch);
    while pass.len() < max_batch && active.iter().any(Active::waiting) {
        for (r, a) in active.iter_mut().enumerate() {
            if pass.len() == max_batch {
                break;
            }
            if a.waiting() {
                pass.push((r, a.next));
                a.next += 1;
            }
        }
    }
    pass
}

/// Run one pass; a failure or a panic fails only the requests with inputs in it.
fn run_pass(model: &mut impl Embedder, active: &mut [Active], pass: &[(usize, usize)]) {
    let inputs: Vec<&EmbedInput> = pass
        .iter()
        .map(|&(r, i)| &active[r].job.inputs[i])
        .collect();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| model.embed(&inputs)))
        .unwrap_or_else(|_| Err(EngineError::Model("the model panicked".into())));
    match result {
        Ok(embeddings) if embeddings.len() == pass.len() => {
            for (&(r, i), e) in pass.iter().zip(embeddings) {
                active[r].results[i] = Some(e);
            }
        }
        Ok(_) => {
            for &(r, _) in pass {
                active[r].failed = Some(EngineError::Model("wrong number of outputs".into()));
            }
        }
        Err(e) => {
            for &(r, _) in pass {
                active[r].failed = Some(e.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Embeds a text as `[len]`; fails on "boom", panics on "panic". Records every pass,
    /// and takes `pause` over each.
    #[derive(Default)]
    struct Fake {
        passes: Arc<std::sync::Mutex<Vec<Vec<String>>>>,
        pause: Duration,
    }

    fn text(input: &EmbedInput) -> &str {
        match input {
            EmbedInput::Text(t) => t,
            EmbedInput::Tokens(_) => "tokens",
        }
    }

    impl Embedder for Fake {
        fn embed(&mut self, inputs: &[&EmbedInput]) -> Result<Vec<Embedding>, EngineError> {
            let texts: Vec<&str> = inputs.iter().map(|i| text(i)).collect();
            self.passes
                .lock()
                .unwrap()
                .push(texts.iter().map(|t| t.to_string()).collect());
            std::thread::sleep(self.pause);
            if texts.contains(&"panic") {
                panic!("fake panic");
            }
            if texts.contains(&"boom") {
                return Err(EngineError::Model("boom".into()));
            }
            Ok(texts
                .iter()
                .map(|t| Embedding {
                    vector: vec![t.len() as f32],
                    tokens: t.len(),
                })
                .collect())
        }
        fn dimensions(&self) -> usize {
            1
        }
    }

    fn strings(v: &[&str]) -> Vec<EmbedInput> {
        v.iter().map(|s| EmbedInput::Text(s.to_string())).collect()
    }

    fn config(max_batch: usize) -> WorkerConfig {
        WorkerConfig {
            queue_capacity: 8,
            max_batch,
            ..WorkerConfig::default()
        }
    }

    #[tokio::test]
    async fn requests_share_passes_round_robin() {
        let fake = Fake {
            pause: Duration::from_millis(30),
            ..Fake::default()
        };
        let passes = fake.passes.clone();
        let h = EmbeddingsHandle::spawn("fake", fake, config(4)).unwrap();
        // The first request occupies the thread; the next two arrive together while it
        // runs, and share the following passes one input each per turn.
        let first = tokio::spawn({
            let h = h.clone();
            async move { h.embed(strings(&["x"])).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        let a = h.embed(strings(&["a1", "a2", "a3", "a4", "a5"]));
        let b = h.embed(strings(&["b1", "b2", "b3"]));
        let (a, b) = tokio::join!(a, b);
        first.await.unwrap().unwrap();
        assert_eq!(a.unwrap().len(), 5);
        assert_eq!(b.unwrap().len(), 3);
        let passes = passes.lock().unwrap().clone();
        assert_eq!(
            passes,
            [
                vec!["x"],
                vec!["a1", "b1", "a2", "b2"],
                vec!["a3", "b3", "a4", "a5"],
            ]
        );
    }

    #[tokio::test]
    async fn a_small_request_waits_at_most_one_pass_behind_a_large_one() {
        let fake = Fake {
            pause: Duration::from_millis(20),
            ..Fake::default()
        };
        let passes = fake.passes.clone();
        let h = EmbeddingsHandle::spawn("fake", fake, config(4)).unwrap();
        let big: Vec<String> = (0..40).map(|i| format!("big{i}")).collect();
        let big: Vec<&str> = big.iter().map(String::as_str).collect();
        let large = tokio::spawn({
            let h = h.clone();
            let inputs = strings(&big);
            async move { h.embed(inputs).await }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let small = h.embed(strings(&["small"])).await.unwrap();
        assert_eq!(small.len(), 1);
        let done_at = passes.lock().unwrap().len();
        let large = large.await.unwrap().unwrap();
        assert_eq!(large.len(), 40);
        let lens: Vec<f32> = large.iter().map(|e| e.vector[0]).collect();
        let want: Vec<f32> = big.iter().map(|t| t.len() as f32).collect();
        assert_eq!(lens, want, "the large request's vectors in order");
        let passes = passes.lock().unwrap().clone();
        // The small input ran in the pass after the one in progress when it arrived,
        // long before the large request's ten passes were over.
        let at = passes
            .iter()
            .position(|p| p.contains(&"small".to_string()))
            .unwrap();
        assert!(at <= 3, "the small input ran in pass {at}: {passes:?}");
        assert!(
            done_at <= at + 2,
            "answered {} passes after its own",
            done_at - at - 1
        );
        assert_eq!(passes.len(), 11);
    }

    #[tokio::test]
    async fn keeps_order_across_passes() {
        let h = EmbeddingsHandle::spawn("fake", Fake::default(), config(2)).unwrap();
        let out = h
            .embed(strings(&["ccc", "a", "bb", "dddd", ""]))
            .await
            .unwrap();
        let lens: Vec<f32> = out.iter().map(|e| e.vector[0]).collect();
        assert_eq!(lens, [3.0, 1.0, 2.0, 4.0, 0.0]);
    }

    #[tokio::test]
    async fn a_failure_or_panic_fails_the_request_not_the_engine() {
        let h = EmbeddingsHandle::spawn("fake", Fake::default(), config(8)).unwrap();
        assert!(matches!(
            h.embed(strings(&["boom"])).await,
            Err(EngineError::Model(_))
        ));
        assert!(matches!(
            h.embed(strings(&["panic"])).await,
            Err(EngineError::Model(_))
        ));
        assert_eq!(h.embed(strings(&["ok"])).await.unwrap().len(), 1);
    }

    #[test]
    fn a_full_queue_is_refused() {
        let (tx, _rx) = sync_channel(1);
        let h = EmbeddingsHandle {
            id: "x".into(),
            dimensions: 1,
            vocabulary: None,
            tx,
            observer: Arc::new(Unobserved),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Nobody drains the queue: the first job waits, the second is refused at once.
        rt.block_on(async {
            let first = tokio::spawn({
                let h = h.clone();
                async move { h.embed(strings(&["a"])).await }
            });
            tokio::task::yield_now().await;
            assert_eq!(h.embed(strings(&["b"])).await, Err(EngineError::QueueFull));
            first.abort();
        });
    }
}
