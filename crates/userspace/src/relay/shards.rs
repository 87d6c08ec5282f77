//! The relay threads: one single-threaded tokio runtime per thread, each with its own event
//! loop (epoll), as HAProxy runs one loop per thread. A connection lives on one shard from
//! accept to close: its wake-ups never cross threads and no scheduler moves it, which keeps
//! the latency a relay adds low. Every shard accepts on each TCP listener (one socket each
//! in the port's `SO_REUSEPORT` group), so the kernel spreads connections over the shards
//! and none is handed from one thread to another.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub(crate) struct Shards {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    next: AtomicUsize,
}

impl Shards {
    pub fn start(count: usize) -> io::Result<Shards> {
        let mut shards = Shards {
            handles: Vec::new(),
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
                            tokio::select! {
                                _ = stopped => {}
                                () = tick() => {}
                            }
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

    /// How many shards (relay threads) there are.
    pub fn len(&self) -> usize {
        self.handles.len()
    }
}

/// How often a relay thread's timer driver wakes, at least.
const TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Keeps the timer driver's next wake-up at most [`TICK`] away. Arming a timer that expires
/// before the driver's next wake-up makes tokio wake its own event loop (an eventfd write and
/// one more `epoll_wait`); every connect arms one (≥ 250 ms, upstream's timeouts) and every
/// UDP flow too, so without this tick nearly every connection paid that wake-up (a tenth of
/// the relay's system calls under a connection-rate load). Ten wake-ups a second per thread
/// are the price.
async fn tick() {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
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
