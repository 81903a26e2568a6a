//! The POSIX namespace rules, said once: which names are valid, what a
//! create, link, remove, rename or setattr may do given the namespace as it
//! is. Pure: no I/O, no clock. Both the server's validation (the `journal`
//! crate) and the client's local validation call these functions; the test
//! model in `testkit` states the same rules on its own, as an oracle.
//!
//! A caller implements [`Namespace`] over what it holds (the journal over
//! its write transaction, the client over its cache) and calls the rules in
//! the order its op needs. Every rule returns an [`OpError`] variant (a
//! refusal) or a [`ConflictKind`] conflict (the namespace moved under the
//! op); conflicts carry [`Namespace::current`] when the view has it.
//!
//! The client's engine can wrap its view in a newtype whose `Error` is its
//! `ReplicaError` (which converts from `OpError`, so the errno follows from
//! the variant): `node` from the cached attributes (`kind`, `nlink`),
//! `is_empty` from `children`, `parent_of` as the view has it.
//!
//! How the client calls each rule, before it edits its cache:
//! - create, mkdir, symlink, mknod: [`name`], then [`create`]; a symlink
//!   also [`symlink_target`]; mknod also [`mknod_kind`] with the volume's
//!   trust from the handshake (skip it before any handshake: the server
//!   decides when the op is sent).
//! - link: [`link`] (`nlink` 0: an open but removed file is `NotFound`).
//! - unlink, rmdir: [`parent_dir`], look the name up (absent: ENOENT), then
//!   [`removable`].
//! - rename: [`rename`], which looks up both names and runs
//!   [`rename_target`], [`rename_cycle`] and [`rename_case`] in the order
//!   Linux does; act on the returned [`RenameCase`] (`Same` changes nothing).
//!   [`ConflictKind::TargetGone`] from it means ENOENT to a local caller.
//! - truncate and other data ops: [`data_target`].
//! - setxattr, removexattr: [`xattr::check`] with the volume's trust (from
//!   the rules the server sent, kept for offline use), then the room one
//!   inode has ([`xattr::fits`]).
//! - setattr: [`setattr`] with the volume's trust (unknown: `true`, the
//!   server's answer then corrects the mode); store the attributes it
//!   returns, not the ones asked for.
//!
//! The journal calls the same rules with its own preconditions (names
//! expected at versions) between them: see `journal/src/exec`.

pub mod xattr;

use crate::ids::ObjectId;
use crate::op::{Attr, ConflictKind, FileKind, OpError, RenameMode, SetAttrs};
use crate::Timestamp;

/// Longest name component, in bytes.
pub const MAX_NAME: usize = 255;

/// Longest symlink target, in bytes (Linux's `PATH_MAX` less the NUL).
pub const MAX_SYMLINK_TARGET: usize = 4095;

/// Most steps of a cycle walk; a deeper tree is taken as a cycle (refused)
/// rather than walked without end.
pub const MAX_DEPTH: usize = 100_000;

/// What a rule needs to know of one object.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Node {
    /// Its kind.
    pub kind: FileKind,
    /// Its number of names (hard links; directories count subdirectories).
    pub nlink: u32,
}

/// A read-only view of a namespace, as the rules need it.
pub trait Namespace {
    /// The caller's error: a failed lookup or a rule's refusal.
    type Error: From<OpError>;

    /// The object `name` in directory `parent` names, if any.
    fn lookup(&self, parent: ObjectId, name: &[u8]) -> Result<Option<ObjectId>, Self::Error>;

    /// Kind and link count of an object, `None` if it does not exist.
    fn node(&self, id: ObjectId) -> Result<Option<Node>, Self::Error>;

    /// Whether directory `dir` has no entries.
    fn is_empty(&self, dir: ObjectId) -> Result<bool, Self::Error>;

    /// The directory holding the one name of directory `dir` (`None` for
    /// the root, or when the view does not know).
    fn parent_of(&self, dir: ObjectId) -> Result<Option<ObjectId>, Self::Error>;

    /// Current attributes of an object, attached to a conflict answer.
    fn current(&self, _id: ObjectId) -> Option<Attr> {
        None
    }
}

fn conflict<N: Namespace>(ns: &N, kind: ConflictKind, id: Option<ObjectId>) -> N::Error {
    OpError::conflict(kind, id.and_then(|id| ns.current(id))).into()
}

fn quoted(name: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(name))
}

/// A name component: 1–255 bytes, no `/` or NUL, not `.` or `..`.
/// Too long is `NameTooLong` (ENAMETOOLONG), anything else `BadName`.
pub fn name(name: &[u8]) -> Result<(), OpError> {
    if name.len() > MAX_NAME {
        return Err(OpError::NameTooLong);
    }
    if name.is_empty() || name == b"." || name == b".." || name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(OpError::BadName(quoted(name)));
    }
    Ok(())
}

/// A symlink target: 1–4095 bytes without NUL (Linux refuses an empty one
/// with ENOENT and a longer one with ENAMETOOLONG before any file system).
pub fn symlink_target(target: &[u8]) -> Result<(), OpError> {
    if target.is_empty() || target.len() > MAX_SYMLINK_TARGET || target.contains(&0) {
        return Err(OpError::Invalid("symlink target must be 1–4095 bytes without NUL".into()));
    }
    Ok(())
}

/// Which kinds mknod makes: fifos and sockets, device nodes only on a
/// trusted volume (an untrusted one would hand its users every device).
pub fn mknod_kind(kind: FileKind, trusted: bool) -> Result<(), OpError> {
    match kind {
        FileKind::Fifo | FileKind::Socket => Ok(()),
        FileKind::BlockDev | FileKind::CharDev if trusted => Ok(()),
        FileKind::BlockDev | FileKind::CharDev => {
            Err(OpError::NotPermitted("device nodes are made only on a trusted volume (izo serve --trusted)".into()))
        }
        _ => Err(OpError::Invalid("mknod makes only fifos, sockets and device nodes".into())),
    }
}

/// The directory an op works in: gone is a conflict (another replica
/// removed it), a non-directory is `NotDir`.
pub fn parent_dir<N: Namespace>(ns: &N, parent: ObjectId) -> Result<(), N::Error> {
    match ns.node(parent)? {
        None => Err(conflict(ns, ConflictKind::ParentGone, None)),
        Some(n) if n.kind != FileKind::Dir => Err(OpError::NotDir(format!("{parent}")).into()),
        Some(_) => Ok(()),
    }
}

/// A new name: valid, in an existing directory, not taken.
pub fn create<N: Namespace>(ns: &N, parent: ObjectId, new_name: &[u8]) -> Result<(), N::Error> {
    name(new_name)?;
    parent_dir(ns, parent)?;
    match ns.lookup(parent, new_name)? {
        Some(other) => Err(conflict(ns, ConflictKind::NameExists, Some(other))),
        None => Ok(()),
    }
}

/// A hard link: never to a directory (EPERM), never to an object with no
/// name left (an open but removed file: ENOENT), then as [`create`].
pub fn link<N: Namespace>(ns: &N, id: ObjectId, parent: ObjectId, new_name: &[u8]) -> Result<(), N::Error> {
    name(new_name)?;
    match ns.node(id)? {
        None => return Err(conflict(ns, ConflictKind::ObjectGone, None)),
        Some(n) if n.kind == FileKind::Dir => {
            return Err(OpError::NotPermitted("cannot hard-link a directory".into()).into())
        }
        Some(n) if n.nlink == 0 => return Err(OpError::NotFound(format!("object {id} has no name left")).into()),
        Some(_) => {}
    }
    parent_dir(ns, parent)?;
    match ns.lookup(parent, new_name)? {
        Some(other) => Err(conflict(ns, ConflictKind::NameExists, Some(other))),
        None => Ok(()),
    }
}

/// Removing object `id` by one of its names: unlink wants a non-directory
/// (`IsDir`), rmdir a directory (`NotDir`) with no entries (`NotEmpty`).
/// `what` names it in messages.
pub fn removable<N: Namespace>(ns: &N, id: ObjectId, dir: bool, what: &[u8]) -> Result<(), N::Error> {
    let Some(node) = ns.node(id)? else {
        return Err(conflict(ns, ConflictKind::ObjectGone, None));
    };
    match (dir, node.kind == FileKind::Dir) {
        (true, false) => Err(OpError::NotDir(quoted(what)).into()),
        (false, true) => Err(OpError::IsDir(quoted(what)).into()),
        (true, true) if !ns.is_empty(id)? => Err(OpError::NotEmpty.into()),
        _ => Ok(()),
    }
}

/// What a rename does once every rule holds.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RenameCase {
    /// Both names are of one object: rename(2) changes nothing.
    Same,
    /// The target name is free: the source moves there.
    Move,
    /// The target's object loses that name to the source.
    Replace(ObjectId),
    /// The two names swap objects (RENAME_EXCHANGE).
    Exchange(ObjectId),
}

/// The rename mode against the target name: NOREPLACE refuses an existing
/// one (`NameExists`, even for the same object, as Linux does), EXCHANGE a
/// missing one (`TargetGone`).
pub fn rename_target<N: Namespace>(ns: &N, mode: RenameMode, existing: Option<ObjectId>) -> Result<(), N::Error> {
    match (mode, existing) {
        (RenameMode::NoReplace, Some(t)) => Err(conflict(ns, ConflictKind::NameExists, Some(t))),
        (RenameMode::Exchange, None) => Err(conflict(ns, ConflictKind::TargetGone, None)),
        _ => Ok(()),
    }
}

/// Whether `at` is directory `dir` or lies below it, walking up through
/// [`Namespace::parent_of`] at most [`MAX_DEPTH`] steps (past that: yes).
pub fn within<N: Namespace>(ns: &N, at: ObjectId, dir: ObjectId) -> Result<bool, N::Error> {
    let mut cur = at;
    for _ in 0..MAX_DEPTH {
        if cur == dir {
            return Ok(true);
        }
        match ns.parent_of(cur)? {
            Some(up) if up != cur => cur = up,
            _ => return Ok(false),
        }
    }
    Ok(true)
}

/// The cycle rule: a directory never moves below itself. `src` leaves
/// `parent` for `new_parent`; exchanged, `target` makes the opposite move.
pub fn rename_cycle<N: Namespace>(
    ns: &N,
    src: ObjectId,
    (parent, new_parent): (ObjectId, ObjectId),
    target: Option<ObjectId>,
    mode: RenameMode,
) -> Result<(), N::Error> {
    let is_dir = |id| -> Result<bool, N::Error> { Ok(ns.node(id)?.is_some_and(|n| n.kind == FileKind::Dir)) };
    if is_dir(src)? && within(ns, new_parent, src)? {
        return Err(conflict(ns, ConflictKind::Cycle, None));
    }
    if let (Some(t), RenameMode::Exchange) = (target, mode) {
        if t != src && is_dir(t)? && within(ns, parent, t)? {
            return Err(conflict(ns, ConflictKind::Cycle, None));
        }
    }
    Ok(())
}

/// The kinds rule of a rename onto `target`: a replaced directory takes
/// only a directory (`NotDir`) and must be empty (`NotEmpty`); a replaced
/// non-directory takes only a non-directory (`IsDir`). An exchange swaps
/// any two kinds. `what` names the target in messages.
pub fn rename_case<N: Namespace>(
    ns: &N,
    src: ObjectId,
    target: Option<ObjectId>,
    mode: RenameMode,
    what: &[u8],
) -> Result<RenameCase, N::Error> {
    let Some(t) = target else {
        return Ok(RenameCase::Move);
    };
    if t == src {
        return Ok(RenameCase::Same);
    }
    if mode == RenameMode::Exchange {
        return Ok(RenameCase::Exchange(t));
    }
    let kind = |id| -> Result<FileKind, N::Error> {
        ns.node(id)?.map(|n| n.kind).ok_or_else(|| conflict(ns, ConflictKind::ObjectGone, None))
    };
    let (src_dir, t_dir) = (kind(src)? == FileKind::Dir, kind(t)? == FileKind::Dir);
    let what = format!("rename target {}", quoted(what));
    match (src_dir, t_dir) {
        (false, true) => Err(OpError::IsDir(what).into()),
        (true, false) => Err(OpError::NotDir(what).into()),
        (true, true) if !ns.is_empty(t)? => Err(OpError::NotEmpty.into()),
        _ => Ok(RenameCase::Replace(t)),
    }
}

/// What [`rename`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Rename {
    /// The object the source name names.
    pub src: ObjectId,
    /// What the rename does.
    pub case: RenameCase,
}

/// Every rule of a rename, for a caller with no preconditions of its own
/// (the client): names, both parents, the source present (`NotFound`), then
/// [`rename_target`], [`rename_cycle`] and [`rename_case`] in that order.
pub fn rename<N: Namespace>(
    ns: &N,
    (parent, old): (ObjectId, &[u8]),
    (new_parent, new): (ObjectId, &[u8]),
    mode: RenameMode,
) -> Result<Rename, N::Error> {
    name(old)?;
    name(new)?;
    parent_dir(ns, parent)?;
    parent_dir(ns, new_parent)?;
    let Some(src) = ns.lookup(parent, old)? else {
        return Err(OpError::NotFound(quoted(old)).into());
    };
    let target = ns.lookup(new_parent, new)?;
    rename_target(ns, mode, target)?;
    rename_cycle(ns, src, (parent, new_parent), target, mode)?;
    let case = rename_case(ns, src, target, mode, new)?;
    Ok(Rename { src, case })
}

/// Content changes (write, truncate, allocate, punch-hole) are for regular
/// files: a directory is `IsDir` (EISDIR), any other kind `Invalid` (EINVAL),
/// as truncate(2) answers.
pub fn data_target(id: ObjectId, kind: FileKind) -> Result<(), OpError> {
    match kind {
        FileKind::File => Ok(()),
        FileKind::Dir => Err(OpError::IsDir(format!("{id}"))),
        _ => Err(OpError::Invalid(format!("{id} is not a regular file"))),
    }
}

/// A time every exported file system can store (ext4's range):
/// 1901-12-13 to 2446-05-10, nanoseconds below one second.
pub fn storable_time(t: Timestamp) -> bool {
    (-(1i64 << 31)..=15_032_385_535).contains(&t.secs) && t.nsec <= 999_999_999
}

/// The setattr rules per kind, returning the attributes as they apply.
/// Every kind takes an owner and times (lchown and utimensat with
/// AT_SYMLINK_NOFOLLOW work on a symlink); a symlink has no mode of its
/// own (Linux refuses a mode change on a symlink inode with EOPNOTSUPP);
/// a directory and a device node take everything a file does. Times must be
/// storable ([`storable_time`]). An untrusted volume keeps no set-id bits,
/// but a directory's setgid (it only passes a group on).
pub fn setattr(kind: FileKind, attrs: &SetAttrs, trusted: bool) -> Result<SetAttrs, OpError> {
    let mut out = attrs.clone();
    if let Some(mode) = attrs.mode {
        if kind == FileKind::Symlink {
            return Err(OpError::Unsupported("symlinks have no mode of their own".into()));
        }
        let strip = match (trusted, kind) {
            (true, _) => 0,
            (false, FileKind::Dir) => 0o4000,
            (false, _) => 0o6000,
        };
        out.mode = Some(mode & 0o7777 & !strip);
    }
    if attrs.mtime.is_some_and(|t| !storable_time(t)) {
        return Err(OpError::Invalid("mtime outside 1901-12-13..2446-05-10".into()));
    }
    if attrs.atime.is_some_and(|t| !storable_time(t)) {
        return Err(OpError::Invalid("atime outside 1901-12-13..2446-05-10".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
