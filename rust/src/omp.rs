//! Run a kernel's parts on the host process's OpenMP team (the one torch's CPU ops use), when
//! there is one: the helper threads are then torch's own, already awake after the previous op,
//! instead of a second pool competing with them for the same cores. (A rayon version of the
//! training kernels made the LoRA step 6% slower in an interleaved A/B; this one 3-4% faster.)
//! Without GNU OpenMP in the process (`cargo test`, or `TUNEX_OMP_KERNELS=0`) parts run in turn
//! on the calling thread. Parts are claimed from a counter, so any team size works.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

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
        // SAFETY: dlsym with RTLD_DEFAULT looks symbols up in what the process already loaded.
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
    // SAFETY: `data` is the `Job` that `run` keeps alive until GOMP_parallel returns.
    let job = unsafe { &*(data as *const Job<'_>) };
    loop {
        let i = job.next.fetch_add(1, Ordering::Relaxed);
        if i >= job.parts {
            return;
        }
        if catch_unwind(AssertUnwindSafe(|| (job.task)(i))).is_err() {
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
            // SAFETY: the trampoline only reads `job`, which outlives the call.
            unsafe { (omp.parallel)(trampoline, &job as *const Job<'_> as *mut c_void, 0, 0) };
            !job.panicked.load(Ordering::Relaxed)
        }
        _ => (0..parts).map(|i| catch_unwind(AssertUnwindSafe(|| task(i))).is_ok()).fold(true, |a, b| a & b),
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

/// A mutable slice shared by parts that write disjoint ranges of it.
#[derive(Clone, Copy)]
pub(crate) struct Shared(*mut f32, usize);
// SAFETY: parts only take disjoint ranges (see `range`), so no element is shared between threads.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    pub(crate) fn new(s: &mut [f32]) -> Self {
        Shared(s.as_mut_ptr(), s.len())
    }

    /// SAFETY: callers hand each part a range no other part touches.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range(&self, start: usize, end: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(start), end.min(self.1) - start)
    }

    /// A pointer to element `start`, for kernels that write strided rows of it.
    ///
    /// SAFETY: as [`Shared::range`], for every element written through it; `start` within the slice.
    pub(crate) unsafe fn ptr(&self, start: usize) -> *mut f32 {
        debug_assert!(start < self.1);
        self.0.add(start)
    }
}
