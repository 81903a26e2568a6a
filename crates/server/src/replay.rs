//! Crash replay: re-apply committed records the tree may not show yet.
//! Starts at the applied hint when the machine did not reboot (exact), else
//! at the durable checkpoint; every record is state-checked (see tree).

use crate::counters::Counters;
use crate::tree::{Outcome, Tree};
use izo_journal::{Store, StoredRecord};
use izo_proto::Seq;

/// Result of a replay: the last seq applied, and records left unapplied
/// after an inconsistency (the volume must stay read-only while any remain).
pub(crate) struct Replayed {
    pub applied: Seq,
    pub left: Vec<StoredRecord>,
}

pub(crate) fn replay(
    store: &Store,
    tree: &mut Tree,
    hint: Option<Seq>,
    counters: &Counters,
) -> Result<Replayed, String> {
    let ckpt = store.checkpoint().map_err(|e| e.to_string())?;
    let head = store.head();
    let start = match hint {
        Some(h) if h >= ckpt && h <= head => h,
        _ => ckpt,
    };
    if start < head {
        tracing::info!("replaying journal records {}..={head} (checkpoint {ckpt})", start + 1);
    }
    let mut next = start + 1;
    let mut applied = start;
    loop {
        let recs = store.records_from(next, 1024).map_err(|e| e.to_string())?;
        let Some(last) = recs.last().map(|r| r.record.seq) else { break };
        for (i, rec) in recs.iter().enumerate() {
            match tree.apply(rec, true) {
                Ok(Outcome::Applied) => Counters::add(&counters.replayed, 1),
                Ok(Outcome::Skipped) => Counters::add(&counters.replay_skipped, 1),
                Err(e) => {
                    tracing::error!("replay stopped: {e}; the volume stays read-only");
                    let mut left: Vec<StoredRecord> = recs[i..].to_vec();
                    left.extend(store.records_from(last + 1, usize::MAX).map_err(|e| e.to_string())?);
                    return Ok(Replayed { applied, left });
                }
            }
            applied = rec.record.seq;
        }
        next = last + 1;
    }
    Ok(Replayed { applied, left: Vec::new() })
}
