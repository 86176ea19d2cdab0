//! The binaries' global allocator: mimalloc (BENCHMARKS.md, "Allocator"), entered
//! through `mi_malloc` for the alignments a C `malloc` guarantees.
//!
//! `mimalloc::MiMalloc` hands every Rust allocation to `mi_malloc_aligned`. mimalloc 3
//! treats only power-of-two sizes as naturally aligned there, and serves an 8-aligned
//! 48-byte request whose size class has no free block at hand by over-allocating: a
//! 64-byte block (measured: 10M `Arc<Slot>`s took 64 B each, 48 B through `mi_malloc`).
//! As std's `System` allocator does over C's `malloc`, an alignment up to 16 bytes and no
//! larger than the size goes to plain `mi_malloc` (a drop-in `malloc`, which guarantees
//! it); every other request, and every free, goes to `MiMalloc` unchanged.
//!
//! The binaries also turn transparent huge pages off for their process
//! ([`turn_off_transparent_huge_pages`]).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::ffi::c_void;
use std::time::{Duration, Instant};

use mimalloc::MiMalloc;

/// What `malloc` aligns every block of at least this size to (`max_align_t` on the
/// 64-bit targets prenota runs on; mimalloc's `MI_MAX_ALIGN_SIZE`).
const MALLOC_ALIGN: usize = 16;

pub struct Mimalloc;

fn malloc_aligns(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

// SAFETY: every block comes from mimalloc and goes back to it (`mi_free` frees blocks
// of `mi_malloc` and `mi_malloc_aligned` alike); `malloc_aligns` only lets through
// alignments `mi_malloc` guarantees for that size.
unsafe impl GlobalAlloc for Mimalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if malloc_aligns(layout.align(), layout.size()) {
            // SAFETY: a non-zero size (GlobalAlloc's contract); mimalloc's C API.
            unsafe { libmimalloc_sys::mi_malloc(layout.size()).cast() }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if malloc_aligns(layout.align(), layout.size()) {
            // SAFETY: as in `alloc`.
            unsafe { libmimalloc_sys::mi_zalloc(layout.size()).cast() }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if malloc_aligns(layout.align(), new_size) {
            // SAFETY: `ptr` came from mimalloc; a non-zero new size (GlobalAlloc's contract).
            unsafe { libmimalloc_sys::mi_realloc(ptr.cast::<c_void>(), new_size).cast() }
        } else {
            // SAFETY: the caller's contract, passed on.
            unsafe { MiMalloc.realloc(ptr, layout, new_size) }
        }
    }
}

/// How often a runtime thread going idle gives back what its heap freed
/// ([`collect_when_idle`]).
pub const COLLECT_EVERY: Duration = Duration::from_secs(1);

/// Gives back to the system the memory this thread's mimalloc heap has freed, at most
/// once per [`COLLECT_EVERY`]. mimalloc gives freed pages back `purge_delay` after they
/// were freed, but only when the thread that owns them calls into it again: a worker
/// that went idle after a burst kept them. Measured (an outside test's fill: 17
/// addresses × 500 unread searches, then closed): the server's RSS stayed at 273 MB 20 s
/// later, 30 MB (its baseline 28) with this called as the runtime's workers park.
pub fn collect_when_idle() {
    thread_local! {
        static COLLECTED: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    COLLECTED.with(|collected| {
        let now = Instant::now();
        if collected
            .get()
            .is_some_and(|at| now.duration_since(at) < COLLECT_EVERY)
        {
            return;
        }
        collected.set(Some(now));
        // SAFETY: mimalloc's C API: collects the calling thread's own heap.
        unsafe { libmimalloc_sys::mi_collect(false) };
    });
}

/// Turns transparent huge pages off for this whole process (Linux; elsewhere it does
/// nothing). mimalloc 3 asks for huge pages for its regions (`madvise(MADV_HUGEPAGE)`)
/// and gives back memory unused for a second (`purge_delay`); touching such memory again
/// faults in a whole 2 MiB page, which the kernel zeroes first. Under a rush that was
/// ~7% of the server runtime's CPU (`clear_page_erms`) and the Book latency's tail
/// (BENCHMARKS.md, "Transparent huge pages off"). The binaries call it as they start
/// (after parsing their arguments); processes they started would inherit it.
pub fn turn_off_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    rustix::thread::disable_transparent_huge_pages(true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_has_the_alignment_asked_for() {
        for (size, align) in [
            (8, 8),
            (24, 8),
            (48, 8),
            (48, 16),
            (40, 8),
            (64, 32),
            (8, 64),
        ] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: a non-zero size; freed below with the same layout.
            unsafe {
                let block = Mimalloc.alloc(layout);
                assert!(
                    !block.is_null() && (block as usize).is_multiple_of(align),
                    "{size}/{align}"
                );
                let grown = Mimalloc.realloc(block, layout, size * 3);
                assert!(
                    !grown.is_null() && (grown as usize).is_multiple_of(align),
                    "{size}/{align}"
                );
                let bigger = Layout::from_size_align(size * 3, align).unwrap();
                Mimalloc.dealloc(grown, bigger);
                let zeroed = Mimalloc.alloc_zeroed(layout);
                assert!(std::slice::from_raw_parts(zeroed, size)
                    .iter()
                    .all(|b| *b == 0));
                Mimalloc.dealloc(zeroed, layout);
            }
        }
    }
}
