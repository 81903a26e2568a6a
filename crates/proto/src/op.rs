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
    /// Block device node (made only on a trusted volume).
    BlockDev,
    /// Character device node (made only on a trusted volume).
    CharDev,
}

impl FileKind {
    /// A block or character device node.
    pub fn is_device(self) -> bool {
        matches!(self, FileKind::BlockDev | FileKind::CharDev)
    }
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
    /// Access time: set at creation and by explicit `utimensat` only
    /// (implicit atimes are not tracked, as with `noatime`).
    pub atime: Timestamp,
    /// Number of names (hard links); directories count their subdirectories.
    pub nlink: u32,
    /// Current versions.
    pub versions: Versions,
    /// Device number of a block or character device node (`st_rdev`, in the
    /// kernel's 32-bit encoding as `stat` and FUSE carry it), 0 otherwise.
    pub rdev: u32,
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
    /// New access time (explicit utimens values replicate verbatim).
    pub atime: Option<Timestamp>,
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
    /// Create a fifo, socket or (on a trusted volume) device node, `rdev`
    /// its device number (0 for fifos and sockets); precondition: `name` absent.
    Mknod { parent: ObjectId, name: Vec<u8>, id: ObjectId, kind: FileKind, mode: u32, uid: u32, gid: u32, rdev: u32 },
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
    /// An O_APPEND write (protocol 6 on). With no precondition: when the
    /// data version is `base` (or this replica's own run, as for a write),
    /// the bytes go at `local_offset`, where the replica put them, so both
    /// layouts stay the same; otherwise at the server's end of file (another
    /// replica appended first: the replica fetches the file again once its
    /// changes are through). Never refused for a moved version; recorded as
    /// the [`Op::Write`] it became, at its placement.
    Append {
        id: ObjectId,
        base: Seq,
        local_offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
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
            Op::Write { id, .. }
            | Op::Append { id, .. }
            | Op::Truncate { id, .. }
            | Op::Allocate { id, .. }
            | Op::PunchHole { id, .. } => Some(*id),
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
            Op::Append { .. } => "append",
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

/// Which part of an op's precondition failed (see DESIGN "Versions and
/// preconditions"). Conflict handling decides on this, never on text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum ConflictKind {
    /// The name a create, link or rename (no-replace) makes exists already.
    NameExists,
    /// The name an unlink, rmdir or rename acts on is gone.
    NameGone,
    /// The name leads to another object than the op expected.
    NameMoved,
    /// The object's data version moved since the op's base.
    DataMoved,
    /// The object's meta version (attributes, xattrs) moved since the base.
    MetaMoved,
    /// An object being removed or replaced changed since the base.
    ObjectChanged,
    /// The object the op changes is gone.
    ObjectGone,
    /// The directory the op works in is gone.
    ParentGone,
    /// A rename target appeared where the op expected none.
    TargetAppeared,
    /// A rename target the op expected is gone.
    TargetGone,
    /// The rename would move a directory below itself (another replica
    /// moved things meanwhile).
    Cycle,
    /// The change was made against a volume the server no longer has (its
    /// state was restored or recreated: a new incarnation). Decided by the
    /// replica, never sent: such a change is parked, not applied blindly.
    VolumeReplaced,
}

impl ConflictKind {
    /// A short phrase for messages.
    pub fn describe(self) -> &'static str {
        match self {
            ConflictKind::NameExists => "name exists",
            ConflictKind::NameGone => "name is gone",
            ConflictKind::NameMoved => "name points to another object",
            ConflictKind::DataMoved => "data changed since base",
            ConflictKind::MetaMoved => "attributes changed since base",
            ConflictKind::ObjectChanged => "object changed since base",
            ConflictKind::ObjectGone => "object is gone",
            ConflictKind::ParentGone => "parent directory is gone",
            ConflictKind::TargetAppeared => "rename target appeared",
            ConflictKind::TargetGone => "rename target is gone",
            ConflictKind::Cycle => "a directory cannot move below itself",
            ConflictKind::VolumeReplaced => "made before the volume was restored or recreated on the server",
        }
    }
}

impl std::fmt::Display for ConflictKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why an op or query failed. Each variant names one outcome a caller may
/// decide on (an errno, a retry, a conflict); the strings only explain.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize, thiserror::Error)]
pub enum OpError {
    /// The precondition did not hold; `current` is what the server has now.
    #[error("conflict: {kind}")]
    Conflict {
        /// Which part of the precondition failed.
        kind: ConflictKind,
        /// Current attributes of the object in question, if it exists.
        current: Option<Attr>,
    },
    /// No such object or name.
    #[error("not found: {0}")]
    NotFound(String),
    /// A directory was needed (a parent, rmdir, a rename over a directory).
    #[error("not a directory: {0}")]
    NotDir(String),
    /// A non-directory was needed (unlink, link, data ops).
    #[error("is a directory: {0}")]
    IsDir(String),
    /// Directory not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// A name longer than 255 bytes.
    #[error("name longer than 255 bytes")]
    NameTooLong,
    /// A name that is not a valid component (empty, `.`, `..`, `/`, NUL,
    /// a reserved name).
    #[error("invalid name: {0}")]
    BadName(String),
    /// A size or range past the largest file the export holds.
    #[error("file too big: the export holds files up to {max} bytes")]
    FileTooBig {
        /// The largest file size of the export.
        max: u64,
    },
    /// The export's file system is full; retry once space is freed.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The extended attributes would not fit in the object's inode.
    #[error("no room for extended attributes: {0}")]
    XattrRoom(String),
    /// Not permitted on this object or volume (device nodes on an
    /// untrusted volume, a hard link to a directory).
    #[error("not permitted: {0}")]
    NotPermitted(String),
    /// Not supported (an xattr namespace that does not replicate, an
    /// attribute a kind does not have).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// The op is malformed (a bad value, an empty range, a used id).
    #[error("invalid: {0}")]
    Invalid(String),
    /// The token does not allow this.
    #[error("permission denied: {0}")]
    Denied(String),
    /// The volume is read-only after a failed apply or replay.
    #[error("volume is read-only: {0}")]
    ReadOnly(String),
    /// The server failed to read or write its export or state; retry later.
    #[error("I/O error: {0}")]
    Io(String),
    /// Any other transient failure (an object that keeps changing, a busy
    /// server); retry later.
    #[error("transient: {0}")]
    Transient(String),
    /// The reply for a resent op is no longer cached.
    #[error("reply for client seq {0} expired")]
    ReplyExpired(u64),
}

impl OpError {
    /// A conflict of `kind` with the server's current attributes.
    pub fn conflict(kind: ConflictKind, current: Option<Attr>) -> OpError {
        OpError::Conflict { kind, current }
    }

    /// Retrying later may succeed without anyone resolving anything.
    pub fn is_transient(&self) -> bool {
        matches!(self, OpError::NoSpace(_) | OpError::Io(_) | OpError::Transient(_))
    }

    /// The refusal of a bad name: too long, or otherwise invalid.
    pub fn bad_name(name: &[u8]) -> OpError {
        if name.len() > 255 {
            OpError::NameTooLong
        } else {
            OpError::BadName(format!("{:?}", String::from_utf8_lossy(name)))
        }
    }
}

/// Check a name: 1–255 bytes, no `/` or NUL, not `.` or `..` (the rule
/// is [`crate::rules::name`]).
pub fn valid_name(name: &[u8]) -> bool {
    crate::rules::name(name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_frame, encode_frame};
    use crate::ServerMsg;

    fn every_error() -> Vec<OpError> {
        let kinds = [
            ConflictKind::NameExists,
            ConflictKind::NameGone,
            ConflictKind::NameMoved,
            ConflictKind::DataMoved,
            ConflictKind::MetaMoved,
            ConflictKind::ObjectChanged,
            ConflictKind::ObjectGone,
            ConflictKind::ParentGone,
            ConflictKind::TargetAppeared,
            ConflictKind::TargetGone,
            ConflictKind::Cycle,
            ConflictKind::VolumeReplaced,
        ];
        let attr = Attr {
            id: ObjectId(7),
            kind: FileKind::File,
            mode: 0o644,
            uid: 1,
            gid: 2,
            size: 3,
            mtime: Timestamp { secs: 4, nsec: 5 },
            atime: Timestamp { secs: 6, nsec: 7 },
            nlink: 1,
            versions: Versions { data: 8, meta: 9 },
            rdev: 0,
        };
        let mut all: Vec<OpError> = kinds.iter().map(|&k| OpError::conflict(k, Some(attr.clone()))).collect();
        let s = || "x".to_string();
        all.extend([
            OpError::NotFound(s()),
            OpError::NotDir(s()),
            OpError::IsDir(s()),
            OpError::NotEmpty,
            OpError::NameTooLong,
            OpError::BadName(s()),
            OpError::FileTooBig { max: 1 << 44 },
            OpError::NoSpace(s()),
            OpError::XattrRoom(s()),
            OpError::NotPermitted(s()),
            OpError::Unsupported(s()),
            OpError::Invalid(s()),
            OpError::Denied(s()),
            OpError::ReadOnly(s()),
            OpError::Io(s()),
            OpError::Transient(s()),
            OpError::ReplyExpired(3),
        ]);
        all
    }

    #[test]
    fn every_op_error_crosses_the_wire_with_its_variant_and_current_attributes() {
        for e in every_error() {
            let msg = ServerMsg::Reply { cseq: 1, result: Err(e.clone()) };
            let f = encode_frame(&msg).expect("a reply always encodes");
            let back: ServerMsg = decode_frame(&f[4..]).expect("decodes");
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn only_space_io_and_transient_errors_are_retried() {
        for e in every_error() {
            let expected = matches!(e, OpError::NoSpace(_) | OpError::Io(_) | OpError::Transient(_));
            assert_eq!(e.is_transient(), expected, "{e:?}");
        }
    }

    #[test]
    fn a_name_over_255_bytes_is_too_long_not_invalid() {
        assert_eq!(OpError::bad_name(&[b'a'; 256]), OpError::NameTooLong);
        assert!(matches!(OpError::bad_name(b".."), OpError::BadName(_)));
    }
}
