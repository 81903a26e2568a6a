//! The wire and disk types as format 1 stored them (the cache database,
//! the CML log and journal records written before format 2). Frozen: never
//! edit these; each converts into today's type, and an upgrade on open
//! rewrites what it finds with today's types.

use crate::ids::{ObjectId, Seq, Timestamp};
use crate::msg::Origin;
use serde::{Deserialize, Serialize};

/// Kind of a file-system object.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Unix socket node.
    Socket,
}

/// Data and meta versions of an object (journal seqs of its last changes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default, Serialize, Deserialize)]
pub struct Versions {
    /// Seq of the last content change.
    pub data: Seq,
    /// Seq of the last attribute or xattr change.
    pub meta: Seq,
}

/// Replicated attributes of an object, as the server's metadata holds them.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Attr {
    /// Object identity.
    pub id: ObjectId,
    /// Object kind.
    pub kind: FileKind,
    /// Permission bits (07777).
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Size in bytes (target length for symlinks).
    pub size: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// Number of names (hard links); directories count their subdirectories.
    pub nlink: u32,
    /// Current versions.
    pub versions: Versions,
}

/// How a rename treats an existing target.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum RenameMode {
    /// Replace the target if present (plain rename(2)).
    Replace,
    /// Fail if the target exists (RENAME_NOREPLACE).
    NoReplace,
    /// Swap source and target atomically (RENAME_EXCHANGE).
    Exchange,
}

/// An object named in a precondition, at the versions the client last saw.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Expect {
    /// The object the name must point to.
    pub id: ObjectId,
    /// Versions the client based its op on (`0` = none seen yet).
    pub base: Versions,
}

/// Attributes to change in a setattr; `None` leaves one as it is.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct SetAttrs {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New modification time (explicit utimens values replicate verbatim).
    pub mtime: Option<Timestamp>,
}

/// A mutation of the volume. Each variant carries its precondition
/// (see DESIGN "Versions and preconditions").
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Op {
    /// Create an empty regular file; precondition: `name` absent in `parent`.
    Create { parent: ObjectId, name: Vec<u8>, id: ObjectId, mode: u32, uid: u32, gid: u32 },
    /// Create a directory; precondition: `name` absent.
    Mkdir { parent: ObjectId, name: Vec<u8>, id: ObjectId, mode: u32, uid: u32, gid: u32 },
    /// Create a symlink; precondition: `name` absent.
    Symlink { parent: ObjectId, name: Vec<u8>, id: ObjectId, target: Vec<u8>, uid: u32, gid: u32 },
    /// Create a fifo or socket node; precondition: `name` absent.
    Mknod { parent: ObjectId, name: Vec<u8>, id: ObjectId, kind: FileKind, mode: u32, uid: u32, gid: u32 },
    /// Add a name for an existing non-directory; precondition: `name` absent.
    Link { id: ObjectId, parent: ObjectId, name: Vec<u8> },
    /// Remove a non-directory name; precondition: name → `expect` at its versions.
    Unlink { parent: ObjectId, name: Vec<u8>, expect: Expect },
    /// Remove an empty directory; precondition: name → `expect` at its versions.
    Rmdir { parent: ObjectId, name: Vec<u8>, expect: Expect },
    /// Rename; precondition: source → `expect`, target absent or → `target`.
    Rename {
        parent: ObjectId,
        name: Vec<u8>,
        expect: Expect,
        new_parent: ObjectId,
        new_name: Vec<u8>,
        target: Option<Expect>,
        mode: RenameMode,
    },
    /// Write bytes at an offset; precondition: data version = `base`.
    Write {
        id: ObjectId,
        base: Seq,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Set the size; precondition: data version = `base`.
    Truncate { id: ObjectId, base: Seq, size: u64 },
    /// Allocate a range (fallocate mode 0, may extend the size).
    Allocate { id: ObjectId, base: Seq, offset: u64, len: u64 },
    /// Deallocate a range, keeping the size (FALLOC_FL_PUNCH_HOLE).
    PunchHole { id: ObjectId, base: Seq, offset: u64, len: u64 },
    /// Change attributes; precondition: meta version = `base`.
    SetAttr { id: ObjectId, base: Seq, attrs: SetAttrs },
    /// Set an extended attribute; precondition: meta version = `base`.
    SetXattr {
        id: ObjectId,
        base: Seq,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Remove an extended attribute; precondition: meta version = `base`.
    RemoveXattr { id: ObjectId, base: Seq, name: Vec<u8> },
}

impl From<FileKind> for crate::FileKind {
    fn from(k: FileKind) -> Self {
        match k {
            FileKind::File => crate::FileKind::File,
            FileKind::Dir => crate::FileKind::Dir,
            FileKind::Symlink => crate::FileKind::Symlink,
            FileKind::Fifo => crate::FileKind::Fifo,
            FileKind::Socket => crate::FileKind::Socket,
        }
    }
}

impl From<Versions> for crate::Versions {
    fn from(v: Versions) -> Self {
        crate::Versions { data: v.data, meta: v.meta }
    }
}

impl From<Attr> for crate::Attr {
    fn from(a: Attr) -> Self {
        crate::Attr {
            id: a.id,
            kind: a.kind.into(),
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            mtime: a.mtime,
            // (format 1 kept no atime: the mtime is the best there is)
            atime: a.mtime,
            nlink: a.nlink,
            versions: a.versions.into(),
            // format 1 made no device nodes
            rdev: 0,
        }
    }
}

impl From<RenameMode> for crate::RenameMode {
    fn from(m: RenameMode) -> Self {
        match m {
            RenameMode::Replace => crate::RenameMode::Replace,
            RenameMode::NoReplace => crate::RenameMode::NoReplace,
            RenameMode::Exchange => crate::RenameMode::Exchange,
        }
    }
}

impl From<Expect> for crate::Expect {
    fn from(e: Expect) -> Self {
        crate::Expect { id: e.id, base: e.base.into() }
    }
}

impl From<SetAttrs> for crate::SetAttrs {
    fn from(a: SetAttrs) -> Self {
        crate::SetAttrs { mode: a.mode, uid: a.uid, gid: a.gid, mtime: a.mtime, atime: None }
    }
}

impl From<Op> for crate::Op {
    fn from(op: Op) -> Self {
        use crate::Op as N;
        match op {
            Op::Create { parent, name, id, mode, uid, gid } => N::Create { parent, name, id, mode, uid, gid },
            Op::Mkdir { parent, name, id, mode, uid, gid } => N::Mkdir { parent, name, id, mode, uid, gid },
            Op::Symlink { parent, name, id, target, uid, gid } => N::Symlink { parent, name, id, target, uid, gid },
            Op::Mknod { parent, name, id, kind, mode, uid, gid } => {
                N::Mknod { parent, name, id, kind: kind.into(), mode, uid, gid, rdev: 0 }
            }
            Op::Link { id, parent, name } => N::Link { id, parent, name },
            Op::Unlink { parent, name, expect } => N::Unlink { parent, name, expect: expect.into() },
            Op::Rmdir { parent, name, expect } => N::Rmdir { parent, name, expect: expect.into() },
            Op::Rename { parent, name, expect, new_parent, new_name, target, mode } => N::Rename {
                parent,
                name,
                expect: expect.into(),
                new_parent,
                new_name,
                target: target.map(Into::into),
                mode: mode.into(),
            },
            Op::Write { id, base, offset, data } => N::Write { id, base, offset, data },
            Op::Truncate { id, base, size } => N::Truncate { id, base, size },
            Op::Allocate { id, base, offset, len } => N::Allocate { id, base, offset, len },
            Op::PunchHole { id, base, offset, len } => N::PunchHole { id, base, offset, len },
            Op::SetAttr { id, base, attrs } => N::SetAttr { id, base, attrs: attrs.into() },
            Op::SetXattr { id, base, name, value } => N::SetXattr { id, base, name, value },
            Op::RemoveXattr { id, base, name } => N::RemoveXattr { id, base, name },
        }
    }
}

/// A journal record as format 1 (and record row version 2) stored it.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Record {
    /// Journal seq.
    pub seq: Seq,
    /// Origin of the change.
    pub origin: Origin,
    /// Server time of the change.
    pub time: Timestamp,
    /// The op as applied.
    pub op: Op,
    /// Attributes of the main object after the op.
    pub attr: Option<Attr>,
    /// Length of a write whose bytes are not in the record.
    pub elided: u64,
    /// Attributes after the op of the directories whose entries it changed.
    pub dirs: Vec<Attr>,
}

impl From<Record> for crate::Record {
    fn from(r: Record) -> Self {
        crate::Record {
            seq: r.seq,
            origin: r.origin,
            time: r.time,
            op: r.op.into(),
            attr: r.attr.map(Into::into),
            elided: r.elided,
            dirs: r.dirs.into_iter().map(Into::into).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_format_1_op_decodes_as_today_s_op_of_the_same_meaning() {
        let old = Op::Mknod {
            parent: ObjectId(1),
            name: b"p".to_vec(),
            id: ObjectId(2),
            kind: FileKind::Fifo,
            mode: 0o600,
            uid: 3,
            gid: 4,
        };
        let bytes = postcard::to_allocvec(&old).expect("encodes");
        let back: Op = postcard::from_bytes(&bytes).expect("decodes");
        let now: crate::Op = back.into();
        assert!(matches!(
            now,
            crate::Op::Mknod { kind: crate::FileKind::Fifo, mode: 0o600, uid: 3, gid: 4, rdev: 0, .. }
        ));
        assert!(postcard::from_bytes::<crate::Op>(&bytes).is_err(), "today's mknod carries rdev");
        let t = Timestamp { secs: 5, nsec: 6 };
        let versions = Versions { data: 7, meta: 8 };
        let a = Attr {
            id: ObjectId(2),
            kind: FileKind::Fifo,
            mode: 0o600,
            uid: 3,
            gid: 4,
            size: 0,
            mtime: t,
            nlink: 1,
            versions,
        };
        let b = postcard::to_allocvec(&a).expect("encodes");
        let up: crate::Attr = postcard::from_bytes::<Attr>(&b).expect("decodes").into();
        assert_eq!((up.kind, up.rdev, up.mtime), (crate::FileKind::Fifo, 0, t));
    }
}
