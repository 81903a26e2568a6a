//! Counters kept from day one, for tests, `izo status` and metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// Server-wide counters.
#[derive(Default, Debug)]
pub struct Counters {
    /// Bytes received from clients (frames, TLS payload).
    pub bytes_in: AtomicU64,
    /// Bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// fsync/syncfs calls made by the server itself (database commits included).
    pub fsyncs: AtomicU64,
    /// Journal records committed.
    pub records: AtomicU64,
    /// Records applied to the tree.
    pub ops_applied: AtomicU64,
    /// Replies answered from the reply cache.
    pub reply_cache_hits: AtomicU64,
    /// Group commits (batches).
    pub batches: AtomicU64,
    /// Records applied during crash replay.
    pub replayed: AtomicU64,
    /// Records found already applied during replay.
    pub replay_skipped: AtomicU64,
    /// Records of changes other programs made in the export.
    pub local_records: AtomicU64,
    /// Scans of the export for such changes completed (start-up, overflow).
    pub scans: AtomicU64,
}

impl Counters {
    /// Add `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// All counters by name.
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("bytes_in".into(), g(&self.bytes_in)),
            ("bytes_out".into(), g(&self.bytes_out)),
            ("fsyncs".into(), g(&self.fsyncs)),
            ("records".into(), g(&self.records)),
            ("ops_applied".into(), g(&self.ops_applied)),
            ("reply_cache_hits".into(), g(&self.reply_cache_hits)),
            ("batches".into(), g(&self.batches)),
            ("replayed".into(), g(&self.replayed)),
            ("replay_skipped".into(), g(&self.replay_skipped)),
            ("local_records".into(), g(&self.local_records)),
            ("scans".into(), g(&self.scans)),
        ]
    }
}
