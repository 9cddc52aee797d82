//! Run a kernel's parts on the host process's OpenMP team (the one torch's CPU ops use), when
//! there is one: the helper threads are then torch's own, already awake after the previous op,
//! instead of a second pool competing with them for the same cores. (A rayon version of the
//! training kernels made the LoRA step 6% slower in an interleaved A/B; this one 3-4% faster.)
//! Without GNU OpenMP in the process (`cargo test`, or `TUNEX_OMP_KERNELS=0`) parts run in turn
//! on the calling thread. Parts are claimed from a counter, so any team size works. (Why this
//! runtime beside rayon and the decode pool: see the crate's docs, `lib.rs`.)
//!
//! The job reaches the team as a pointer to a `Job` on the caller's stack. `GOMP_parallel` returns
//! only once every thread of the team has finished the callback, and a part's panic stops inside
//! the callback (`part::run`; unwinding out of an `extern "C"` function would abort), so the
//! pointer is never used after [`run`] returns.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::part;

/// libgomp's entry for `#pragma omp parallel`: runs `fn(data)` on every thread of a team, the
/// caller included, and returns when all are done.
type Parallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);

struct Omp {
    parallel: Parallel,
}

fn omp() -> Option<&'static Omp> {
    static OMP: OnceLock<Option<Omp>> = OnceLock::new();
    OMP.get_or_init(|| {
        if !crate::settings::omp_kernels() {
            return None;
        }
        // SAFETY: dlsym with RTLD_DEFAULT only looks a NUL-terminated name up among the objects
        // the process already loaded. A non-null result is libgomp's `GOMP_parallel`, whose C
        // signature `void (void (*)(void *), void *, unsigned, unsigned)` is `Parallel`'s; libgomp
        // is never unloaded once loaded (torch links it), so the pointer stays valid.
        unsafe {
            let p = libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr());
            if p.is_null() {
                return None; // no GNU OpenMP in this process (plain Rust, or another runtime)
            }
            Some(Omp { parallel: std::mem::transmute::<*mut c_void, Parallel>(p) })
        }
    })
    .as_ref()
}

/// Switched off by `tunex._native.set_omp_kernels(False)` (tests and A/B runs compare both).
pub static ENABLED: AtomicBool = AtomicBool::new(true);

struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    parts: usize,
    next: AtomicUsize,
    panicked: AtomicBool,
}

extern "C" fn trampoline(data: *mut c_void) {
    // SAFETY: `data` is the address of the `Job` that `run` passed to GOMP_parallel and keeps
    // alive (a local of its frame) until GOMP_parallel returns, which is after every thread of the
    // team has returned from this function. Threads only read it (its counters are atomics).
    let job = unsafe { &*(data as *const Job<'_>) };
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.parts {
            return;
        }
        if !part::run(|| (job.task)(i)) {
            job.panicked.store(true, Ordering::Relaxed);
        }
    }
}

/// Whether [`run`] spreads parts over an OpenMP team (else they run in turn on the caller).
pub fn available() -> bool {
    omp().is_some() && ENABLED.load(Ordering::Relaxed)
}

/// `task(i)` for every `i` in `0..parts`, on the OpenMP team when the process has one (torch's),
/// else on the calling thread. Returns false if a part panicked (the others still ran).
pub fn run(parts: usize, task: &(dyn Fn(usize) + Sync)) -> bool {
    match omp() {
        Some(omp) if parts > 1 && ENABLED.load(Ordering::Relaxed) => {
            let job = Job { task, parts, next: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
            // SAFETY: `omp.parallel` is GOMP_parallel (see `omp`); it runs the trampoline on every
            // thread of a team (0: the default team size, 0: no flags) and returns when all are done,
            // so `job` outlives every use of the pointer. The trampoline never unwinds.
            unsafe { (omp.parallel)(trampoline, &job as *const Job<'_> as *mut c_void, 0, 0) };
            // GOMP_parallel's end joins the team (a barrier), so the parts' stores are visible here
            !job.panicked.load(Ordering::Relaxed)
        }
        _ => (0..parts).map(|i| part::run(|| task(i))).fold(true, |a, b| a & b),
    }
}

/// Elements per part when a kernel's elementwise work is split with [`for_ranges`].
pub(crate) const PART: usize = 1 << 16;

/// `task(a, b)` for consecutive ranges `a..b` of `0..n`, [`PART`] elements each (the last one
/// shorter), through [`run`]. A part's panic is raised again here once every part has run.
pub(crate) fn for_ranges(n: usize, task: &(dyn Fn(usize, usize) + Sync)) {
    let ok = run(n.div_ceil(PART), &|i| task(i * PART, ((i + 1) * PART).min(n)));
    assert!(ok, "a part of a parallel kernel panicked");
}

/// `task(a, b)` for consecutive row ranges covering `0..rows`, ~[`PART`] values each (rows of
/// `width` values), through [`run`]. Returns false if a part panicked.
pub(crate) fn by_rows(rows: usize, width: usize, task: &(dyn Fn(usize, usize) + Sync)) -> bool {
    let per = (PART / width.max(1)).max(1);
    run(rows.div_ceil(per), &|i| task(i * per, ((i + 1) * per).min(rows)))
}

/// A mutable slice shared by parts that write disjoint ranges of it. Each kernel makes it from a
/// `&mut` slice that it does not touch again until its parts are joined, so the memory outlives
/// the parts and nothing but them touches it meanwhile.
pub(crate) struct Shared<T = f32>(*mut T, usize);

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<T> {}
// SAFETY: a `Shared` only hands out elements through `range` and `ptr`, whose callers promise that
// no two parts touch one element, so sending or sharing it between threads races on nothing.
unsafe impl<T: Send> Send for Shared<T> {}
unsafe impl<T: Send> Sync for Shared<T> {}

impl<T> Shared<T> {
    pub(crate) fn new(s: &mut [T]) -> Self {
        Shared(s.as_mut_ptr(), s.len())
    }

    /// Elements `start..end` as a slice of their own. A range outside the slice is a tunex bug:
    /// it panics (the part's runtime reports a failed kernel) instead of reaching other memory.
    ///
    /// # Safety
    /// While the returned slice lives, no other part reads or writes any element of `start..end`.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range(&self, start: usize, end: usize) -> &mut [T] {
        assert!(start <= end && end <= self.1, "part range {start}..{end} is outside a slice of {}", self.1);
        // SAFETY: `start..end` lies inside the slice (checked just above), which outlives the
        // parts (see the type's doc); the caller promises this part alone touches it.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), end - start) }
    }

    /// A pointer to element `start`, for kernels that write strided rows of it. A `start` outside
    /// the slice panics, as in [`Shared::range`].
    ///
    /// # Safety
    /// Every element written through the pointer lies inside the slice, and no other part touches
    /// it meanwhile.
    pub(crate) unsafe fn ptr(&self, start: usize) -> *mut T {
        assert!(start < self.1, "part offset {start} is outside a slice of {}", self.1);
        // SAFETY: `start` is inside the slice (checked just above).
        unsafe { self.0.add(start) }
    }
}
