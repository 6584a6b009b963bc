//! One pool of worker threads for every kernel, text and embeddings alike.
//!
//! A job is a number of tasks and a closure; the calling thread runs tasks too, and the
//! workers take the next task index from one atomic counter, so uneven tasks balance
//! themselves. Between jobs the workers spin for a short while (a decode step issues
//! hundreds of jobs a few microseconds apart) and then sleep on a condition variable, so
//! an idle server costs nothing. One job runs at a time: callers on other threads wait
//! their turn, which is what two engines sharing two cores should do.
//!
//! No rayon and no candle thread pool is involved: handing work to a pool from outside it
//! cost about 14 µs per call on this machine, more than many of the products take.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The closure of the job in progress, its lifetime erased (see [`Pool::run`]).
type Task = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped once per job; a worker runs a job when it sees a new value.
    epoch: AtomicU64,
    /// The job's closure; valid while `busy` > 0 for the current epoch.
    task: Mutex<Option<&'static Task>>,
    next: AtomicUsize,
    tasks: AtomicUsize,
    /// Workers still inside the current job.
    busy: AtomicUsize,
    panicked: AtomicBool,
    /// Workers asleep on `wake`.
    sleeping: Mutex<usize>,
    wake: Condvar,
}

/// A pool of worker threads; see the module documentation.
pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time.
    submit: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &(self.workers + 1))
            .finish()
    }
}

/// How long a worker spins for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(200);

/// The environment variable that sets the number of threads (callers included).
pub const THREADS_VARIABLE: &str = "WARDEN_THREADS";

impl Pool {
    /// The process's pool: as many threads as the machine has cores (or
    /// [`THREADS_VARIABLE`]), the calling thread counted as one.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads = std::env::var(THREADS_VARIABLE)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|&n| (1..=256).contains(&n))
                .unwrap_or(cores);
            Pool::new(threads)
        })
    }

    /// A pool of `threads` threads, the caller of [`Pool::run`] counted as one.
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            task: Mutex::new(None),
            next: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: Mutex::new(0),
            wake: Condvar::new(),
        });
        let workers = threads.saturating_sub(1);
        for i in 0..workers {
            let theirs = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("warden-kernel-{}", i + 1))
                .spawn(move || worker(&theirs));
            if spawned.is_err() {
                // Fewer workers only means less parallelism; the caller runs every task.
                return Pool {
                    shared,
                    workers: i,
                    submit: Mutex::new(()),
                };
            }
        }
        Pool {
            shared,
            workers,
            submit: Mutex::new(()),
        }
    }

    /// Threads that run a job, the caller included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Run `f(0)`, …, `f(tasks - 1)` on the pool and the calling thread, and return when
    /// all have run. A panic in a task is raised again here, after every thread has left
    /// the job.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if tasks == 1 || self.workers == 0 {
            (0..tasks).for_each(f);
            return;
        }
        let _turn = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: the closure is borrowed for this call only, and no worker can reach it
        // after this call returns: it is cleared below only once `busy` is back to zero,
        // and a worker increments nothing and reads `task` only for the epoch bumped here,
        // after `busy` was set. Erasing the lifetime is what lets persistent threads run a
        // borrowed closure, as scoped threads do.
        #[allow(unsafe_code)]
        let task: &'static Task =
            unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync + '_), &'static Task>(f) };
        *s.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        s.next.store(0, Ordering::Relaxed);
        s.tasks.store(tasks, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.busy.store(self.workers, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        {
            let sleeping = s.sleeping.lock().unwrap_or_else(|e| e.into_inner());
            if *sleeping > 0 {
                s.wake.notify_all();
            }
        }
        run_tasks(s, task);
        let mut spins = 0u32;
        while s.busy.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *s.task.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if s.panicked.load(Ordering::Relaxed) {
            std::panic::resume_unwind(Box::new("a kernel task panicked"));
        }
    }

    /// Split `0..n` into about `threads × 4` contiguous ranges of whole multiples of
    /// `grain` and run `f` on each.
    pub fn for_ranges(&self, n: usize, grain: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        let grain = grain.max(1);
        let units = n.div_ceil(grain);
        let chunks = (self.threads() * 4).min(units).max(1);
        let per = units.div_ceil(chunks);
        let count = units.div_ceil(per);
        self.run(count, &|c| {
            let start = c * per * grain;
            let end = ((c + 1) * per * grain).min(n);
            if start < end {
                f(start..end);
            }
        });
    }
}

impl Pool {
    /// Run `f(i, chunk)` for every `chunk`-long piece of `data` (the last may be shorter),
    /// each piece handed to exactly one task: parallel work on disjoint outputs without
    /// locks.
    pub fn for_each_chunk<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: &(dyn Fn(usize, &mut [T]) + Sync),
    ) {
        let chunk = chunk.max(1);
        let len = data.len();
        let base = ChunkPtr(data.as_mut_ptr());
        self.run(len.div_ceil(chunk), &|i| {
            let start = i * chunk;
            let n = chunk.min(len - start);
            // SAFETY: `run` calls each index in 0..len/chunk exactly once, so the pieces
            // `start..start + n` are disjoint and within `data`, which this call borrows
            // mutably until every task has ended.
            #[allow(unsafe_code)]
            let piece = unsafe { std::slice::from_raw_parts_mut(base.at(start), n) };
            f(i, piece);
        });
    }
}

/// The base of a slice split among tasks by [`Pool::for_each_chunk`].
struct ChunkPtr<T>(*mut T);
// SAFETY: tasks reach only their own disjoint piece through it (see `for_each_chunk`).
#[allow(unsafe_code)]
unsafe impl<T: Send> Sync for ChunkPtr<T> {}

impl<T> ChunkPtr<T> {
    fn at(&self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

fn run_tasks(s: &Shared, f: &Task) {
    let tasks = s.tasks.load(Ordering::Relaxed);
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= tasks {
            return;
        }
        if std::panic::catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
    }
}

fn worker(s: &Shared) {
    let mut seen = 0u64;
    loop {
        // Wait for a new job: spin briefly, then sleep.
        let started = Instant::now();
        let mut epoch = s.epoch.load(Ordering::Acquire);
        while epoch == seen && started.elapsed() < SPIN {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            epoch = s.epoch.load(Ordering::Acquire);
        }
        if epoch == seen {
            let mut sleeping = s.sleeping.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                epoch = s.epoch.load(Ordering::Acquire);
                if epoch != seen {
                    break;
                }
                *sleeping += 1;
                sleeping = s.wake.wait(sleeping).unwrap_or_else(|e| e.into_inner());
                *sleeping -= 1;
            }
        }
        seen = epoch;
        let task = *s.task.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(task) = task {
            run_tasks(s, task);
        }
        s.busy.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_whatever_the_pool() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads);
            for tasks in [0, 1, 2, 7, 100] {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
            let covered: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
            pool.for_ranges(1000, 16, &|r| {
                assert!(r.start % 16 == 0);
                for i in r {
                    covered[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(covered.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn chunks_are_handed_out_once_each() {
        let pool = Pool::new(2);
        let mut data = vec![0usize; 103];
        pool.for_each_chunk(&mut data, 10, &|i, piece| {
            assert!(piece.len() == 10 || (i == 10 && piece.len() == 3));
            for v in piece {
                *v += i + 1;
            }
        });
        assert!(data.iter().enumerate().all(|(j, &v)| v == j / 10 + 1));
    }

    #[test]
    fn a_panicking_task_is_raised_to_the_caller_and_the_pool_goes_on() {
        let pool = Pool::new(2);
        let caught = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|i| assert!(i != 5, "task 5"));
        }));
        assert!(caught.is_err());
        let n = AtomicUsize::new(0);
        pool.run(8, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn callers_on_several_threads_take_turns() {
        let pool = Arc::new(Pool::new(2));
        let total = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        pool.run(5, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 5);
    }
}
