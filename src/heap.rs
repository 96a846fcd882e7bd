//! The heap of a short-lived run (a hook, `apply`, `status`, `check`): grown in one step
//! and backed by transparent huge pages where the kernel offers them.
//!
//! Why: such a run touches its heap once. With glibc's defaults every fresh 4 KiB page
//! costs a page fault, and at 10,000 forwards `check` took ~3,300 of them: about 40% of
//! its time was the kernel's (measured with `perf`; a fault costs several microseconds in
//! a virtual machine, where KVM hosts' CI and many users' hosts run). Asking glibc for a
//! large top pad and marking the heap `MADV_HUGEPAGE` (what glibc's own
//! `glibc.malloc.hugetlb=1` tunable does, which a hook started by libvirt cannot be given)
//! takes it to a few hundred faults. Large blocks stay in the heap instead of a mapping
//! each (mapped, they are faulted in again whenever one is freed and another taken), and
//! the heap is never trimmed: the process is about to exit.
//!
//! Not for the daemon: it lives long and its resident memory is a target of its own.
//! Where THP is off (`never`) the advice changes nothing and the pad is only address
//! space; nothing here can fail a run.

/// The heap grows by at least this much at a time (address space; pages are touched, and
/// so resident, only as they are used).
const PAD: usize = 64 << 20;

/// Sets the heap up for a short-lived run. Call once, early.
pub fn for_one_shot() {
    const THP: usize = 2 << 20;
    // SAFETY: mallopt and sbrk(0) only change or read malloc's settings and the break;
    // the block is malloc's own and freed at once; madvise only advises on the range of
    // the heap that this process owns (between two reads of its break).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, PAD as i32);
        let start = libc::sbrk(0) as usize;
        // more than the heap's free top holds: malloc grows the heap by it and the pad
        // (kept from the optimizer, which may drop a malloc whose block nobody uses)
        let p = std::hint::black_box(libc::malloc(1 << 20));
        libc::free(p);
        let end = libc::sbrk(0) as usize;
        let from = start.next_multiple_of(THP);
        if end > from + THP {
            let len = (end - from) / THP * THP;
            libc::madvise(from as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
}
