//! Applying committed records in order, moving the applied marker, and the
//! housekeeping between batches.

use super::*;

impl Actor {
    /// Apply records in order; on the first failure keep the rest pending
    /// and turn the volume read-only until a retry succeeds.
    pub(super) fn apply_all(&mut self, records: Vec<StoredRecord>) {
        // Records left from a failed apply or replay are retried state-checked.
        let retry = !self.pending.is_empty();
        self.pending.extend(records);
        while let Some(rec) = self.pending.pop_front() {
            let seq = rec.record.seq;
            // Left over from replay at or below its marker: data redo only.
            let redo = retry && seq <= self.replay_marked;
            // A link, unlink, rmdir or rename can undo the post-state of the
            // records before it, and its own replay needs the marker: mark
            // before and after it. Other records are marked per batch.
            // (a local record describes the tree as it is: nothing to replay)
            let ambiguous = !redo
                && rec.record.origin != Origin::Local
                && matches!(rec.record.op, Op::Link { .. } | Op::Unlink { .. } | Op::Rmdir { .. } | Op::Rename { .. });
            if ambiguous && !self.hint.flush() {
                self.pending.push_front(rec);
                self.shared.readonly.store(true, Ordering::Release);
                return;
            }
            let mode = if redo {
                Mode::RedoData
            } else if retry {
                Mode::Exact
            } else {
                Mode::Normal
            };
            let result = if self.skip_once.remove(&seq) {
                Ok(crate::tree::Outcome::Skipped)
            } else {
                self.tree.apply(&rec, mode)
            };
            match result {
                Ok(_) => {
                    Counters::add(&self.shared.counters.ops_applied, 1);
                    self.note_dirty(&rec);
                    self.hooks.maybe_crash_unmarked(rec.record.op.kind());
                    if ambiguous && !self.hint.set(seq) {
                        self.shared.readonly.store(true, Ordering::Release);
                        return;
                    }
                    self.hint.note(seq);
                }
                Err(e) if self.capturing() && !redo && self.local_change_in_the_way(&rec, &e) => {
                    // retried in Exact mode, after what another program did
                    // was moved aside (or was a removal the op cannot undo)
                    self.pending.push_front(rec);
                    self.apply_all(Vec::new());
                    return;
                }
                Err(e) => {
                    tracing::error!("apply of seq {seq} failed: {e}; volume read-only until it succeeds");
                    self.pending.push_front(rec);
                    self.hint.flush();
                    self.shared.readonly.store(true, Ordering::Release);
                    return;
                }
            }
        }
        let marked = self.hint.flush();
        self.shared.readonly.store(!marked, Ordering::Release);
    }

    /// An apply failed: was another program's change in the way? Moves an
    /// entry it put where the op needs a name aside (journaled later as a
    /// local change); a data op on a file it removed is left undone (the
    /// removal is journaled after it). Returns true if the op can be retried.
    fn local_change_in_the_way(&mut self, rec: &StoredRecord, e: &crate::tree::ApplyError) -> bool {
        if let crate::tree::ApplyError::Io { err, .. } = e {
            if err.raw_os_error() == Some(libc::ESTALE) && rec.record.op.data_target().is_some() {
                tracing::warn!(
                    "seq {}: the file was removed by another program before the {} applied; the removal wins",
                    rec.record.seq,
                    rec.record.op.kind()
                );
                self.skip_once.insert(rec.record.seq);
                return true;
            }
        }
        match self.tree.move_aside(rec) {
            Ok(moved) if !moved.is_empty() => {
                for (dir, name) in moved {
                    tracing::warn!(
                        "seq {}: another program's entry was in the way of a {}; kept as {:?}",
                        rec.record.seq,
                        rec.record.op.kind(),
                        String::from_utf8_lossy(&name)
                    );
                    self.local_moved_aside(dir, name);
                }
                true
            }
            _ => false,
        }
    }

    pub(super) fn note_dirty(&mut self, rec: &StoredRecord) {
        // a local record comes with fresh hashes
        if rec.record.origin == Origin::Local {
            return;
        }
        if let Some(id) = rec.record.op.data_target() {
            self.dirty.insert(id, Instant::now());
        }
    }

    pub(super) fn housekeeping(&mut self) {
        if !self.pending.is_empty() {
            self.apply_all(Vec::new());
            self.applied_tx.send_replace(self.hint.seq());
        }
        let applied = self.hint.seq();
        // Retention prunes only behind a checkpoint, so the journal may not
        // grow more than an eighth of its limit between two of them.
        let written = self.store.journal_written();
        let due = self.last_checkpoint.1.elapsed() >= self.tuning.checkpoint_every
            || written - self.last_checkpoint.2 >= self.tuning.retain_bytes / 8;
        if due && !self.hooks.no_checkpoint && applied > self.last_checkpoint.0 && self.pending.is_empty() {
            self.last_checkpoint = (applied, Instant::now(), written);
            let _ = self.background.send(Job::Checkpoint(applied, self.settled()));
        }
        // Stage files of large writes are needed only until a checkpoint covers them.
        let done = self.checkpointed.load(Ordering::Acquire);
        let stage = self.tree.stage();
        self.staged_writes.retain(|(s, name)| {
            if *s <= done {
                let _ = sys::unlinkat(stage, name, false);
                false
            } else {
                true
            }
        });
        let quiet: Vec<ObjectId> =
            self.dirty.iter().filter(|(_, t)| t.elapsed() >= Duration::from_secs(1)).map(|(id, _)| *id).collect();
        for id in quiet {
            self.dirty.remove(&id);
            let _ = self.background.send(Job::Rehash(id));
        }
    }

    /// While the journal is over its byte limit and a checkpoint (and the
    /// retention after it) is on its way, take no new mutations: writers
    /// wait for the disk rather than grow the state file past its bound.
    pub(super) fn await_retention(&self) {
        if self.hooks.no_checkpoint {
            return;
        }
        let deadline = Instant::now() + RETENTION_WAIT;
        while self.store.held_bytes().unwrap_or(0) > self.tuning.retain_bytes
            && self.checkpointed.load(Ordering::Acquire) < self.last_checkpoint.0
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Longest a batch waits for retention to catch up (a checkpoint can sit
/// behind rehash jobs on the background thread).
const RETENTION_WAIT: Duration = Duration::from_secs(2);
