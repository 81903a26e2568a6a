//! The one error type of replica operations (the engine's and the shell's).

use crate::cache::CacheError;
use izo_proto::{ConflictKind, OpError};

/// Errors of replica operations. Each variant is one outcome; the mount
/// picks the errno from the variant alone (`izo_fuse::errno`).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// No such inode or name.
    #[error("not found")]
    NotFound,
    /// The name exists.
    #[error("exists")]
    Exists,
    /// Not a directory.
    #[error("not a directory")]
    NotDir,
    /// Is a directory.
    #[error("is a directory")]
    IsDir,
    /// The operation is not permitted on this object.
    #[error("operation not permitted")]
    NotPermitted,
    /// Directory not empty.
    #[error("directory not empty")]
    NotEmpty,
    /// A name longer than 255 bytes.
    #[error("name longer than 255 bytes")]
    NameTooLong,
    /// A size past the largest file the volume holds.
    #[error("file too big (the volume holds files up to {0} bytes)")]
    FileTooBig(u64),
    /// No room (the server's export, or an inode's xattr room).
    #[error("no space: {0}")]
    NoSpace(String),
    /// Malformed request.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Not allowed.
    #[error("denied: {0}")]
    Denied(String),
    /// The volume is read-only.
    #[error("read-only volume: {0}")]
    ReadOnly(String),
    /// Someone else changed the object first.
    #[error("conflict: {0}")]
    Conflict(ConflictKind),
    /// Not connected to the server (an op that needs it fails at once).
    #[error("not connected to the server")]
    NotConnected,
    /// The server did not answer in time or the connection broke meanwhile.
    #[error("server unreachable: {0}")]
    Unreachable(String),
    /// Not supported by this file system.
    #[error("not supported")]
    Unsupported,
    /// No data (or hole) at or after the offset (SEEK_DATA/SEEK_HOLE).
    #[error("no data past the offset")]
    NoData,
    /// The server could not do it now (I/O, an object that keeps changing).
    #[error("transient: {0}")]
    Transient(String),
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl From<OpError> for ReplicaError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::NotFound(_) => ReplicaError::NotFound,
            OpError::NotDir(_) => ReplicaError::NotDir,
            OpError::IsDir(_) => ReplicaError::IsDir,
            OpError::NotEmpty => ReplicaError::NotEmpty,
            OpError::NameTooLong => ReplicaError::NameTooLong,
            OpError::FileTooBig { max } => ReplicaError::FileTooBig(max),
            OpError::NoSpace(m) | OpError::XattrRoom(m) => ReplicaError::NoSpace(m),
            OpError::NotPermitted(_) => ReplicaError::NotPermitted,
            OpError::Unsupported(_) => ReplicaError::Unsupported,
            OpError::BadName(m) | OpError::Invalid(m) => ReplicaError::Invalid(m),
            OpError::Denied(m) => ReplicaError::Denied(m),
            OpError::ReadOnly(m) => ReplicaError::ReadOnly(m),
            OpError::Conflict { kind: ConflictKind::NameExists | ConflictKind::TargetAppeared, .. } => {
                ReplicaError::Exists
            }
            // (a caller waiting for the answer sees what a local file
            // system would: the object or its directory is gone)
            OpError::Conflict {
                kind:
                    ConflictKind::ObjectGone | ConflictKind::ParentGone | ConflictKind::NameGone | ConflictKind::TargetGone,
                ..
            } => ReplicaError::NotFound,
            OpError::Conflict { kind: ConflictKind::Cycle, .. } => {
                ReplicaError::Invalid("a directory cannot move below itself".into())
            }
            OpError::Conflict { kind, .. } => ReplicaError::Conflict(kind),
            OpError::Io(m) | OpError::Transient(m) => ReplicaError::Transient(m),
            e @ OpError::ReplyExpired(_) => ReplicaError::Transient(e.to_string()),
        }
    }
}
