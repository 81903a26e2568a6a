//! Mutations and their preconditions, object attributes, and op errors.

use crate::ids::{ObjectId, Seq, Timestamp};
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

impl Op {
    /// The object a data or attribute op changes (`None` for entry ops).
    pub fn changed_object(&self) -> Option<ObjectId> {
        self.data_target().or(match self {
            Op::SetAttr { id, .. } | Op::SetXattr { id, .. } | Op::RemoveXattr { id, .. } => Some(*id),
            _ => None,
        })
    }

    /// The file whose content a data op (write, truncate, allocate,
    /// punch-hole) changes.
    pub fn data_target(&self) -> Option<ObjectId> {
        match self {
            Op::Write { id, .. } | Op::Truncate { id, .. } | Op::Allocate { id, .. } | Op::PunchHole { id, .. } => {
                Some(*id)
            }
            _ => None,
        }
    }

    /// The object a create-type op (create, mkdir, symlink, mknod) makes.
    pub fn new_object(&self) -> Option<ObjectId> {
        match self {
            Op::Create { id, .. } | Op::Mkdir { id, .. } | Op::Symlink { id, .. } | Op::Mknod { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// Short name of the op kind, for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Mkdir { .. } => "mkdir",
            Op::Symlink { .. } => "symlink",
            Op::Mknod { .. } => "mknod",
            Op::Link { .. } => "link",
            Op::Unlink { .. } => "unlink",
            Op::Rmdir { .. } => "rmdir",
            Op::Rename { .. } => "rename",
            Op::Write { .. } => "write",
            Op::Truncate { .. } => "truncate",
            Op::Allocate { .. } => "allocate",
            Op::PunchHole { .. } => "punch-hole",
            Op::SetAttr { .. } => "setattr",
            Op::SetXattr { .. } => "setxattr",
            Op::RemoveXattr { .. } => "removexattr",
        }
    }
}

/// What an applied mutation returns: the attributes of the objects it touched.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Applied {
    /// Journal seq the op was recorded at.
    pub seq: Seq,
    /// Server time stamped on the op (implicit mtimes take this value).
    pub time: Timestamp,
    /// Attributes after the op of the main object (absent after a removal).
    pub attr: Option<Attr>,
}

/// Why an op or query failed. Conflicts carry the current state.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, thiserror::Error)]
pub enum OpError {
    /// The precondition did not hold; `current` is what the server has now.
    #[error("conflict: {reason}")]
    Conflict {
        /// Which part of the precondition failed.
        reason: String,
        /// Current attributes of the object in question, if it exists.
        current: Option<Attr>,
    },
    /// No such object or name.
    #[error("not found: {0}")]
    NotFound(String),
    /// The op is malformed (bad name, kind mismatch, cycle, ...).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The token does not allow this.
    #[error("permission denied: {0}")]
    Denied(String),
    /// Directory not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// Transient failure (space, I/O); retry later.
    #[error("transient: {0}")]
    Transient(String),
    /// The volume is read-only after a failed apply or replay.
    #[error("volume is read-only: {0}")]
    ReadOnly(String),
    /// The reply for a resent op is no longer cached.
    #[error("reply for client seq {0} expired")]
    ReplyExpired(u64),
}

/// Check a name: 1–255 bytes, no `/` or NUL, not `.` or `..`.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= 255 && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}
