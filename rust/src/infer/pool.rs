//! A small fork-join pool for the decode kernels, tuned for latency rather than throughput.
//!
//! Decoding one token calls ~200 matrix-vector products of 50-500 µs each, with torch work in
//! between. rayon's workers fall asleep in those gaps and take tens of µs to wake, which costs as
//! much as the product itself. Here the calling thread takes a share of the work, and the helper
//! threads spin for a short while after each job (a decode loop keeps them spinning), then park.
//! (Why this pool exists beside rayon and the OpenMP team: see the crate's docs, `lib.rs`.)
//!
//! One job runs at a time; a caller that finds the pool busy (another Python thread decoding) runs
//! its job alone on its own thread.
//!
//! # The hand-off
//! A job's task is a `&dyn Fn` borrowed from the caller, so the helpers reach it through a raw
//! pointer to a reference on the caller's stack ([`Shared::task`]). That is sound because of one
//! invariant, kept by [`Published`]: a helper dereferences the pointer only while it is counted in
//! [`Shared::inside`] and has seen [`Shared::active`] set for the job it woke for, and `run` does
//! not return or unwind past its frame before it has cleared `active`, waited for `inside` to
//! reach zero and nulled the pointer. A part that panics is stopped where it runs ([`part::run`]) and
//! still counts as done, so neither the caller's wait for the parts nor its wait for the helpers can hang.

use crate::part;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN: Duration = Duration::from_millis(3);

type Task<'a> = &'a (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped once per job; helpers watch it.
    epoch: AtomicUsize,
    /// True while a job's parts may still be claimed.
    active: AtomicBool,
    /// Points at the caller's `Task` (a fat reference on its stack) while `active`; null otherwise.
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

/// Takes a helper out of [`Shared::inside`] when dropped, however its visit to a job ends.
struct Inside<'a>(&'a AtomicUsize);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Shared {
    /// Claim and run parts until none is left. Every claimed part counts in `done`, panicking or not.
    fn work(&self, task: Task<'_>) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.parts.load(SeqCst) {
                return;
            }
            if !part::run(|| task(i)) {
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
                if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
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
            let _inside = Inside(&self.inside);
            if self.active.load(SeqCst) && self.epoch.load(SeqCst) == seen {
                // SAFETY: we joined `inside` before we saw `active` set, so a caller has published
                // a job (`Published::new` stores the pointer and counters before it sets `active`,
                // all SeqCst) and its `Published` guard has not yet seen `inside` drain: it clears
                // `active` first and then waits for us, before its frame (which holds the `Task`
                // the pointer names) can end, and no other job can be published meanwhile
                // (`submit` is held). So the pointer is that job's, non-null, and the `Task` and
                // everything it borrows live until `_inside` drops.
                let task: Task<'_> = unsafe { *(self.task.load(SeqCst) as *const Task<'_>) };
                self.work(task);
            }
        }
    }
}

/// A job made visible to the helpers. Dropping it (on return or while unwinding) withdraws it:
/// `active` cleared, every helper out of the job, the task pointer nulled. Until then the caller's
/// frame, which holds the task reference the pointer names, cannot end.
struct Published<'a> {
    pool: &'a Shared,
}

impl<'a> Published<'a> {
    /// Publish `task` (a reference that must outlive the returned guard) as a job of `parts` parts.
    fn new(pool: &'a Shared, task: &'a Task<'_>, parts: usize) -> Self {
        pool.task.store(task as *const Task<'_> as *mut (), SeqCst);
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
        Published { pool }
    }
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        let pool = self.pool;
        pool.active.store(false, SeqCst);
        while pool.inside.load(SeqCst) > 0 {
            std::hint::spin_loop();
        }
        pool.task.store(std::ptr::null_mut(), SeqCst);
    }
}

fn shared() -> &'static Shared {
    static POOL: OnceLock<&'static Shared> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = crate::settings::num_threads()
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
        let failed = (0..parts).filter(|&i| !part::run(|| task(i))).count();
        failed == 0
    };
    if pool.helpers == 0 || parts < 2 || pool.pid != std::process::id() {
        return alone();
    }
    let _turn = match pool.submit.try_lock() {
        Ok(turn) => turn,
        // a caller unwound while holding it; `Published` left the pool idle all the same
        Err(TryLockError::Poisoned(turn)) => turn.into_inner(),
        Err(TryLockError::WouldBlock) => return alone(), // another thread holds the pool
    };
    let task_ref: Task<'_> = task;
    let job = Published::new(pool, &task_ref, parts);
    pool.work(task_ref);
    // every part is claimed; wait for the helpers still running theirs
    while pool.done.load(SeqCst) < parts {
        std::hint::spin_loop();
    }
    let ok = !pool.panicked.load(SeqCst);
    drop(job);
    ok
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

    /// After a job, however it ended: no helper inside it and no pointer to the caller's stack left.
    fn assert_withdrawn() {
        let pool = shared();
        // holding `submit`, no other test's job can be published meanwhile
        let _turn = pool.submit.lock().unwrap_or_else(|e| e.into_inner());
        assert!(pool.task.load(SeqCst).is_null());
        assert!(!pool.active.load(SeqCst));
        assert_eq!(pool.inside.load(SeqCst), 0);
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

    /// A panic payload whose own `Drop` panics again.
    struct Bomb;

    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("a payload that panics when dropped");
        }
    }

    #[test]
    fn panics_on_every_thread_leave_the_pool_withdrawn_and_usable() {
        for round in 0..20 {
            // every part panics, on the caller and on the helpers; half of them with a Bomb
            let ran = AtomicUsize::new(0);
            let local = vec![round; 64]; // what the task borrows from this frame
            let ok = run(64, &|i| {
                ran.fetch_add(local[i] - round + 1, SeqCst);
                if i % 2 == 0 {
                    std::panic::panic_any(Bomb);
                }
                panic!("part {i}");
            });
            assert!(!ok);
            assert_eq!(ran.load(SeqCst), 64);
            assert_withdrawn();
            // the pool still runs every part of the next job once
            let hits: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
            assert!(run(64, &|i| {
                hits[i].fetch_add(1, SeqCst);
            }));
            assert!(hits.iter().all(|h| h.load(SeqCst) == 1));
            assert_withdrawn();
        }
    }
}
