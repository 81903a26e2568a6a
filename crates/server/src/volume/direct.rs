//! Direct appends: an append of at least [`DIRECT_MIN`] bytes past a file's
//! committed end is written straight into the file before the commit
//! (fdatasynced with the batch), so sequential writes cost one copy. An
//! intent file lets a restart cut back bytes whose commit never happened.

use super::*;

/// Smallest append that bypasses the journal.
pub(crate) const DIRECT_MIN: usize = 64 << 10;

impl Actor {
    /// An append of at least [`DIRECT_MIN`] bytes beyond a file's committed
    /// end goes straight into the file (fdatasynced before the commit)
    /// instead of through the journal: sequential writes cost one copy.
    pub(super) fn try_direct(
        &mut self,
        b: &mut izo_journal::Batch<'_>,
        m: &Mutation,
        time: Timestamp,
    ) -> Result<Option<MutateResult>, ServerError> {
        let Op::Write { id, offset, data, .. } = &m.op else { return Ok(None) };
        if data.len() < DIRECT_MIN || self.touched.contains(id) || !self.pending.is_empty() {
            return Ok(None);
        }
        let Ok(row) = b.object(*id) else { return Ok(None) };
        if row.kind != FileKind::File || *offset < row.size || row.handle.is_empty() {
            return Ok(None);
        }
        let committed = match self.direct.get(id) {
            Some((_, size, mtime)) => (*size, *mtime),
            None => self.store.object(*id).map(|r| (r.size, r.mtime)).unwrap_or((0, row.mtime)),
        };
        let origin = Origin::Replica(m.replica, m.cseq);
        let place = izo_journal::Payload::Direct(data.len() as u64);
        let applied = match b.execute_stamped_placed(origin, &m.op, time, m.stamp, place) {
            Ok(a) => a,
            Err(e) => return Ok(Some(Err(e))),
        };
        let fd =
            self.tree.direct_fd(*id, &row.handle).map_err(|e| ServerError::io(format!("opening {id} to append"), e))?;
        // Known before the write, so a failure part-way is cut back too.
        self.direct.insert(*id, (fd.clone(), committed.0, committed.1));
        self.tree.direct_write(&fd, *offset, data).map_err(|e| ServerError::io(format!("appending to {id}"), e))?;
        Ok(Some(Ok(applied)))
    }

    /// Cut files back to their committed size after a batch failed.
    pub(super) fn undo_direct(&mut self) {
        for (id, (fd, size, mtime)) in self.direct.drain() {
            let cut = sys::ftruncate(fd.as_fd(), size)
                .and_then(|_| sys::set_mtime_at(fd.as_fd(), b"", (mtime.secs, mtime.nsec)));
            if let Err(e) = cut {
                tracing::error!("cutting uncommitted bytes of {id} failed: {e}; restart the server to repair");
            }
            self.tree.clear_intent(id);
        }
    }
}
