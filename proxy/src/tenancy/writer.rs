//! The spend writer: requests hand their spend row to a bounded channel and never wait; one
//! background task writes rows in batches (every `proxy_batch_write_at`, or sooner when a batch
//! fills). The writer does not wait on the channel itself: that would wake its thread once per
//! request, and at thousands of requests a second those wakeups cost more than the writes. It
//! sleeps until the interval ends or a batch's worth of rows is queued, then drains the channel. A failed write keeps its rows, in order, in a bounded buffer and retries with backoff,
//! so a database outage loses nothing; shutdown flushes what is left.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sluice_filters::tenancy::{Kind, SpendRow, Store};
use tokio::sync::{mpsc, oneshot};

/// Rows written per transaction.
const BATCH: usize = 1000;
/// Rows the channel holds before a sender has to hand off to a task.
const CHANNEL: usize = 65_536;
/// Rows kept while the database is away; beyond this the oldest are dropped (and counted).
pub const MAX_PENDING: usize = 2_000_000;

/// Rows cross the channel by value: a `Box` made on the request's thread would be freed on
/// the writer's, and the allocator hands such blocks back to the request thread cold.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Row(SpendRow),
    /// A budget period ended: spend back to 0 with the new document, after the rows before it.
    Reset(Kind, String, Value),
    Flush(oneshot::Sender<usize>),
}

/// Boxed on the writer's own thread: while the database is away millions may wait here.
enum Op {
    Row(Box<SpendRow>),
    Reset(Kind, String, Value),
}

#[derive(Clone)]
pub struct SpendWriter {
    tx: mpsc::Sender<Msg>,
    /// Rows accepted and not yet written (`litellm_in_memory_spend_update_queue_size`).
    pub queued: Arc<AtomicI64>,
    /// Wakes the writer before its interval ends (a full batch, a flush, a reset).
    wake: Arc<tokio::sync::Notify>,
}

impl SpendWriter {
    pub fn start(
        store: Arc<dyn Store>,
        interval: Duration,
        dropped: prometheus::IntCounter,
    ) -> Self {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let queued = Arc::new(AtomicI64::new(0));
        let wake = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(run(
            store,
            rx,
            interval,
            queued.clone(),
            wake.clone(),
            dropped,
        ));
        SpendWriter { tx, queued, wake }
    }

    /// Queues a row without waiting.
    pub fn push(&self, row: SpendRow) {
        let queued = self.queued.fetch_add(1, Ordering::Relaxed) + 1;
        self.send(Msg::Row(row));
        if queued % BATCH as i64 == 0 {
            self.wake.notify_one();
        }
    }

    pub fn reset(&self, kind: Kind, id: String, doc: Value) {
        self.send(Msg::Reset(kind, id, doc));
        self.wake.notify_one();
    }

    fn send(&self, msg: Msg) {
        if let Err(mpsc::error::TrySendError::Full(msg)) = self.tx.try_send(msg) {
            // The writer is behind: hand the row to a task rather than make the request wait.
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
    }

    /// Writes everything queued so far, retrying until `deadline`; returns the rows left
    /// unwritten (0 when all reached the database).
    pub async fn flush(&self, deadline: Duration) -> usize {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).await.is_err() {
            return self.queued.load(Ordering::Relaxed).max(0) as usize;
        }
        self.wake.notify_one();
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(left)) => left,
            _ => self.queued.load(Ordering::Relaxed).max(0) as usize,
        }
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Msg>,
    interval: Duration,
    queued: Arc<AtomicI64>,
    wake: Arc<tokio::sync::Notify>,
    dropped: prometheus::IntCounter,
) {
    let mut pending: VecDeque<Op> = VecDeque::new();
    // One batch's rows, kept between batches: a fresh 1,000-row vector each time is a large
    // allocation the allocator returns to the OS in between, and faults in again.
    let mut batch: Vec<SpendRow> = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::ZERO;
    let mut retry_at = tokio::time::Instant::now();
    loop {
        let mut flush_waiter = None;
        let mut take = |m: Msg, pending: &mut VecDeque<Op>| match m {
            Msg::Row(r) => pending.push_back(Op::Row(Box::new(r))),
            Msg::Reset(k, id, doc) => pending.push_back(Op::Reset(k, id, doc)),
            Msg::Flush(tx) => flush_waiter = Some(tx),
        };
        let tick = tokio::select! {
            _ = wake.notified() => false,
            _ = ticker.tick() => true,
        };
        loop {
            match rx.try_recv() {
                Ok(m) => take(m, &mut pending),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    write_all(&*store, &mut pending, &mut batch, &queued).await;
                    return;
                }
            }
        }
        while pending.len() > MAX_PENDING {
            if let Some(Op::Row(_)) = pending.pop_front() {
                queued.fetch_sub(1, Ordering::Relaxed);
                dropped.inc();
                tracing::error!(
                    "spend buffer full while the database is away: dropped the oldest row"
                );
            }
        }
        if let Some(tx) = flush_waiter {
            // A flush retries until it succeeds or the caller stops waiting.
            while !write_all(&*store, &mut pending, &mut batch, &queued).await && !tx.is_closed() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = tx.send(pending.len());
            continue;
        }
        let due = tick || pending.len() >= BATCH;
        if due && !pending.is_empty() && tokio::time::Instant::now() >= retry_at {
            if write_all(&*store, &mut pending, &mut batch, &queued).await {
                backoff = Duration::ZERO;
            } else {
                backoff = (backoff * 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
                retry_at = tokio::time::Instant::now() + backoff;
            }
        }
    }
}

/// Writes pending operations in order; `false` (with the rest kept) at the first failure.
/// `rows` is scratch space for a batch, empty between calls.
async fn write_all(
    store: &dyn Store,
    pending: &mut VecDeque<Op>,
    rows: &mut Vec<SpendRow>,
    queued: &AtomicI64,
) -> bool {
    while let Some(front) = pending.front() {
        match front {
            Op::Reset(kind, id, doc) => {
                if let Err(e) = store.put_with_spend(*kind, id, 0.0, doc).await {
                    tracing::warn!(error = %e, "budget reset not written yet; will retry");
                    return false;
                }
                pending.pop_front();
            }
            Op::Row(_) => {
                // Rows move out for the write and back in front if it fails (no copies).
                rows.reserve(BATCH.min(pending.len()));
                while rows.len() < BATCH {
                    match pending.pop_front() {
                        Some(Op::Row(r)) => rows.push(*r),
                        Some(other) => {
                            pending.push_front(other);
                            break;
                        }
                        None => break,
                    }
                }
                if let Err(e) = store.write_spend(rows).await {
                    tracing::warn!(error = %e, rows = rows.len(), "spend rows not written yet; kept for retry");
                    for r in rows.drain(..).rev() {
                        pending.push_front(Op::Row(Box::new(r)));
                    }
                    return false;
                }
                queued.fetch_sub(rows.len() as i64, Ordering::Relaxed);
                rows.clear();
            }
        }
    }
    true
}
