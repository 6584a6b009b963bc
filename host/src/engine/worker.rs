//! The engine thread: a bounded queue in, oneshot replies out, batching across requests.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Embedder, Embedding, EngineError, QueueObserver, Unobserved};

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
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Embedding>, EngineError>>,
    span: tracing::Span,
    queued: Instant,
}

/// A cheap, cloneable handle to an embedding model's thread.
#[derive(Clone)]
pub struct EmbeddingsHandle {
    id: std::sync::Arc<str>,
    dimensions: usize,
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

    /// Embed `texts`; waits for the engine thread without blocking the caller's thread.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedding>, EngineError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            texts,
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

/// Take one job, then whatever else is already waiting (up to a few batches' worth), so
/// concurrent requests share forward passes.
/// What the engine thread needs to know about its queue.
struct Queue {
    model: String,
    observer: Arc<dyn QueueObserver>,
    timeout: Duration,
}

fn run(mut model: impl Embedder, rx: Receiver<Job>, max_batch: usize, queue: Queue) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let mut texts: usize = jobs[0].texts.len();
        while texts < max_batch * 4 {
            match rx.try_recv() {
                Ok(job) => {
                    texts += job.texts.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        // A client that went away no longer needs its answer; one that waited too long gets
        // a timeout rather than a late answer.
        for job in &jobs {
            queue.observer.depth(&queue.model, -1);
            queue.observer.waited(&queue.model, job.queued.elapsed());
        }
        jobs.retain(|j| !j.reply.is_closed());
        let (late, on_time): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| j.queued.elapsed() > queue.timeout);
        for job in late {
            let _ = job.reply.send(Err(EngineError::QueueTimeout));
        }
        let jobs = on_time;
        if jobs.is_empty() {
            continue;
        }
        let results = batch(&mut model, &jobs, max_batch);
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// Run the texts of all `jobs`, sorted by length so each forward pass pads little, in
/// passes of at most `max_batch`; a failing pass fails only the jobs with texts in it.
fn batch(
    model: &mut impl Embedder,
    jobs: &[Job],
    max_batch: usize,
) -> Vec<Result<Vec<Embedding>, EngineError>> {
    let mut order: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.texts.len()).map(move |t| (j, t)))
        .collect();
    order.sort_by_key(|&(j, t)| jobs[j].texts[t].len());
    let mut out: Vec<Result<Vec<Option<Embedding>>, EngineError>> =
        jobs.iter().map(|j| Ok(vec![None; j.texts.len()])).collect();
    for job in jobs {
        let _enter = job.span.enter();
        tracing::debug!(
            texts = job.texts.len(),
            queued_ms = job.queued.elapsed().as_secs_f64() * 1e3,
            "engine.embed"
        );
    }
    for pass in order.chunks(max_batch) {
        let texts: Vec<&str> = pass
            .iter()
            .map(|&(j, t)| jobs[j].texts[t].as_str())
            .collect();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| model.embed(&texts)))
            .unwrap_or_else(|_| Err(EngineError::Model("the model panicked".into())));
        match result {
            Ok(embeddings) if embeddings.len() == pass.len() => {
                for (&(j, t), e) in pass.iter().zip(embeddings) {
                    if let Ok(slots) = &mut out[j] {
                        slots[t] = Some(e);
                    }
                }
            }
            Ok(_) => fail(
                &mut out,
                pass,
                EngineError::Model("wrong number of outputs".into()),
            ),
            Err(e) => fail(&mut out, pass, e),
        }
    }
    out.into_iter()
        .map(|r| {
            r.and_then(|slots| {
                slots
                    .into_iter()
                    .map(|s| s.ok_or_else(|| EngineError::Model("missing output".into())))
                    .collect()
            })
        })
        .collect()
}

fn fail(
    out: &mut [Result<Vec<Option<Embedding>>, EngineError>],
    pass: &[(usize, usize)],
    e: EngineError,
) {
    for &(j, _) in pass {
        out[j] = Err(e.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Embeds a text as `[len]`; fails on "boom", panics on "panic".
    struct Fake;

    impl Embedder for Fake {
        fn embed(&mut self, texts: &[&str]) -> Result<Vec<Embedding>, EngineError> {
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
        fn token_counts(&self, texts: &[&str]) -> Result<Vec<usize>, EngineError> {
            Ok(texts.iter().map(|t| t.len()).collect())
        }
        fn dimensions(&self) -> usize {
            1
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn keeps_order_across_sorted_batches() {
        let h = EmbeddingsHandle::spawn(
            "fake",
            Fake,
            WorkerConfig {
                queue_capacity: 4,
                max_batch: 2,
                ..WorkerConfig::default()
            },
        )
        .unwrap();
        let out = h
            .embed(strings(&["ccc", "a", "bb", "dddd", ""]))
            .await
            .unwrap();
        let lens: Vec<f32> = out.iter().map(|e| e.vector[0]).collect();
        assert_eq!(lens, [3.0, 1.0, 2.0, 4.0, 0.0]);
    }

    #[tokio::test]
    async fn a_failure_or_panic_fails_the_request_not_the_engine() {
        let h = EmbeddingsHandle::spawn(
            "fake",
            Fake,
            WorkerConfig {
                queue_capacity: 4,
                max_batch: 8,
                ..WorkerConfig::default()
            },
        )
        .unwrap();
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
