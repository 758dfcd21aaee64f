//! The load generator's engine: one OS thread per CPU this process may run on, each running a
//! current-thread tokio runtime with an HTTP client (and so connections) of its own, and each
//! offering an equal share of the rate.
//!
//! Why not tasks on the process's multi-thread runtime: there, every answer wakes whichever
//! worker thread is parked, and every request may travel to a connection another thread
//! owns. Measured against wrk on one pinned CPU (`reference`), that cross-thread traffic made
//! each request cost about twice wrk's, and the generator reached 0.52–0.58 of wrk's rate.
//! A thread that owns its connections and its timers answers itself with no wake-ups between
//! threads, as wrk's own threads do.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::connections::Connections;
use super::{Http, Run, Scenario};

/// The offered rate, in operations per second, at a time since the start of the run.
pub(super) type Rate = Arc<dyn Fn(Duration) -> f64 + Send + Sync>;

/// What a worker is asked to do.
enum Order {
    /// Offer its share of `rate` from `offset` to `offset + length` into the run.
    Drive {
        scenario: Arc<Scenario>,
        rate: Rate,
        offset: Duration,
        length: Duration,
        done: oneshot::Sender<()>,
    },
    /// Wait up to this long for its operations in flight, then abandon the rest.
    Drain(Duration, oneshot::Sender<()>),
}

/// The generator's threads. Dropping it stops them at once (mid-stage too: `loadtest scale`
/// drops it on Ctrl-C), abandoning what they have in flight.
pub(super) struct Generator {
    orders: Vec<mpsc::UnboundedSender<Order>>,
    stop: CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
    in_flight: Arc<Semaphore>,
    bound: usize,
    started: std::time::Instant,
}

impl Generator {
    /// Starts one worker per CPU this thread may run on (its affinity, as `taskset` sets it),
    /// with at most `max_in_flight` operations in flight and `connections` connections to the
    /// read target across them (shared out evenly, at least one each). `client` makes each
    /// worker's HTTP client.
    ///
    /// # Errors
    /// A thread or HTTP client that cannot be made. A thread whose runtime cannot be built
    /// ends at once, and the first [`Generator::drive`] says so.
    pub fn start(
        run: &Arc<Run>,
        max_in_flight: usize,
        connections: usize,
        client: impl Fn() -> reqwest::Result<reqwest::Client>,
    ) -> anyhow::Result<Self> {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let in_flight = Arc::new(Semaphore::new(max_in_flight.max(1)));
        let mut generator = Self {
            orders: Vec::new(),
            stop: CancellationToken::new(),
            threads: Vec::new(),
            in_flight: in_flight.clone(),
            bound: max_in_flight.max(1),
            started: run.started,
        };
        for index in 0..workers {
            let (tx, rx) = mpsc::unbounded_channel();
            let worker = Worker {
                run: run.clone(),
                http: Http {
                    client: client()?,
                    reads: Connections::new(&run.read_base, connections / workers),
                },
                in_flight: in_flight.clone(),
                share: 1.0 / workers as f64,
                phase: index as f64 / workers as f64,
                stop: generator.stop.clone(),
            };
            // The runtime is built in its thread: one dropped here, inside `loadtest`'s own
            // runtime, would panic.
            let thread = std::thread::Builder::new()
                .name(format!("generator-{index}"))
                .spawn(move || {
                    if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        runtime.block_on(worker.serve(rx));
                    }
                })
                .context("failed to start a generator thread")?;
            generator.orders.push(tx);
            generator.threads.push(thread);
        }
        Ok(generator)
    }

    /// How many threads share the load.
    pub fn workers(&self) -> usize {
        self.threads.len()
    }

    /// Offers `scenario`'s mix at `rate` from `offset` to `offset + length` into the run, each
    /// operation started at its intended time, and returns when every worker has offered its
    /// share (operations may still be in flight: they carry on into the next call).
    ///
    /// # Errors
    /// A worker thread that died (it panicked): the run's figures would be missing its share.
    pub async fn drive(
        &self,
        scenario: &Arc<Scenario>,
        rate: Rate,
        offset: Duration,
        length: Duration,
        bar: &indicatif::ProgressBar,
    ) -> anyhow::Result<()> {
        let mut waiting = Vec::new();
        for orders in &self.orders {
            let (done, finished) = oneshot::channel();
            let order = Order::Drive {
                scenario: scenario.clone(),
                rate: rate.clone(),
                offset,
                length,
                done,
            };
            orders.send(order).ok().context("a generator thread died")?;
            waiting.push(finished);
        }
        // The progress line, redrawn once a second (not per operation) with the whole rate.
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        for finished in waiting {
            tokio::pin!(finished);
            loop {
                tokio::select! {
                    done = &mut finished => {
                        done.ok().context("a generator thread died")?;
                        break;
                    }
                    _ = ticker.tick() => {
                        let at = self.started.elapsed().clamp(offset, offset + length);
                        bar.set_position(at.as_secs());
                        bar.set_message(format!(
                            "{:.0} ops/s offered, {} in flight",
                            rate(at),
                            self.bound.saturating_sub(self.in_flight.available_permits())
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the operations in flight, then abandons the rest.
    pub async fn drain(&self, timeout: Duration) {
        let mut waiting = Vec::new();
        for orders in &self.orders {
            let (done, finished) = oneshot::channel();
            if orders.send(Order::Drain(timeout, done)).is_ok() {
                waiting.push(finished);
            }
        }
        for finished in waiting {
            let _ = finished.await;
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        // Cancelling ends a stage being driven; closing the channels then ends each worker's
        // loop, and its runtime drops what it had in flight.
        self.stop.cancel();
        self.orders.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One generator thread's state.
struct Worker {
    run: Arc<Run>,
    http: Http,
    in_flight: Arc<Semaphore>,
    /// This worker's share of the offered rate.
    share: f64,
    /// This worker's place among the workers (`index / workers`). The stage's operations,
    /// due at 0, 1/rate, 2/rate, … from its start, are dealt out in turn: worker i takes
    /// operations i, i + n, i + 2n, … So the workers' operations interleave instead of
    /// leaving together, and together they offer every operation due before the stage ends:
    /// ⌈rate × length⌉ for a constant rate, however few.
    phase: f64,
    stop: CancellationToken,
}

impl Worker {
    async fn serve(self, mut orders: mpsc::UnboundedReceiver<Order>) {
        let worker = Arc::new(self);
        let mut tasks = JoinSet::new();
        while let Some(order) = orders.recv().await {
            match order {
                Order::Drive {
                    scenario,
                    rate,
                    offset,
                    length,
                    done,
                } => {
                    worker
                        .drive(&scenario, &*rate, offset, length, &mut tasks)
                        .await;
                    let _ = done.send(());
                }
                Order::Drain(timeout, done) => {
                    let drained = tokio::time::timeout(timeout, async {
                        while tasks.join_next().await.is_some() {}
                    });
                    tokio::select! {
                        _ = drained => {}
                        () = worker.stop.cancelled() => {}
                    }
                    tasks.abort_all();
                    let _ = done.send(());
                }
            }
        }
    }

    /// Offers this worker's share of `rate` from `offset` to `offset + length` into the run.
    async fn drive(
        self: &Arc<Self>,
        scenario: &Scenario,
        rate: &(dyn Fn(Duration) -> f64 + Send + Sync),
        offset: Duration,
        length: Duration,
        tasks: &mut JoinSet<()>,
    ) {
        let run = &self.run;
        let total_weight = scenario.total_weight();
        let mut t = offset.as_secs_f64();
        let end = (offset + length).as_secs_f64();
        // Each operation is due when the offered rate, integrated since the last one, reaches
        // 1, in steps of at most 10 ms: a stage's rate takes effect at its first instant,
        // however slow the stage before it.
        // Worker i's first operation is the stage's i-th, due after i/n of its own share.
        let mut credit = 1.0 - self.phase;
        // Operations started since this thread last waited: behind schedule it never sleeps,
        // and on a current-thread runtime its own requests would not run until it did.
        let mut unyielded = 0u32;
        // An operation due at the stage's end belongs to the next stage: the stage is the
        // half-open [offset, end), and a nanosecond covers the sums' rounding (operations
        // are at least a microsecond apart: at most 1,000,000/s).
        let end = end - 1e-9;
        loop {
            while credit < 1.0 && t < end {
                let per_sec = rate(Duration::from_secs_f64(t)) * self.share;
                let dt = if per_sec > 0.0 {
                    ((1.0 - credit) / per_sec).min(0.01)
                } else {
                    0.01
                };
                credit += per_sec * dt;
                t += dt;
            }
            if t >= end {
                break;
            }
            credit -= 1.0;
            let at = Duration::from_secs_f64(t);
            // A timer only when the operation is a millisecond or more ahead (tokio's timers
            // tick in milliseconds): at tens of thousands a second, one per operation is what
            // would limit the generator.
            if at > run.started.elapsed() + Duration::from_millis(1) {
                tokio::select! {
                    () = tokio::time::sleep_until((run.started + at).into()) => {}
                    () = self.stop.cancelled() => return,
                }
                unyielded = 0;
            } else if unyielded >= 16 {
                tokio::task::yield_now().await;
                if self.stop.is_cancelled() {
                    return;
                }
                unyielded = 0;
            }
            unyielded += 1;
            // A generator that starts an operation late understates the server's latency for
            // it; the report says how often and by how much.
            let late = run.started.elapsed().saturating_sub(at);
            let op = scenario.pick(rand::random_range(0..total_weight));
            let permit = self.in_flight.clone().try_acquire_owned();
            {
                let mut recorder = run.recorder.lock().unwrap();
                recorder.offered(at);
                if late > Duration::from_millis(50) {
                    recorder.late += 1;
                    recorder.latest = recorder.latest.max(late);
                }
                if permit.is_err() {
                    recorder.dropped += 1;
                    recorder.finished(op, at, Duration::ZERO, Some("dropped".into()));
                }
            }
            if let Ok(permit) = permit {
                let worker = self.clone();
                tasks.spawn(async move {
                    let _permit = permit;
                    let run = &worker.run;
                    let error = run.operation(&worker.http, op).await.err();
                    let latency = run.started.elapsed().saturating_sub(at);
                    run.recorder
                        .lock()
                        .unwrap()
                        .finished(op, at, latency, error);
                });
            }
            // Reap what finished, so the set stays small.
            while tasks.try_join_next().is_some() {}
        }
    }
}
