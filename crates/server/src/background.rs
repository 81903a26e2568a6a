//! Work kept off the ack path, on its own thread: checkpoints (syncfs, then
//! the durable mark), retention, and rehashing stale blocks of quiet files.

use crate::counters::Counters;
use crate::volume::Tuning;
use crate::{hash, sys};
use izo_journal::Store;
use izo_proto::{ObjectId, Seq, Timestamp};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

/// A job for the background thread.
pub(crate) enum Job {
    /// Make everything applied through this seq durable and mark it, with
    /// the time (ns) before which every out-of-band change is journaled.
    Checkpoint(Seq, i64),
    /// Recompute stale block hashes of a file.
    Rehash(ObjectId),
}

pub(crate) struct Background {
    pub store: Arc<Store>,
    pub root: OwnedFd,
    pub counters: Arc<Counters>,
    pub tuning: Tuning,
    /// Highest seq durably checkpointed (read by the actor to drop stage files).
    pub checkpointed: Arc<AtomicU64>,
    /// With out-of-band capture, rehashed blocks go to the actor, which
    /// stores them only if no local change of the file is queued (the hashes
    /// could describe that change, which would then go unjournaled).
    pub results: Option<mpsc::Sender<crate::volume::Work>>,
}

impl Background {
    /// Start the thread; it ends once every sender is dropped.
    pub(crate) fn spawn(self) -> std::io::Result<(mpsc::Sender<Job>, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel();
        let join = std::thread::Builder::new().name("izo-background".into()).spawn(move || self.run(rx))?;
        Ok((tx, join))
    }

    fn run(self, rx: mpsc::Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            match job {
                Job::Checkpoint(seq, settled) => self.checkpoint(seq, settled),
                Job::Rehash(id) => {
                    let done = match &self.results {
                        None => hash::rehash(&self.store, self.root.as_fd(), id),
                        Some(tx) => hash::compute(&self.store, self.root.as_fd(), id).map(|r| {
                            if let Some((version, blocks)) = r {
                                let _ = tx.send(crate::volume::Work::Hashes { id, version, blocks });
                            }
                        }),
                    };
                    if let Err(e) = done {
                        tracing::debug!("rehash of {id} deferred: {e}");
                    }
                }
            }
        }
    }

    fn checkpoint(&self, seq: Seq, settled: i64) {
        if seq <= self.checkpointed.load(Ordering::Acquire) {
            return;
        }
        if let Err(e) = sys::syncfs(self.root.as_fd()) {
            return tracing::error!("syncfs of the export failed: {e}");
        }
        Counters::add(&self.counters.fsyncs, 1);
        if let Err(e) = self.store.set_checkpoint(seq, settled) {
            return tracing::error!("writing checkpoint failed: {e}");
        }
        Counters::add(&self.counters.fsyncs, 1);
        self.retention();
        // (after retention: the actor waits on this while over the limit)
        self.checkpointed.store(seq, Ordering::Release);
    }

    /// Drop the oldest records beyond the count, age or size limits
    /// (never past the checkpoint; a subscriber behind gets a snapshot).
    /// Over the size limit, the journal goes down to three quarters of it:
    /// the rest is room for what is recorded until the next checkpoint and
    /// for the pages just freed, which redb reuses only after the next
    /// durable commit.
    fn retention(&self) {
        let head = self.store.head();
        let mut through = head.saturating_sub(self.tuning.retain_records);
        let held = self.store.held_bytes().unwrap_or(0);
        let mut excess = if held > self.tuning.retain_bytes { held - self.tuning.retain_bytes / 4 * 3 } else { 0 };
        let now = Timestamp::now().secs;
        let age = self.tuning.retain_age.as_secs() as i64;
        let walked = self.store.retained_from().and_then(|from| {
            self.store.walk_oldest(from, |seq, size, time| {
                if excess == 0 && now - time.secs <= age {
                    return false;
                }
                excess = excess.saturating_sub(size);
                through = through.max(seq);
                true
            })
        });
        if let Err(e) = walked {
            tracing::warn!("reading the journal for retention failed: {e}");
        }
        if through > 0 {
            if let Err(e) = self.store.prune(through) {
                tracing::warn!("pruning the journal failed: {e}");
            }
        }
    }
}
