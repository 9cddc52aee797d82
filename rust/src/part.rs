//! One part of a parallel job, run so that its panic stops here: the parallel runtimes
//! (`omp`, `infer::pool`) count every part as done and report a panic as a failed job, so that no
//! caller waits forever and no panic unwinds out of a helper thread or an `extern "C"` callback.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// `part()`; false if it panicked. The panic's payload is dropped here, and a second panic from
/// the payload's own `Drop` is caught too (that payload is leaked rather than dropped).
pub(crate) fn run(part: impl FnOnce()) -> bool {
    match catch_unwind(AssertUnwindSafe(part)) {
        Ok(()) => true,
        Err(payload) => {
            if let Err(again) = catch_unwind(AssertUnwindSafe(move || drop(payload))) {
                std::mem::forget(again);
            }
            false
        }
    }
}
