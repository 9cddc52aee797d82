//! A small fork-join pool for the decode kernels, tuned for latency rather than throughput.
//!
//! Decoding one token calls ~200 matrix-vector products of 50-500 µs each, with torch work in
//! between. rayon's workers fall asleep in those gaps and take tens of µs to wake, which costs as
//! much as the product itself. Here the calling thread takes a share of the work, and the helper
//! threads spin for a short while after each job (a decode loop keeps them spinning), then park.
//!
//! One job runs at a time; a caller that finds the pool busy (another Python thread decoding) runs
//! its job alone on its own thread.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(3);

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job; helpers watch it.
    epoch: AtomicUsize,
    /// True while a job's parts may still be claimed.
    active: AtomicBool,
    /// Points at the caller's `Task` (a fat reference on its stack) while `active`.
    task: AtomicPtr<()>,
    parts: AtomicUsize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// Helpers between seeing a job and letting go of it.
    inside: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    submit: Mutex<()>,
    helpers: usize,
    /// The process that started the helpers: a forked child has none of them.
    pid: u32,
}

impl Shared {
    /// Claim and run parts until none is left.
    fn work(&self, task: Task<'_>) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.parts.load(SeqCst) {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| task(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(1, SeqCst);
        }
    }

    fn helper(&self) {
        let mut seen = self.epoch.load(SeqCst);
        loop {
            let start = Instant::now();
            let mut spins = 0u32;
            while self.epoch.load(SeqCst) == seen {
                std::hint::spin_loop();
                spins = spins.wrapping_add(1);
                if spins % 1024 == 0 && start.elapsed() > SPIN {
                    let mut guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                    self.sleepers.fetch_add(1, SeqCst);
                    while self.epoch.load(SeqCst) == seen {
                        guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                    }
                    self.sleepers.fetch_sub(1, SeqCst);
                }
            }
            seen = self.epoch.load(SeqCst);
            self.inside.fetch_add(1, SeqCst);
            if self.active.load(SeqCst) && self.epoch.load(SeqCst) == seen {
                // SAFETY: while `active` is set and we are counted in `inside`, the caller keeps
                // its stack frame (and the Task it points at) alive: it clears `active` only after
                // every part is done and then waits for `inside` to drain.
                let task: Task<'_> = unsafe { *(self.task.load(SeqCst) as *const Task<'_>) };
                self.work(task);
            }
            self.inside.fetch_sub(1, SeqCst);
        }
    }
}

fn shared() -> &'static Shared {
    static POOL: OnceLock<&'static Shared> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::env::var("TUNEX_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let shared: &'static Shared = Box::leak(Box::new(Shared { helpers: threads - 1, ..idle() }));
        for i in 0..shared.helpers {
            let spawned = std::thread::Builder::new().name(format!("tunex-decode-{i}")).spawn(move || shared.helper());
            if spawned.is_err() {
                // no helper thread (a sandbox limit): the caller does every part itself
                return Box::leak(Box::new(idle()));
            }
        }
        shared
    })
}

/// A pool without helpers; `shared()` gives it its threads.
fn idle() -> Shared {
    Shared {
        epoch: AtomicUsize::new(0),
        active: AtomicBool::new(false),
        task: AtomicPtr::new(std::ptr::null_mut()),
        parts: AtomicUsize::new(0),
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        inside: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
        sleepers: AtomicUsize::new(0),
        lock: Mutex::new(()),
        wake: Condvar::new(),
        submit: Mutex::new(()),
        helpers: 0,
        pid: std::process::id(),
    }
}

/// Threads a job is split over (the caller included).
pub fn threads() -> usize {
    shared().helpers + 1
}

/// Run `task(i)` for every `i` in `0..parts`, spread over the calling thread and the helpers.
/// Returns false if a part panicked (every other part still ran).
pub fn run(parts: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
    let pool = shared();
    let alone = || {
        // every part runs even after one panics, as with the helpers
        let failed = (0..parts).filter(|&i| catch_unwind(AssertUnwindSafe(|| task(i))).is_err()).count();
        failed == 0
    };
    if pool.helpers == 0 || parts < 2 || pool.pid != std::process::id() {
        return alone();
    }
    let Ok(_turn) = pool.submit.try_lock() else {
        return alone(); // another thread holds the pool
    };
    let task_ref: Task<'_> = task;
    pool.task.store(&task_ref as *const Task<'_> as *mut (), SeqCst);
    pool.parts.store(parts, SeqCst);
    pool.next.store(0, SeqCst);
    pool.done.store(0, SeqCst);
    pool.panicked.store(false, SeqCst);
    pool.active.store(true, SeqCst);
    pool.epoch.fetch_add(1, SeqCst);
    if pool.sleepers.load(SeqCst) > 0 {
        let _guard = pool.lock.lock().unwrap_or_else(|e| e.into_inner());
        pool.wake.notify_all();
    }
    pool.work(task_ref);
    while pool.done.load(SeqCst) < parts {
        std::hint::spin_loop();
    }
    pool.active.store(false, SeqCst);
    while pool.inside.load(SeqCst) > 0 {
        std::hint::spin_loop();
    }
    pool.task.store(std::ptr::null_mut(), SeqCst);
    !pool.panicked.load(SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_across_many_jobs_and_callers() {
        let callers: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(|| {
                    for parts in 0..200usize {
                        let hits: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                        assert!(run(parts, &|i| {
                            hits[i].fetch_add(1, SeqCst);
                        }));
                        assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
                        if parts % 50 == 0 {
                            std::thread::sleep(SPIN * 2); // let the helpers park and wake again
                        }
                    }
                })
            })
            .collect();
        callers.into_iter().for_each(|c| c.join().unwrap());
    }

    #[test]
    fn a_panicking_part_is_reported_not_hung() {
        let ran = AtomicUsize::new(0);
        let ok = run(8, &|i| {
            ran.fetch_add(1, SeqCst);
            if i == 3 {
                panic!("part 3");
            }
        });
        assert!(!ok);
        assert_eq!(ran.load(SeqCst), 8);
    }
}
