//! Ask Linux to back a large, freshly allocated output buffer with 2 MB pages before we write it.
//!
//! A fresh tensor of tens of megabytes is untouched virtual memory: the first write to each 4 KB
//! page traps into the kernel, and on a CPU those traps cost more than the dequantization itself.
//! With transparent huge pages in "madvise" mode (the common default) one trap maps 2 MB instead.
//! This is advice only: on a buffer already in use, or where THP is off, nothing changes.

/// Advise huge pages for the 2 MB-aligned interior of `buf` when it spans at least one such page.
pub(crate) fn advise_huge_pages(buf: &mut [u8]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_ptr() as usize;
        let first = start.next_multiple_of(HUGE);
        let end = (start + buf.len()) / HUGE * HUGE;
        if end > first {
            // SAFETY: [first, end) lies inside `buf`, memory we hold exclusively; MADV_HUGEPAGE
            // changes how the kernel backs it, never its contents.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}
