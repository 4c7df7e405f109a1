//! [`PerThread`]: a value made once per I/O thread, so the tasks it spawns run on that thread.
//!
//! With `server.io_threads` set, each I/O thread runs a single-threaded runtime of its own
//! (`server::serve`). A connection pool or a batching task shared by all of them would live on one
//! runtime, and every request would then wake another thread twice: once to hand its work over,
//! once for the answer. Each thread gets its own instead, made on first use there, and its
//! requests' wake-ups stay on it. On the shared multi-threaded runtime (the default) tasks move
//! between threads anyway, so one value serves everything.

use std::thread::ThreadId;

use thread_local::ThreadLocal;
use tokio::runtime::{Handle, RuntimeFlavor};

/// One `T` per thread that runs a single-threaded Tokio runtime, and one shared otherwise.
pub struct PerThread<T: Send> {
    shared: T,
    /// Values by thread, with the thread that made each: `ThreadLocal` hands an exited thread's
    /// slot to a later thread, whose runtime never ran that value's tasks.
    local: ThreadLocal<(ThreadId, T)>,
    make: Box<dyn Fn() -> T + Send + Sync>,
}

impl<T: Send> PerThread<T> {
    /// `shared` serves multi-threaded runtimes (and callers outside any runtime); `make` is
    /// called on a single-threaded runtime's thread the first time that thread asks.
    pub fn new(shared: T, make: impl Fn() -> T + Send + Sync + 'static) -> Self {
        PerThread { shared, local: ThreadLocal::new(), make: Box::new(make) }
    }

    /// This thread's value.
    pub fn get(&self) -> &T {
        match Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::CurrentThread => {
                let me = std::thread::current().id();
                match self.local.get_or(|| (me, (self.make)())) {
                    (owner, value) if *owner == me => value,
                    // A slot inherited from an exited thread: the shared value still works.
                    _ => &self.shared,
                }
            }
            _ => &self.shared,
        }
    }

    /// Every value made so far: the shared one, then the threads' own.
    pub fn all(&self) -> impl Iterator<Item = &T>
    where
        T: Sync,
    {
        std::iter::once(&self.shared).chain(self.local.iter().map(|(_, value)| value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn counting() -> (PerThread<usize>, Arc<AtomicUsize>) {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        (PerThread::new(0, move || counter.fetch_add(1, Ordering::SeqCst) + 1), made)
    }

    #[test]
    fn single_threaded_runtimes_get_their_own_value_once_others_share_one() {
        let (values, made) = counting();
        let values = Arc::new(values);
        assert_eq!(*values.get(), 0, "outside a runtime: the shared value");
        let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
        assert_eq!(multi.block_on(async { *values.get() }), 0);
        let on_own_runtime = |values: Arc<PerThread<usize>>, both: Arc<std::sync::Barrier>| {
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let seen = rt.block_on(async { (*values.get(), *values.get()) });
                both.wait();
                seen
            })
        };
        // Two threads alive at once.
        let both = Arc::new(std::sync::Barrier::new(2));
        let threads =
            [on_own_runtime(values.clone(), both.clone()), on_own_runtime(values.clone(), both)];
        let seen: Vec<(usize, usize)> = threads.map(|t| t.join().unwrap()).into();
        assert!(seen.iter().all(|(first, again)| first == again), "made once per thread: {seen:?}");
        assert_ne!(seen[0].0, seen[1].0);
        assert!(seen.iter().all(|&(v, _)| v > 0));
        assert_eq!(made.load(Ordering::SeqCst), 2);
        let mut all: Vec<usize> = values.all().copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2]);
        // A later thread may inherit an exited thread's slot; it never gets that thread's value.
        let later = on_own_runtime(values.clone(), Arc::new(std::sync::Barrier::new(1)));
        let (value, _) = later.join().unwrap();
        assert!(value == 0 || value == 3, "a dead thread's value was handed out: {value}");
    }
}
