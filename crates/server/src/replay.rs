//! Crash replay: bring the tree up to the journal's head.
//!
//! Records after the applied marker are applied in [`Mode::Exact`]: the one
//! that was in flight may already show its effect (skipped), the rest find
//! their pre-state. Data records at or before the marker but after the last
//! checkpoint are redone in [`Mode::RedoData`], because file data is not
//! ordered with the marker after a machine crash; pwrite, truncate and
//! fallocate are idempotent when redone in order.

use crate::counters::Counters;
use crate::tree::{Mode, Outcome, Tree};
use izo_journal::{Payload, Store, StoredRecord};
use izo_proto::{ObjectId, Op, Origin, Seq};
use std::collections::HashMap;

/// Result of a replay: the last seq applied, and records left unapplied
/// after an inconsistency (the volume stays read-only while any remain).
pub(crate) struct Replayed {
    pub applied: Seq,
    pub left: Vec<StoredRecord>,
    /// The marker replay started from: pending records at or below it are
    /// data redos.
    pub marked: Seq,
}

pub(crate) fn replay(store: &Store, tree: &mut Tree, marked: Seq, counters: &Counters) -> Result<Replayed, String> {
    let ckpt = store.checkpoint().map_err(|e| e.to_string())?;
    let head = store.head();
    let marked = marked.max(ckpt).min(head);
    if ckpt < head {
        tracing::info!("replaying journal: data records {}..={marked}, all records {}..={head}", ckpt + 1, marked + 1);
    }
    // A direct append fdatasyncs its file before its commit, and happens
    // only when everything before it is applied, so the file's earlier data
    // records are durable: redoing them would destroy the appended bytes,
    // which no record holds. The append may itself lie past the marker.
    let mut last_direct: HashMap<ObjectId, Seq> = HashMap::new();
    let mut next = ckpt + 1;
    loop {
        let recs = store.records_from(next, 1024).map_err(|e| e.to_string())?;
        let Some(last) = recs.last().map(|r| r.record.seq) else { break };
        for r in &recs {
            if let (Op::Write { id, .. }, Payload::Direct(_)) = (&r.record.op, r.payload) {
                last_direct.insert(*id, r.record.seq);
            }
            // Likewise a change made in the export: no record holds its bytes.
            if let (Origin::Local, Some(id)) = (r.record.origin, r.record.op.data_target()) {
                last_direct.insert(id, r.record.seq);
            }
        }
        next = last + 1;
    }
    let mut next = ckpt + 1;
    loop {
        let recs = store.records_from(next, 1024).map_err(|e| e.to_string())?;
        let Some(last) = recs.last().map(|r| r.record.seq) else { break };
        for (i, rec) in recs.iter().enumerate() {
            let seq = rec.record.seq;
            let mode = if seq > marked {
                Mode::Exact
            } else if let Some(id) = rec.record.op.data_target() {
                if last_direct.get(&id).is_some_and(|&d| seq <= d) {
                    continue;
                }
                Mode::RedoData
            } else {
                continue;
            };
            match tree.apply(rec, mode) {
                Ok(Outcome::Applied) => Counters::add(&counters.replayed, 1),
                Ok(Outcome::Skipped) => Counters::add(&counters.replay_skipped, 1),
                Err(e) => {
                    tracing::error!("replay stopped: {e}; the volume stays read-only");
                    // Keep only what still needs doing: the failed record, later
                    // data redos under the marker, and everything past it.
                    let mut left: Vec<StoredRecord> = recs[i..].to_vec();
                    left.extend(store.records_from(last + 1, usize::MAX).map_err(|e| e.to_string())?);
                    left.retain(|r| r.record.seq > marked || r.record.op.data_target().is_some());
                    return Ok(Replayed { applied: seq.saturating_sub(1).max(marked), left, marked });
                }
            }
        }
        next = last + 1;
    }
    Ok(Replayed { applied: head, left: Vec::new(), marked })
}
