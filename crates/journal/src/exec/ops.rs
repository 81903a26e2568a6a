//! Per-op validation and metadata updates.

use super::*;

/// Mark the blocks a change touched as stale: the changed range, and when
/// the size moved, every block between the old and the new end (a grown
/// file's new blocks and the old last block change length).
fn mark_stale(row: &mut ObjectRow, old_size: u64, offset: u64, len: u64) {
    let nblocks = row.size.div_ceil(BLOCK_SIZE);
    if len > 0 {
        add_range(&mut row.stale, offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE);
    }
    if old_size != row.size && nblocks > 0 {
        add_range(&mut row.stale, old_size.min(row.size) / BLOCK_SIZE, nblocks - 1);
    }
    // blocks past the end are gone
    row.stale.retain(|r| r.0 < nblocks);
    for r in &mut row.stale {
        r.1 = r.1.min(nblocks.saturating_sub(1));
    }
}

/// Insert `[first, last]` into sorted disjoint ranges, merging neighbours.
pub(crate) fn add_range(ranges: &mut Vec<(u64, u64)>, first: u64, last: u64) {
    let (mut lo, mut hi) = (first, last);
    ranges.retain(|&(a, b)| {
        let touches = a <= hi.saturating_add(1) && lo <= b.saturating_add(1);
        if touches {
            lo = lo.min(a);
            hi = hi.max(b);
        }
        !touches
    });
    let at = ranges.partition_point(|r| r.0 < lo);
    ranges.insert(at, (lo, hi));
}

impl Batch<'_> {
    /// `offset + len`, refused past what the export's file system can hold.
    fn end_within_limits(&self, offset: u64, len: u64) -> R<u64> {
        let max = self.store.max_file_size.load(std::sync::atomic::Ordering::Relaxed);
        match offset.checked_add(len) {
            Some(end) if end <= max => Ok(end),
            _ => Err(OpError::FileTooBig { max }),
        }
    }

    /// Will the object's extended attributes, with `name` set to a value of
    /// `len` bytes, fit in one inode of the export? (The kernel would refuse
    /// at apply otherwise.)
    fn xattr_fits(&self, id: ObjectId, name: &[u8], len: usize) -> R<()> {
        let room = self.store.xattr_room.load(std::sync::atomic::Ordering::Relaxed);
        let t = self.tx.open_table(XATTRS).map_err(db)?;
        let (lo, hi) = prefix_range(id);
        let mut others = Vec::new();
        for row in t.range(lo.as_slice()..hi.as_slice()).map_err(db)? {
            let (k, v) = row.map_err(db)?;
            others.push((k.value()[16..].to_vec(), v.value().len()));
        }
        let taken = super::xattr::room_taken(others.iter().map(|(n, l)| (n.as_slice(), *l)), name, len);
        super::xattr::fits(taken, room, id)
    }

    /// Reserve room for `bytes` of new data, or refuse before the ack: a full
    /// disk is a transient error, never a failed apply.
    fn take_space(&self, bytes: u64) -> R<()> {
        let budget = &self.store.space_budget;
        let ok = budget.fetch_update(std::sync::atomic::Ordering::AcqRel, std::sync::atomic::Ordering::Acquire, |b| {
            b.checked_sub(bytes)
        });
        ok.map(drop).map_err(|_| OpError::NoSpace("the export's file system is full; free space and retry".into()))
    }

    pub(super) fn exec_op(&mut self, cx: &Cx, op: &Op) -> R<Out> {
        match op {
            Op::Create { parent, name, id, mode, uid, gid } => {
                let row = new_row(FileKind::File, *mode, *uid, *gid, cx.obj_mtime(), cx.who, cx.seq);
                self.create_common(cx, *parent, name, *id, row)
            }
            Op::Mkdir { parent, name, id, mode, uid, gid } => {
                let row = new_row(FileKind::Dir, *mode, *uid, *gid, cx.obj_mtime(), cx.who, cx.seq);
                self.create_common(cx, *parent, name, *id, row)
            }
            Op::Symlink { parent, name, id, target, uid, gid } => {
                rules::symlink_target(target)?;
                let mut row = new_row(FileKind::Symlink, 0o777, *uid, *gid, cx.obj_mtime(), cx.who, cx.seq);
                row.size = target.len() as u64;
                row.target = Some(target.clone());
                self.create_common(cx, *parent, name, *id, row)
            }
            Op::Mknod { parent, name, id, kind, mode, uid, gid, rdev } => {
                rules::mknod_kind(*kind, self.trusted())?;
                let mut row = new_row(*kind, *mode, *uid, *gid, cx.obj_mtime(), cx.who, cx.seq);
                row.rdev = if kind.is_device() { *rdev } else { 0 };
                self.create_common(cx, *parent, name, *id, row)
            }
            Op::Link { id, parent, name } => self.link(cx, *id, *parent, name),
            Op::Unlink { parent, name, expect } => self.remove(cx, *parent, name, expect, false),
            Op::Rmdir { parent, name, expect } => self.remove(cx, *parent, name, expect, true),
            Op::Rename { parent, name, expect, new_parent, new_name, target, mode } => {
                self.rename(cx, (*parent, name), expect, (*new_parent, new_name), target.as_ref(), *mode)
            }
            Op::Write { id, base, offset, data } => {
                if data.len() > MAX_DATA {
                    return Err(OpError::Invalid(format!("write of {} bytes exceeds {MAX_DATA}", data.len())));
                }
                let len = cx.data_len.unwrap_or(data.len() as u64);
                let end = self.end_within_limits(*offset, len)?;
                self.data_op(cx, *id, *base, len, |row| {
                    let old = row.size;
                    row.size = row.size.max(end);
                    mark_stale(row, old, *offset, len);
                })
            }
            Op::Truncate { id, base, size } => {
                self.end_within_limits(*size, 0)?;
                self.data_op(cx, *id, *base, 0, |row| {
                    let old = row.size;
                    row.size = *size;
                    mark_stale(row, old, 0, 0);
                })
            }
            Op::Allocate { id, base, offset, len } | Op::PunchHole { id, base, offset, len } => {
                if *len == 0 {
                    return Err(OpError::Invalid("empty range".into()));
                }
                let end = self.end_within_limits(*offset, *len)?;
                let grow = matches!(op, Op::Allocate { .. });
                self.data_op(cx, *id, *base, if grow { *len } else { 0 }, |row| {
                    let old = row.size;
                    if grow {
                        row.size = row.size.max(end);
                    }
                    mark_stale(row, old, *offset, *len);
                })
            }
            Op::SetAttr { id, base, attrs } => {
                let out = self.setattr(cx, *id, *base, attrs)?;
                // the kernel drops file capabilities on any chown; so do we
                if attrs.uid.is_some() || attrs.gid.is_some() {
                    let k = xkey(*id, b"security.capability");
                    self.tx.open_table(XATTRS).map_err(db)?.remove(k.as_slice()).map_err(db)?;
                }
                // chmod rewrites an access ACL's owner, group (mask) and other entries
                if let Some(mode) = attrs.mode {
                    let k = xkey(*id, b"system.posix_acl_access");
                    let acl = self
                        .tx
                        .open_table(XATTRS)
                        .map_err(db)?
                        .get(k.as_slice())
                        .map_err(db)?
                        .map(|v| v.value().to_vec());
                    if let Some(acl) = acl {
                        let new = super::xattr::acl_chmod(&acl, mode);
                        self.tx.open_table(XATTRS).map_err(db)?.insert(k.as_slice(), new.as_slice()).map_err(db)?;
                    }
                }
                Ok(out)
            }
            Op::SetXattr { id, base, name, value } => {
                let trusted = self.store.trusted.load(std::sync::atomic::Ordering::Relaxed);
                self.xattr_fits(*id, name, value.len())?;
                let out = self.meta_op(cx, *id, *base, |row| {
                    super::xattr::check(name, Some(value), row.kind, trusted)?;
                    if super::xattr::is_access_acl(name) {
                        row.mode = (row.mode & 0o7000) | super::xattr::acl_mode(value);
                    }
                    Ok(())
                })?;
                let k = xkey(*id, name);
                // An ACL with nothing beyond the mode bits is only a chmod:
                // the kernel keeps no xattr for it, and neither do we.
                if super::xattr::is_access_acl(name) && value.len() == 4 + 3 * 8 {
                    self.tx.open_table(XATTRS).map_err(db)?.remove(k.as_slice()).map_err(db)?;
                } else {
                    self.tx.open_table(XATTRS).map_err(db)?.insert(k.as_slice(), value.as_slice()).map_err(db)?;
                }
                Ok(out)
            }
            Op::RemoveXattr { id, base, name } => {
                let trusted = self.store.trusted.load(std::sync::atomic::Ordering::Relaxed);
                let k = xkey(*id, name);
                let present = self.tx.open_table(XATTRS).map_err(db)?.get(k.as_slice()).map_err(db)?.is_some();
                if !present {
                    return Err(OpError::NotFound(format!("xattr {:?}", String::from_utf8_lossy(name))));
                }
                let out = self.meta_op(cx, *id, *base, |row| super::xattr::check(name, None, row.kind, trusted))?;
                self.tx.open_table(XATTRS).map_err(db)?.remove(k.as_slice()).map_err(db)?;
                Ok(out)
            }
            // (`execute_full` records an append as the write it is placed as)
            Op::Append { .. } => Err(OpError::Invalid("an append is placed before it is executed".into())),
        }
    }

    fn setattr(&mut self, cx: &Cx, id: ObjectId, base: Seq, attrs: &SetAttrs) -> R<Out> {
        let trusted = self.trusted();
        self.meta_op(cx, id, base, |row| {
            let attrs = rules::setattr(row.kind, attrs, trusted)?;
            if let Some(m) = attrs.mode {
                row.mode = m;
            }
            if let Some(u) = attrs.uid {
                row.uid = u;
            }
            if let Some(g) = attrs.gid {
                row.gid = g;
            }
            if let Some(t) = attrs.mtime {
                row.mtime = t;
            }
            if let Some(t) = attrs.atime {
                row.atime = t;
            }
            Ok(())
        })
    }

    /// A content change needing `space` bytes of new room on the export.
    fn data_op(&mut self, cx: &Cx, id: ObjectId, base: Seq, space: u64, f: impl FnOnce(&mut ObjectRow)) -> R<Out> {
        let mut row = self.live_row(id)?;
        rules::data_target(id, row.kind)?;
        if !base_ok(row.versions.data, row.data_writer, row.data_run_start, base, cx.who) {
            return Err(conflict(ConflictKind::DataMoved, Some(row.attr(id))));
        }
        // A change found in the export already has its space.
        if cx.who.is_some() {
            self.take_space(space)?;
        }
        f(&mut row);
        row.mtime = cx.later_than(row.mtime, cx.obj_mtime());
        bump_data(&mut row, cx);
        self.put_row(id, &row)?;
        Ok((Some(row.attr(id)), vec![(id, row.handle)]))
    }

    fn meta_op(&mut self, cx: &Cx, id: ObjectId, base: Seq, f: impl FnOnce(&mut ObjectRow) -> R<()>) -> R<Out> {
        let mut row = self.live_row(id)?;
        if !base_ok(row.versions.meta, row.meta_writer, row.meta_run_start, base, cx.who) {
            return Err(conflict(ConflictKind::MetaMoved, Some(row.attr(id))));
        }
        f(&mut row)?;
        bump_meta(&mut row, cx);
        self.put_row(id, &row)?;
        Ok((Some(row.attr(id)), vec![(id, row.handle)]))
    }

    fn link(&mut self, cx: &Cx, id: ObjectId, parent: ObjectId, name: &[u8]) -> R<Out> {
        rules::link(self, id, parent, name)?;
        let mut row = self.live_row(id)?;
        row.nlink += 1;
        self.put_row(id, &row)?;
        self.add_name(parent, name, id)?;
        let ph = self.touch_dir(cx, parent, 0)?;
        Ok((Some(row.attr(id)), vec![(parent, ph), (id, row.handle)]))
    }

    fn remove(&mut self, cx: &Cx, parent: ObjectId, name: &[u8], expect: &Expect, dir: bool) -> R<Out> {
        rules::name(name)?;
        rules::parent_dir(self, parent)?;
        let mut row = self.check_expect(cx, parent, name, expect)?;
        let id = expect.id;
        rules::removable(self, id, dir, name)?;
        self.drop_name(parent, name, id)?;
        let ph = self.touch_dir(cx, parent, if dir { -1 } else { 0 })?;
        let handle = row.handle.clone();
        row.nlink = row.nlink.saturating_sub(1);
        let attr = if dir || row.nlink == 0 {
            self.remove_object(id)?;
            None
        } else {
            self.put_row(id, &row)?;
            Some(row.attr(id))
        };
        Ok((attr, vec![(parent, ph), (id, handle)]))
    }
}

/// Key of an xattr: object id ‖ name.
pub(crate) fn xkey(id: ObjectId, name: &[u8]) -> Vec<u8> {
    dkey(id, name)
}

#[cfg(test)]
mod tests {
    use super::add_range;
    use crate::Store;
    use izo_proto::{FileKind, ObjectId, Op, OpError, Origin, Timestamp};
    use std::sync::atomic::Ordering;

    fn device(kind: FileKind, name: &[u8]) -> Op {
        let (parent, id) = (ObjectId::ROOT, ObjectId::new());
        Op::Mknod { parent, name: name.to_vec(), id, kind, mode: 0o600, uid: 0, gid: 0, rdev: (7 << 8) | 3 }
    }

    #[test]
    fn device_nodes_are_refused_unless_the_volume_is_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Timestamp { secs: 1_700_000_000, nsec: 0 };
        let store = Store::open(&dir.path().join("volume.redb"), (0, 0, 0o755, t)).expect("open");
        for kind in [FileKind::BlockDev, FileKind::CharDev] {
            let mut b = store.batch().expect("batch");
            let r = b.execute(Origin::Local, &device(kind, b"dev"), t);
            assert!(matches!(r, Err(OpError::NotPermitted(_))), "{kind:?} on an untrusted volume: {r:?}");
        }
        store.trusted.store(true, Ordering::Relaxed);
        let mut b = store.batch().expect("batch");
        let op = device(FileKind::CharDev, b"null");
        let a = b.execute(Origin::Local, &op, t).expect("a trusted volume makes device nodes").attr.expect("attr");
        assert_eq!((a.kind, a.rdev), (FileKind::CharDev, (7 << 8) | 3));
        let id = op.new_object().expect("id");
        assert_eq!(b.object(id).expect("row").rdev, (7 << 8) | 3, "the row keeps the device number");
    }

    #[test]
    fn stale_ranges_stay_sorted_disjoint_and_merged() {
        let mut r = Vec::new();
        for (a, b) in [(5, 6), (1, 1), (8, 9), (7, 7), (3, 3), (2, 2), (20, 30), (0, 0)] {
            add_range(&mut r, a, b);
        }
        assert_eq!(r, vec![(0, 3), (5, 9), (20, 30)]);
        add_range(&mut r, 4, 19);
        assert_eq!(r, vec![(0, 30)]);
    }
}
