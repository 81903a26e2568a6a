//! Test-only harness: performs each change on a real temp tree with
//! syscalls and feeds the matching [`Op`] to a [`Model`], stamping the
//! mtimes the op semantics prescribe on the real tree.

use crate::{tree_digest, Digest, Model};
use izo_proto::{Expect, FileKind, ObjectId, Op, RenameMode, Timestamp, Versions};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

mod data;

/// A real tree and a model kept in step.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub model: Model,
    pub uid: u32,
    pub gid: u32,
    ids: HashMap<Vec<u8>, ObjectId>,
    clock: i64,
    next_id: u128,
}

fn cpath(p: &std::path::Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn check(rc: libc::c_int, what: &str) {
    assert!(rc == 0, "{what}: {}", std::io::Error::last_os_error());
}

/// Split a relative path into (parent, name).
fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn expect(id: ObjectId) -> Expect {
    Expect { id, base: Versions::default() }
}

impl Harness {
    /// A fresh temp dir and a model whose root attributes are read from it.
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let md = fs::symlink_metadata(dir.path()).unwrap();
        let mtime = Timestamp { secs: md.mtime(), nsec: md.mtime_nsec() as u32 };
        let model = Model::new(md.mode(), md.uid(), md.gid(), mtime);
        // SAFETY: plain id getters.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let ids = HashMap::from([(Vec::new(), ObjectId::ROOT)]);
        Harness { dir, model, uid, gid, ids, clock: 0, next_id: 100 }
    }

    pub fn path(&self, rel: &[u8]) -> PathBuf {
        self.dir.path().join(OsStr::from_bytes(rel))
    }

    pub fn id(&self, rel: &[u8]) -> ObjectId {
        self.ids[rel]
    }

    /// The next server time: strictly increasing, with nanoseconds.
    pub fn tick(&mut self) -> Timestamp {
        self.clock += 1;
        Timestamp { secs: 1_700_000_000 + self.clock, nsec: (self.clock as u32) * 1_000_003 }
    }

    /// Set the real mtime of `rel` (not following symlinks).
    pub fn stamp(&self, rel: &[u8], t: Timestamp) {
        let times = [
            libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
            libc::timespec { tv_sec: t.secs as libc::time_t, tv_nsec: t.nsec as libc::c_long },
        ];
        let p = cpath(&self.path(rel));
        // SAFETY: valid C string and a two-element timespec array.
        let rc = unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
        check(rc, "utimensat");
    }

    pub fn apply(&mut self, op: Op, t: Timestamp) {
        if let Err(e) = self.model.apply(&op, t) {
            panic!("model refused {op:?}: {e}");
        }
    }

    /// Assert the model and the real tree have the same digest.
    pub fn assert_agree(&self) -> Digest {
        let real = tree_digest(self.dir.path()).unwrap();
        let model = self.model.digest();
        assert!(real == model, "model vs real:\n{}", model.diff(&real).join("\n"));
        assert_eq!(real.hash(), model.hash());
        real
    }

    /// Real side of a create op; then register the id and feed `op`.
    fn created(&mut self, rel: &[u8], id: ObjectId, op: Op, t: Timestamp) {
        self.stamp(rel, t);
        self.stamp(split(rel).0, t);
        self.ids.insert(rel.to_vec(), id);
        self.apply(op, t);
    }

    fn fresh(&mut self, rel: &[u8]) -> (ObjectId, Vec<u8>, ObjectId, Timestamp) {
        self.next_id += 1;
        let (parent, name) = split(rel);
        (ObjectId(self.next_id), name.to_vec(), self.id(parent), self.tick())
    }

    pub fn mkdir(&mut self, rel: &[u8], mode: u32) {
        let (id, name, parent, t) = self.fresh(rel);
        fs::create_dir(self.path(rel)).unwrap();
        fs::set_permissions(self.path(rel), fs::Permissions::from_mode(mode)).unwrap();
        let (uid, gid) = (self.uid, self.gid);
        self.created(rel, id, Op::Mkdir { parent, name, id, mode, uid, gid }, t);
    }

    pub fn create(&mut self, rel: &[u8], mode: u32, data: &[u8]) {
        let (id, name, parent, t) = self.fresh(rel);
        fs::File::create(self.path(rel)).unwrap();
        fs::set_permissions(self.path(rel), fs::Permissions::from_mode(mode)).unwrap();
        let (uid, gid) = (self.uid, self.gid);
        self.created(rel, id, Op::Create { parent, name, id, mode, uid, gid }, t);
        if !data.is_empty() {
            self.write(rel, 0, data);
        }
    }

    pub fn symlink(&mut self, rel: &[u8], target: &[u8]) {
        let (id, name, parent, t) = self.fresh(rel);
        std::os::unix::fs::symlink(OsStr::from_bytes(target), self.path(rel)).unwrap();
        let (uid, gid, target) = (self.uid, self.gid, target.to_vec());
        self.created(rel, id, Op::Symlink { parent, name, id, target, uid, gid }, t);
    }

    pub fn mknod(&mut self, rel: &[u8], kind: FileKind, mode: u32) {
        let (id, name, parent, t) = self.fresh(rel);
        if kind == FileKind::Fifo {
            // SAFETY: valid C string.
            check(unsafe { libc::mkfifo(cpath(&self.path(rel)).as_ptr(), 0o600) }, "mkfifo");
        } else {
            drop(std::os::unix::net::UnixListener::bind(self.path(rel)).unwrap());
        }
        fs::set_permissions(self.path(rel), fs::Permissions::from_mode(mode)).unwrap();
        let (uid, gid) = (self.uid, self.gid);
        self.created(rel, id, Op::Mknod { parent, name, id, kind, mode, uid, gid, rdev: 0 }, t);
    }

    pub fn link(&mut self, existing: &[u8], rel: &[u8]) {
        let id = self.id(existing);
        let (_, name, parent, t) = self.fresh(rel);
        fs::hard_link(self.path(existing), self.path(rel)).unwrap();
        self.stamp(split(rel).0, t);
        self.ids.insert(rel.to_vec(), id);
        self.apply(Op::Link { id, parent, name }, t);
    }

    pub fn remove(&mut self, rel: &[u8]) {
        let (_, name, parent, t) = self.fresh(rel);
        let e = expect(self.ids.remove(rel).unwrap());
        let dir = fs::symlink_metadata(self.path(rel)).unwrap().is_dir();
        if dir {
            fs::remove_dir(self.path(rel)).unwrap();
        } else {
            fs::remove_file(self.path(rel)).unwrap();
        }
        self.stamp(split(rel).0, t);
        let op = if dir { Op::Rmdir { parent, name, expect: e } } else { Op::Unlink { parent, name, expect: e } };
        self.apply(op, t);
    }

    /// Rename `from` to `to` (plain rename, or RENAME_EXCHANGE).
    pub fn rename(&mut self, from: &[u8], to: &[u8], mode: RenameMode) {
        let (_, name, parent, t) = self.fresh(from);
        let (_, new_name, new_parent, _) = self.fresh(to);
        let (src, dst) = (self.id(from), self.ids.get(to).copied());
        let (pf, pt) = (cpath(&self.path(from)), cpath(&self.path(to)));
        let flags = match mode {
            RenameMode::Replace => 0,
            RenameMode::NoReplace => libc::RENAME_NOREPLACE,
            RenameMode::Exchange => libc::RENAME_EXCHANGE,
        };
        // SAFETY: valid C strings.
        let rc = unsafe { libc::renameat2(libc::AT_FDCWD, pf.as_ptr(), libc::AT_FDCWD, pt.as_ptr(), flags) };
        check(rc, "renameat2");
        self.stamp(split(from).0, t);
        self.stamp(split(to).0, t);
        // Re-key the harness's path → id map (subtrees move with directories).
        let moved = |p: &[u8], old: &[u8], new: &[u8]| -> Option<Vec<u8>> {
            let rest = p.strip_prefix(old)?;
            (rest.is_empty() || rest[0] == b'/').then(|| [new, rest].concat())
        };
        let swap = mode == RenameMode::Exchange && dst != Some(src);
        if dst != Some(src) {
            let old = std::mem::take(&mut self.ids);
            for (p, id) in old {
                if let Some(np) = moved(&p, from, to) {
                    self.ids.insert(np, id);
                } else if let Some(np) = moved(&p, to, from).filter(|_| swap) {
                    self.ids.insert(np, id);
                } else if moved(&p, to, to).is_none() {
                    self.ids.insert(p, id);
                }
            }
        }
        let (expect, target) = (expect(src), dst.map(expect));
        let op = Op::Rename { parent, name, expect, new_parent, new_name, target, mode };
        self.apply(op, t);
    }
}
