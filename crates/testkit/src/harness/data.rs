//! Content, attribute and xattr changes for the test harness, and the
//! small agreeing tree the difference tests start from.

use super::{check, cpath, Harness};
use crate::tree_digest;
use izo_proto::{Op, SetAttrs, Timestamp};
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};

impl Harness {
    /// A small tree in agreement: a dir, a file and a two-name hard link.
    pub fn small() -> Harness {
        let mut h = Harness::new();
        h.mkdir(b"d", 0o755);
        h.create(b"d/f", 0o644, b"contents");
        h.create(b"g", 0o644, b"same");
        h.link(b"g", b"d/g2");
        h.assert_agree();
        h
    }

    /// Assert the real tree differs from the model, with `field` in the diff.
    pub fn assert_differs(&self, field: &str) {
        let real = tree_digest(self.dir.path()).unwrap();
        let model = self.model.digest();
        assert!(real != model && real.hash() != model.hash());
        let diff = model.diff(&real);
        assert!(diff.iter().any(|l| l.contains(field)), "{field} not in {diff:?}");
    }

    /// Set the real mtime of `rel` back to what the model holds.
    pub fn restamp(&self, rel: &[u8]) {
        let n = &self.model.digest().nodes[rel];
        self.stamp(rel, Timestamp { secs: n.mtime.0, nsec: n.mtime.1 });
    }

    pub fn write(&mut self, rel: &[u8], offset: u64, data: &[u8]) {
        let (id, t) = (self.id(rel), self.tick());
        let f = fs::OpenOptions::new().write(true).open(self.path(rel)).unwrap();
        f.write_all_at(data, offset).unwrap();
        self.stamp(rel, t);
        self.apply(Op::Write { id, base: 0, offset, data: data.to_vec() }, t);
    }

    pub fn truncate(&mut self, rel: &[u8], size: u64) {
        let (id, t) = (self.id(rel), self.tick());
        let f = fs::OpenOptions::new().write(true).open(self.path(rel)).unwrap();
        f.set_len(size).unwrap();
        self.stamp(rel, t);
        self.apply(Op::Truncate { id, base: 0, size }, t);
    }

    /// fallocate mode 0 (`punch == false`) or punch-hole.
    pub fn fallocate(&mut self, rel: &[u8], offset: u64, len: u64, punch: bool) {
        use std::os::fd::AsRawFd;
        let (id, t) = (self.id(rel), self.tick());
        let f = fs::OpenOptions::new().write(true).open(self.path(rel)).unwrap();
        let mode = if punch { libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE } else { 0 };
        // SAFETY: valid open descriptor.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) };
        check(rc, "fallocate");
        self.stamp(rel, t);
        let op =
            if punch { Op::PunchHole { id, base: 0, offset, len } } else { Op::Allocate { id, base: 0, offset, len } };
        self.apply(op, t);
    }

    /// Real chmod / lchown / utimensat for each `Some` field, then SetAttr.
    pub fn setattr(&mut self, rel: &[u8], attrs: SetAttrs) {
        let (id, t) = (self.id(rel), self.tick());
        if attrs.uid.is_some() || attrs.gid.is_some() {
            std::os::unix::fs::lchown(self.path(rel), attrs.uid, attrs.gid).unwrap();
        }
        if let Some(mode) = attrs.mode {
            fs::set_permissions(self.path(rel), fs::Permissions::from_mode(mode)).unwrap();
        }
        if let Some(m) = attrs.mtime {
            self.stamp(rel, m);
        }
        self.apply(Op::SetAttr { id, base: 0, attrs }, t);
    }

    /// lsetxattr; `must` = false tolerates a refusal (the name is then
    /// expected to be left out of digests anyway).
    pub fn setxattr(&mut self, rel: &[u8], name: &[u8], value: &[u8], must: bool) {
        let (id, t) = (self.id(rel), self.tick());
        let (p, n) = (cpath(&self.path(rel)), CString::new(name).unwrap());
        // SAFETY: valid C strings and value buffer.
        let rc = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if must {
            check(rc, "lsetxattr");
        }
        let (name, value) = (name.to_vec(), value.to_vec());
        self.apply(Op::SetXattr { id, base: 0, name, value }, t);
    }

    pub fn removexattr(&mut self, rel: &[u8], name: &[u8]) {
        let (id, t) = (self.id(rel), self.tick());
        let (p, n) = (cpath(&self.path(rel)), CString::new(name).unwrap());
        // SAFETY: valid C strings.
        check(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) }, "lremovexattr");
        self.apply(Op::RemoveXattr { id, base: 0, name: name.to_vec() }, t);
    }
}
