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

/// What waits to be written, in order. Rows wait in chunks of at most [`BATCH`], each written
/// as it stands: a row is moved once, from the channel into its chunk, and never boxed, while
/// an outage can still hold millions without one huge buffer to grow.
enum Op {
    Rows(Vec<SpendRow>),
    Reset(Kind, String, Value),
}

/// The writer's queue: operations in order, with its row count.
#[derive(Default)]
struct Pending {
    ops: VecDeque<Op>,
    rows: usize,
    /// An emptied chunk, kept for the next one: a [`BATCH`]-row vector is a large allocation
    /// that the allocator would return to the OS in between, and fault in again.
    spare: Vec<SpendRow>,
}

impl Pending {
    fn push_row(&mut self, row: SpendRow) {
        self.rows += 1;
        if let Some(Op::Rows(chunk)) = self.ops.back_mut() {
            if chunk.len() < BATCH {
                chunk.push(row);
                return;
            }
        }
        let mut chunk = std::mem::take(&mut self.spare);
        chunk.reserve_exact(BATCH);
        chunk.push(row);
        self.ops.push_back(Op::Rows(chunk));
    }

    /// Drops the oldest rows beyond `max`; how many went.
    fn drop_oldest_beyond(&mut self, max: usize) -> usize {
        let mut dropped = 0;
        while self.rows > max {
            let excess = self.rows - max;
            match self.ops.iter_mut().find(|op| matches!(op, Op::Rows(_))) {
                Some(Op::Rows(chunk)) => {
                    let n = excess.min(chunk.len());
                    chunk.drain(..n);
                    self.rows -= n;
                    dropped += n;
                }
                _ => break,
            }
            self.ops
                .retain(|op| !matches!(op, Op::Rows(c) if c.is_empty()));
        }
        dropped
    }
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
    let mut pending = Pending::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::ZERO;
    let mut retry_at = tokio::time::Instant::now();
    loop {
        let mut flush_waiter = None;
        let mut take = |m: Msg, pending: &mut Pending| match m {
            Msg::Row(r) => pending.push_row(r),
            Msg::Reset(k, id, doc) => pending.ops.push_back(Op::Reset(k, id, doc)),
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
                    write_all(&*store, &mut pending, &queued).await;
                    return;
                }
            }
        }
        let lost = pending.drop_oldest_beyond(MAX_PENDING);
        if lost > 0 {
            queued.fetch_sub(lost as i64, Ordering::Relaxed);
            dropped.inc_by(lost as u64);
            tracing::error!(
                rows = lost,
                "spend buffer full while the database is away: dropped the oldest rows"
            );
        }
        if let Some(tx) = flush_waiter {
            // A flush retries until it succeeds or the caller stops waiting.
            while !write_all(&*store, &mut pending, &queued).await && !tx.is_closed() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = tx.send(pending.rows);
            continue;
        }
        let due = tick || pending.rows >= BATCH;
        if due && !pending.ops.is_empty() && tokio::time::Instant::now() >= retry_at {
            if write_all(&*store, &mut pending, &queued).await {
                backoff = Duration::ZERO;
            } else {
                backoff = (backoff * 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
                retry_at = tokio::time::Instant::now() + backoff;
            }
        }
    }
}

/// Writes pending operations in order; `false` (with the rest kept) at the first failure.
async fn write_all(store: &dyn Store, pending: &mut Pending, queued: &AtomicI64) -> bool {
    while let Some(front) = pending.ops.front_mut() {
        match front {
            Op::Reset(kind, id, doc) => {
                if let Err(e) = store.put_with_spend(*kind, id, 0.0, doc).await {
                    tracing::warn!(error = %e, "budget reset not written yet; will retry");
                    return false;
                }
            }
            Op::Rows(rows) => {
                if let Err(e) = store.write_spend(rows).await {
                    tracing::warn!(error = %e, rows = rows.len(), "spend rows not written yet; kept for retry");
                    return false;
                }
                queued.fetch_sub(rows.len() as i64, Ordering::Relaxed);
                pending.rows -= rows.len();
                rows.clear();
                if pending.spare.capacity() == 0 {
                    pending.spare = std::mem::take(rows);
                }
            }
        }
        pending.ops.pop_front();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: usize) -> SpendRow {
        SpendRow {
            request_id: id.to_string(),
            ..Default::default()
        }
    }

    /// The ids waiting, in order, with `|` where a reset stands.
    fn layout(p: &Pending) -> Vec<String> {
        p.ops
            .iter()
            .flat_map(|op| match op {
                Op::Rows(rows) => rows.iter().map(|r| r.request_id.clone()).collect(),
                Op::Reset(..) => vec!["|".to_string()],
            })
            .collect()
    }

    #[test]
    fn rows_wait_in_order_in_chunks_of_a_batch_around_resets() {
        let mut p = Pending::default();
        for i in 0..BATCH + 2 {
            p.push_row(row(i));
        }
        p.ops
            .push_back(Op::Reset(Kind::Key, "k".into(), Value::Null));
        p.push_row(row(BATCH + 2));
        let sizes: Vec<usize> = p
            .ops
            .iter()
            .map(|op| match op {
                Op::Rows(r) => r.len(),
                Op::Reset(..) => 0,
            })
            .collect();
        assert_eq!(sizes, [BATCH, 2, 0, 1]);
        assert_eq!(p.rows, BATCH + 3);
        let ids = layout(&p);
        let expected: Vec<String> = (0..BATCH + 2)
            .map(|i| i.to_string())
            .chain(["|".to_string(), (BATCH + 2).to_string()])
            .collect();
        assert_eq!(ids, expected);
    }

    #[test]
    fn past_the_limit_the_oldest_rows_go_and_resets_stay() {
        let mut p = Pending::default();
        for i in 0..5 {
            p.push_row(row(i));
        }
        p.ops
            .push_back(Op::Reset(Kind::Key, "k".into(), Value::Null));
        for i in 5..8 {
            p.push_row(row(i));
        }
        assert_eq!(p.drop_oldest_beyond(8), 0);
        assert_eq!(p.drop_oldest_beyond(2), 6);
        assert_eq!(p.rows, 2);
        assert_eq!(layout(&p), ["|", "6", "7"]);
    }
}
