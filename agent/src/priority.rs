//! Thread priorities: the background work that can wait for idle CPU.

/// Lowers the calling thread's CPU priority (nice 10), once per thread.
/// Compressing and decoding WAL can wait for idle CPU: on a small host they
/// would otherwise take cores from the database whose WAL they handle. The
/// receive loop (fsync and reply) keeps its normal priority; the spool
/// holds what the background work has not reached yet.
pub fn background_priority() {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    LOWERED.with(|lowered| {
        if !lowered.get() {
            // SAFETY: setpriority only changes this thread's nice value (on
            // Linux, PRIO_PROCESS with a thread id applies to that thread).
            unsafe {
                let tid = libc::gettid();
                libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
            }
            lowered.set(true);
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn lowers_only_the_calling_thread() {
        // SAFETY: getpriority/gettid only read this process's scheduling state.
        let nice_of = |tid: libc::pid_t| unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
        let main = unsafe { libc::gettid() };
        let before = nice_of(main);
        let lowered = std::thread::spawn(move || {
            super::background_priority();
            super::background_priority(); // once is enough; a second call changes nothing
            nice_of(unsafe { libc::gettid() })
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, (before + 10).min(19), "nice values stop at 19");
        assert_eq!(nice_of(main), before, "the calling thread only");
    }
}
