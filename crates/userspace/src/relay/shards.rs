//! The relay threads: one single-threaded tokio runtime per thread, each with its own event
//! loop (epoll), as HAProxy runs one loop per thread. A connection lives on one shard from
//! accept to close: its wake-ups never cross threads and no scheduler moves it, which keeps
//! the latency a relay adds low. Listeners are spread over the shards; an accepted connection
//! stays on its listener's shard (no hand-off between threads) unless another shard relays
//! clearly fewer connections.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub(crate) struct Shards {
    handles: Vec<Handle>,
    /// Connections each shard relays now.
    active: Vec<AtomicUsize>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
}

impl Shards {
    pub fn start(count: usize) -> io::Result<Shards> {
        let mut shards = Shards {
            handles: Vec::new(),
            active: (0..count.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            stops: Vec::new(),
            threads: Vec::new(),
            next: AtomicUsize::new(0),
        };
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            shards.handles.push(runtime.handle().clone());
            shards.stops.push(stop);
            shards.threads.push(
                std::thread::Builder::new()
                    .name(format!("relay-{i}"))
                    .spawn(move || {
                        runtime.block_on(async {
                            let _ = stopped.await;
                        });
                        // Established relays end with the process (or the runtime).
                        runtime.shutdown_background();
                    })?,
            );
        }
        Ok(shards)
    }

    /// The shard the next listener goes to (in turn), with its index.
    pub fn next(&self) -> (usize, &Handle) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        (i, &self.handles[i])
    }

    /// Where a connection accepted on shard `local` is relayed: there, unless another
    /// shard relays fewer than half as many (a hand-off costs a wake-up of another
    /// thread; staying costs nothing).
    pub fn for_connection(&self, local: usize) -> usize {
        let here = self.active[local].load(Ordering::Relaxed);
        let (best, load) = self
            .active
            .iter()
            .enumerate()
            .map(|(i, a)| (i, a.load(Ordering::Relaxed)))
            .min_by_key(|(_, a)| *a)
            .unwrap_or((local, here));
        if load * 2 + 1 < here {
            best
        } else {
            local
        }
    }

    /// Runs a connection's relay on shard `index`, counted there while it runs.
    pub fn relay<F>(self: &std::sync::Arc<Self>, index: usize, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let shards = self.clone();
        shards.active[index].fetch_add(1, Ordering::Relaxed);
        self.handles[index].spawn(async move {
            future.await;
            shards.active[index].fetch_sub(1, Ordering::Relaxed);
        });
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        // The threads are not joined: dropping may happen on a runtime thread, where
        // blocking is not allowed; they end on their own.
        self.threads.clear();
    }
}
