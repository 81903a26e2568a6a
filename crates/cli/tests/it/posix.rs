//! POSIX conformance of a replicate mount, against ext4 in the same run:
//! one script of steps (prepare some objects, make one call as root or as
//! another user, look at what changed) runs on a loop-mounted ext4 and on
//! the mount, and every step's outcome must be the same on both, unless
//! DESIGN allows a difference, which is written next to the step with the
//! reason. An outcome is the call's result (ok or the errno), which of
//! atime, mtime and ctime moved on the watched objects (the object and its
//! parents), that a created object's times are current, explicit times as
//! read back, and mode, owner and link count once the mount is synced.
//! Also here: ctime kept per replica (issue 12 point 17), explicit atimes
//! replicated and the server's reads leaving them (point 18), st_blocks of
//! sparse files (point 21).

use crate::harness::*;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The kind of volume the mount is of.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vol {
    /// `izo serve --trusted`: set-id bits and device nodes kept.
    Trusted,
    /// The default: set-id bits stripped, device nodes refused.
    Default,
}

/// Who makes the call.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    Root,
    /// uid and gid 65534, no supplementary groups.
    Nobody,
}

/// A time argument of utimensat.
#[derive(Clone, Copy)]
enum T {
    Omit,
    Now,
    At(i64, i64),
}

/// The call a step makes; paths are relative to the step's directory, and
/// `LONG` in a path stands for a 256-byte name.
#[derive(Clone, Copy)]
enum Call {
    Chmod(&'static str, u32),
    /// `u32::MAX` leaves the id (-1).
    Chown(&'static str, u32, u32),
    Link(&'static str, &'static str),
    Mkdir(&'static str, u32),
    Mkfifo(&'static str),
    /// Type bits with the mode (S_IFCHR | 0o600, ...).
    Mknod(&'static str, u32),
    Open(&'static str, i32),
    /// renameat2 flags.
    Rename(&'static str, &'static str, u32),
    Rmdir(&'static str),
    /// Target, link.
    Symlink(&'static str, &'static str),
    Truncate(&'static str, i64),
    Ftruncate(&'static str, i64),
    Unlink(&'static str),
    /// None: a NULL times pointer (both now).
    Utimens(&'static str, Option<(T, T)>),
    /// Write 4 bytes at offset 0.
    Write(&'static str),
    /// Read the file.
    Read(&'static str),
    /// Set `user.test`.
    Setxattr(&'static str),
}

/// What a step prepares, as root, before the timed part of the run.
#[derive(Clone, Copy)]
enum Prep {
    /// A file holding "data", with this mode.
    File(&'static str, u32),
    Dir(&'static str, u32),
    Link(&'static str, &'static str),
    Own(&'static str, u32, u32),
}

/// One step of the script.
#[derive(Clone, Copy)]
struct Step {
    name: &'static str,
    who: Who,
    prep: &'static [Prep],
    call: Call,
    /// Objects whose times are compared before and after the call
    /// (`a>b`: the object at `a` before, at `b` after).
    watch: &'static [&'static str],
    /// An object the call creates: its times must be current.
    new: Option<&'static str>,
    /// An object whose mode, owner and link count are compared once the
    /// mount is synced.
    keep: Option<&'static str>,
    /// What the mount shows instead of ext4, where DESIGN allows it: the
    /// volume kind (None: both), the outcome, and why.
    differs: &'static [(Option<Vol>, &'static str, &'static str)],
}

const D: Step = Step {
    name: "",
    who: Who::Root,
    prep: &[],
    call: Call::Read("f"),
    watch: &[],
    new: None,
    keep: None,
    differs: &[],
};

const F: Prep = Prep::File("f", 0o644);
const NOBODY: u32 = 65534;
const A: T = T::At(1_000_000_000, 123_456_789);
const M: T = T::At(1_100_000_000, 987_654_321);

/// Noatime-like: reads never reach the daemon (passthrough, page cache),
/// so a replica cannot track implicit atimes (DESIGN "Replicated
/// attributes"; docs/design.md).
const NOATIME: &str = "implicit atimes are not tracked (noatime-like, DESIGN)";
/// An untrusted volume strips setuid/setgid of what it stores (DESIGN
/// "Owners").
const STRIPPED: &str = "set-id bits are stripped on an untrusted volume (DESIGN)";
/// An untrusted volume refuses device nodes (DESIGN "Owners").
const NODEV: &str = "device nodes are refused on an untrusted volume (DESIGN)";

fn script() -> Vec<Step> {
    use Call::*;
    use Who::Nobody;
    let sticky: &'static [Prep] = &[Prep::Dir("t", 0o1777), Prep::File("t/f", 0o666)];
    let sticky_own: &'static [Prep] =
        &[Prep::Dir("t", 0o1777), Prep::File("t/f", 0o666), Prep::Own("t/f", NOBODY, NOBODY)];
    let setgid: &'static [Prep] = &[Prep::Dir("g", 0o2775), Prep::Own("g", 0, 100), Prep::Dir("g", 0o2775)];
    let none = libc::O_RDONLY;
    let creat = libc::O_CREAT | libc::O_WRONLY;
    vec![
        // chmod
        Step { name: "chmod a file", prep: &[F], call: Chmod("f", 0o600), watch: &["f", "."], keep: Some("f"), ..D },
        Step {
            name: "chmod a directory",
            prep: &[Prep::Dir("d", 0o755)],
            call: Chmod("d", 0o700),
            watch: &["d", "."],
            keep: Some("d"),
            ..D
        },
        Step { name: "chmod a missing name", call: Chmod("nope", 0o600), ..D },
        Step { name: "chmod through a file", prep: &[F], call: Chmod("f/x", 0o600), ..D },
        Step { name: "chmod a long name", call: Chmod("LONG", 0o600), ..D },
        Step { name: "chmod another's file", who: Nobody, prep: &[F], call: Chmod("f", 0o666), keep: Some("f"), ..D },
        Step {
            name: "chmod setuid",
            prep: &[Prep::File("f", 0o755)],
            call: Chmod("f", 0o4755),
            keep: Some("f"),
            differs: &[(Some(Vol::Default), "ok | f 755 0:0 n1", STRIPPED)],
            ..D
        },
        Step {
            name: "chmod a directory setgid",
            prep: &[Prep::Dir("d", 0o755)],
            call: Chmod("d", 0o2775),
            keep: Some("d"),
            ..D
        },
        // chown
        Step { name: "chown a file", prep: &[F], call: Chown("f", 1, 1), watch: &["f", "."], keep: Some("f"), ..D },
        Step {
            name: "chown to -1:-1",
            prep: &[F],
            call: Chown("f", u32::MAX, u32::MAX),
            watch: &["f"],
            keep: Some("f"),
            ..D
        },
        Step {
            name: "chown clears setuid",
            prep: &[Prep::File("f", 0o4755)],
            call: Chown("f", 1, 1),
            keep: Some("f"),
            ..D
        },
        Step {
            name: "chown another's file",
            who: Nobody,
            prep: &[F],
            call: Chown("f", NOBODY, NOBODY),
            keep: Some("f"),
            ..D
        },
        Step { name: "chown a missing name", call: Chown("nope", 1, 1), ..D },
        Step { name: "chown a long name", call: Chown("LONG", 1, 1), ..D },
        // link
        Step { name: "link a file", prep: &[F], call: Link("f", "g"), watch: &["f", "."], keep: Some("g"), ..D },
        Step {
            name: "link into a subdirectory",
            prep: &[F, Prep::Dir("d", 0o755)],
            call: Link("f", "d/g"),
            watch: &["f", "d", "."],
            ..D
        },
        Step { name: "link over a name", prep: &[F, Prep::File("g", 0o644)], call: Link("f", "g"), ..D },
        Step { name: "link a missing name", call: Link("nope", "g"), ..D },
        Step { name: "link a directory", prep: &[Prep::Dir("d", 0o755)], call: Link("d", "e"), ..D },
        Step { name: "link to a long name", prep: &[F], call: Link("f", "LONG"), ..D },
        Step { name: "link through a file", prep: &[F], call: Link("f", "f/g"), ..D },
        Step {
            name: "link in a directory not writable",
            who: Nobody,
            prep: &[Prep::File("f", 0o666)],
            call: Link("f", "g"),
            ..D
        },
        // mkdir
        Step { name: "mkdir", call: Mkdir("d", 0o777), watch: &["."], new: Some("d"), keep: Some("d"), ..D },
        Step { name: "mkdir over a directory", prep: &[Prep::Dir("d", 0o755)], call: Mkdir("d", 0o755), ..D },
        Step { name: "mkdir over a file", prep: &[F], call: Mkdir("f", 0o755), ..D },
        Step { name: "mkdir in a missing directory", call: Mkdir("no/d", 0o755), ..D },
        Step { name: "mkdir through a file", prep: &[F], call: Mkdir("f/d", 0o755), ..D },
        Step { name: "mkdir a long name", call: Mkdir("LONG", 0o755), ..D },
        Step { name: "mkdir in a directory not writable", who: Nobody, call: Mkdir("d", 0o755), ..D },
        Step { name: "mkdir in a setgid directory", prep: setgid, call: Mkdir("g/d", 0o755), keep: Some("g/d"), ..D },
        // mkfifo
        Step { name: "mkfifo", call: Mkfifo("p"), watch: &["."], new: Some("p"), keep: Some("p"), ..D },
        Step { name: "mkfifo over a file", prep: &[F], call: Mkfifo("f"), ..D },
        Step { name: "mkfifo in a missing directory", call: Mkfifo("no/p"), ..D },
        Step { name: "mkfifo a long name", call: Mkfifo("LONG"), ..D },
        Step { name: "mkfifo in a directory not writable", who: Nobody, call: Mkfifo("p"), ..D },
        // mknod
        Step {
            name: "mknod a fifo",
            call: Mknod("p", libc::S_IFIFO | 0o640),
            watch: &["."],
            new: Some("p"),
            keep: Some("p"),
            ..D
        },
        Step {
            name: "mknod a socket",
            call: Mknod("s", libc::S_IFSOCK | 0o640),
            watch: &["."],
            new: Some("s"),
            keep: Some("s"),
            ..D
        },
        Step {
            name: "mknod a block device",
            call: Mknod("b", libc::S_IFBLK | 0o600),
            watch: &["."],
            new: Some("b"),
            keep: Some("b"),
            differs: &[(Some(Vol::Default), "EPERM | .:--- | b absent", NODEV)],
            ..D
        },
        Step {
            name: "mknod a char device",
            call: Mknod("c", libc::S_IFCHR | 0o600),
            watch: &["."],
            new: Some("c"),
            keep: Some("c"),
            differs: &[(Some(Vol::Default), "EPERM | .:--- | c absent", NODEV)],
            ..D
        },
        Step {
            name: "mknod a char device unprivileged",
            who: Nobody,
            prep: &[Prep::Dir("w", 0o777)],
            call: Mknod("w/c", libc::S_IFCHR | 0o600),
            ..D
        },
        Step { name: "mknod over a file", prep: &[F], call: Mknod("f", libc::S_IFIFO | 0o644), ..D },
        Step { name: "mknod a long name", call: Mknod("LONG", libc::S_IFIFO | 0o644), ..D },
        // open
        Step { name: "open O_CREAT", call: Open("f", creat), watch: &["."], new: Some("f"), keep: Some("f"), ..D },
        Step { name: "open O_CREAT of a file there", prep: &[F], call: Open("f", creat), watch: &["f", "."], ..D },
        Step { name: "open O_CREAT|O_EXCL of a file there", prep: &[F], call: Open("f", creat | libc::O_EXCL), ..D },
        Step {
            name: "open O_TRUNC",
            prep: &[F],
            call: Open("f", libc::O_WRONLY | libc::O_TRUNC),
            watch: &["f", "."],
            ..D
        },
        Step { name: "open a missing name", call: Open("nope", none), ..D },
        Step { name: "open through a file", prep: &[F], call: Open("f/x", none), ..D },
        Step {
            name: "open a directory for writing",
            prep: &[Prep::Dir("d", 0o755)],
            call: Open("d", libc::O_WRONLY),
            ..D
        },
        Step { name: "open O_CREAT a long name", call: Open("LONG", creat), ..D },
        Step { name: "open a long name", call: Open("LONG", none), ..D },
        Step {
            name: "open another's private file",
            who: Nobody,
            prep: &[Prep::File("f", 0o600)],
            call: Open("f", none),
            ..D
        },
        Step { name: "open O_CREAT in a directory not writable", who: Nobody, call: Open("f", creat), ..D },
        Step {
            name: "open O_CREAT in a setgid directory",
            prep: setgid,
            call: Open("g/f", creat),
            keep: Some("g/f"),
            ..D
        },
        // rename
        Step { name: "rename a file", prep: &[F], call: Rename("f", "g", 0), watch: &["f>g", "."], ..D },
        Step {
            name: "rename across directories",
            prep: &[Prep::Dir("a", 0o755), Prep::Dir("b", 0o755), Prep::File("a/f", 0o644)],
            call: Rename("a/f", "b/f", 0),
            watch: &["a/f>b/f", "a", "b", "."],
            ..D
        },
        Step {
            name: "rename over a linked target",
            prep: &[F, Prep::File("t", 0o644), Prep::Link("t", "u")],
            call: Rename("f", "t", 0),
            watch: &["u", "."],
            keep: Some("u"),
            ..D
        },
        Step {
            name: "rename a directory",
            prep: &[Prep::Dir("d", 0o755)],
            call: Rename("d", "e", 0),
            watch: &["d>e", "."],
            ..D
        },
        Step { name: "rename a missing name", call: Rename("nope", "g", 0), ..D },
        Step { name: "rename to a long name", prep: &[F], call: Rename("f", "LONG", 0), ..D },
        Step { name: "rename a long name", call: Rename("LONG", "g", 0), ..D },
        Step {
            name: "rename a directory over a file",
            prep: &[Prep::Dir("d", 0o755), F],
            call: Rename("d", "f", 0),
            ..D
        },
        Step {
            name: "rename a file over a directory",
            prep: &[F, Prep::Dir("d", 0o755)],
            call: Rename("f", "d", 0),
            ..D
        },
        Step {
            name: "rename over a non-empty directory",
            prep: &[Prep::Dir("d", 0o755), Prep::Dir("e", 0o755), Prep::File("e/x", 0o644)],
            call: Rename("d", "e", 0),
            ..D
        },
        Step {
            name: "rename NOREPLACE over a file",
            prep: &[F, Prep::File("g", 0o644)],
            call: Rename("f", "g", libc::RENAME_NOREPLACE),
            ..D
        },
        Step {
            name: "rename a directory under itself",
            prep: &[Prep::Dir("d", 0o755)],
            call: Rename("d", "d/e", 0),
            ..D
        },
        Step { name: "rename in a directory not writable", who: Nobody, prep: &[F], call: Rename("f", "g", 0), ..D },
        Step {
            name: "rename another's file in a sticky directory",
            who: Nobody,
            prep: sticky,
            call: Rename("t/f", "t/g", 0),
            ..D
        },
        Step {
            name: "rename one's own file in a sticky directory",
            who: Nobody,
            prep: sticky_own,
            call: Rename("t/f", "t/g", 0),
            ..D
        },
        // rmdir
        Step { name: "rmdir", prep: &[Prep::Dir("d", 0o755)], call: Rmdir("d"), watch: &["."], ..D },
        Step {
            name: "rmdir a non-empty directory",
            prep: &[Prep::Dir("d", 0o755), Prep::File("d/f", 0o644)],
            call: Rmdir("d"),
            ..D
        },
        Step { name: "rmdir a file", prep: &[F], call: Rmdir("f"), ..D },
        Step { name: "rmdir a missing name", call: Rmdir("nope"), ..D },
        Step { name: "rmdir a long name", call: Rmdir("LONG"), ..D },
        Step {
            name: "rmdir in a directory not writable",
            who: Nobody,
            prep: &[Prep::Dir("d", 0o777)],
            call: Rmdir("d"),
            ..D
        },
        Step {
            name: "rmdir another's directory in a sticky directory",
            who: Nobody,
            prep: &[Prep::Dir("t", 0o1777), Prep::Dir("t/d", 0o777)],
            call: Rmdir("t/d"),
            ..D
        },
        // symlink
        Step { name: "symlink", call: Symlink("target", "l"), watch: &["."], new: Some("l"), ..D },
        Step { name: "symlink over a file", prep: &[F], call: Symlink("target", "f"), ..D },
        Step { name: "symlink in a missing directory", call: Symlink("target", "no/l"), ..D },
        Step { name: "symlink a long name", call: Symlink("target", "LONG"), ..D },
        Step { name: "symlink in a directory not writable", who: Nobody, call: Symlink("target", "l"), ..D },
        // truncate
        Step { name: "truncate shorter", prep: &[F], call: Truncate("f", 2), watch: &["f", "."], ..D },
        Step { name: "truncate longer", prep: &[F], call: Truncate("f", 100_000), watch: &["f"], ..D },
        Step { name: "truncate to the same size", prep: &[F], call: Truncate("f", 4), watch: &["f"], ..D },
        Step { name: "truncate a directory", prep: &[Prep::Dir("d", 0o755)], call: Truncate("d", 0), ..D },
        Step { name: "truncate a missing name", call: Truncate("nope", 0), ..D },
        Step { name: "truncate a long name", call: Truncate("LONG", 0), ..D },
        Step { name: "truncate through a file", prep: &[F], call: Truncate("f/x", 0), ..D },
        Step { name: "truncate another's file", who: Nobody, prep: &[F], call: Truncate("f", 0), ..D },
        Step { name: "truncate beyond the largest file", prep: &[F], call: Truncate("f", 999_999_999_999_999), ..D },
        Step { name: "truncate to a negative size", prep: &[F], call: Truncate("f", -1), ..D },
        // ftruncate
        Step { name: "ftruncate shorter", prep: &[F], call: Ftruncate("f", 2), watch: &["f", "."], ..D },
        Step { name: "ftruncate to the same size", prep: &[F], call: Ftruncate("f", 4), watch: &["f"], ..D },
        Step { name: "ftruncate beyond the largest file", prep: &[F], call: Ftruncate("f", 999_999_999_999_999), ..D },
        // unlink
        Step { name: "unlink", prep: &[F], call: Unlink("f"), watch: &["."], ..D },
        Step {
            name: "unlink one of two links",
            prep: &[F, Prep::Link("f", "g")],
            call: Unlink("f"),
            watch: &["g", "."],
            keep: Some("g"),
            ..D
        },
        Step { name: "unlink a directory", prep: &[Prep::Dir("d", 0o755)], call: Unlink("d"), ..D },
        Step { name: "unlink a missing name", call: Unlink("nope"), ..D },
        Step { name: "unlink a long name", call: Unlink("LONG"), ..D },
        Step { name: "unlink through a file", prep: &[F], call: Unlink("f/x"), ..D },
        Step {
            name: "unlink in a directory not writable",
            who: Nobody,
            prep: &[Prep::File("f", 0o666)],
            call: Unlink("f"),
            ..D
        },
        Step {
            name: "unlink another's file in a sticky directory",
            who: Nobody,
            prep: sticky,
            call: Unlink("t/f"),
            ..D
        },
        Step {
            name: "unlink one's own file in a sticky directory",
            who: Nobody,
            prep: sticky_own,
            call: Unlink("t/f"),
            watch: &["t"],
            ..D
        },
        // utimensat
        Step { name: "utimensat both times", prep: &[F], call: Utimens("f", Some((A, M))), watch: &["f", "."], ..D },
        Step { name: "utimensat atime only", prep: &[F], call: Utimens("f", Some((A, T::Omit))), watch: &["f"], ..D },
        Step { name: "utimensat mtime only", prep: &[F], call: Utimens("f", Some((T::Omit, M))), watch: &["f"], ..D },
        Step { name: "utimensat now", prep: &[F], call: Utimens("f", None), watch: &["f"], ..D },
        Step {
            name: "utimensat atime now",
            prep: &[F],
            call: Utimens("f", Some((T::Now, T::Omit))),
            watch: &["f"],
            ..D
        },
        Step {
            name: "utimensat omitting both",
            prep: &[F],
            call: Utimens("f", Some((T::Omit, T::Omit))),
            watch: &["f"],
            ..D
        },
        Step {
            name: "utimensat a directory",
            prep: &[Prep::Dir("d", 0o755)],
            call: Utimens("d", Some((A, M))),
            watch: &["d", "."],
            ..D
        },
        Step { name: "utimensat a missing name", call: Utimens("nope", None), ..D },
        Step { name: "utimensat a long name", call: Utimens("LONG", None), ..D },
        Step { name: "utimensat now on another's file", who: Nobody, prep: &[F], call: Utimens("f", None), ..D },
        Step {
            name: "utimensat now on another's writable file",
            who: Nobody,
            prep: &[Prep::File("f", 0o666)],
            call: Utimens("f", None),
            watch: &["f"],
            ..D
        },
        Step {
            name: "utimensat times on another's writable file",
            who: Nobody,
            prep: &[Prep::File("f", 0o666)],
            call: Utimens("f", Some((A, M))),
            ..D
        },
        // what else moves times
        Step { name: "write", prep: &[F], call: Write("f"), watch: &["f", "."], ..D },
        Step {
            name: "read",
            prep: &[F],
            call: Read("f"),
            watch: &["f", "."],
            differs: &[(None, "ok | f:--- .:---", NOATIME)],
            ..D
        },
        Step { name: "setxattr", prep: &[F], call: Setxattr("f"), watch: &["f", "."], ..D },
    ]
}

fn long() -> String {
    "n".repeat(256)
}

fn cpath(dir: &Path, p: &str) -> CString {
    let full = dir.join(p.replace("LONG", &long()));
    CString::new(full.as_os_str().as_bytes()).expect("no NUL in a path")
}

fn errno_name(e: i32) -> String {
    let names = [
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EIO, "EIO"),
        (libc::EBADF, "EBADF"),
        (libc::EACCES, "EACCES"),
        (libc::EEXIST, "EEXIST"),
        (libc::EXDEV, "EXDEV"),
        (libc::ENOTDIR, "ENOTDIR"),
        (libc::EISDIR, "EISDIR"),
        (libc::EINVAL, "EINVAL"),
        (libc::EFBIG, "EFBIG"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EROFS, "EROFS"),
        (libc::EMLINK, "EMLINK"),
        (libc::ENAMETOOLONG, "ENAMETOOLONG"),
        (libc::ENOTEMPTY, "ENOTEMPTY"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::ENOTCONN, "ENOTCONN"),
    ];
    names.iter().find(|(n, _)| *n == e).map(|(_, s)| s.to_string()).unwrap_or_else(|| format!("errno {e}"))
}

fn timespec(t: T) -> libc::timespec {
    match t {
        T::Omit => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
        T::Now => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
        T::At(s, n) => libc::timespec { tv_sec: s, tv_nsec: n },
    }
}

/// A call with its paths made ready (nothing is allocated after the fork).
struct Ready {
    call: Call,
    a: CString,
    b: CString,
    times: Option<[libc::timespec; 2]>,
}

impl Ready {
    fn new(dir: &Path, call: Call) -> Ready {
        let (a, b) = match call {
            Call::Link(a, b) | Call::Rename(a, b, _) | Call::Symlink(a, b) => (a, b),
            Call::Chmod(a, _)
            | Call::Chown(a, ..)
            | Call::Mkdir(a, _)
            | Call::Mkfifo(a)
            | Call::Mknod(a, _)
            | Call::Open(a, _)
            | Call::Rmdir(a)
            | Call::Truncate(a, _)
            | Call::Ftruncate(a, _)
            | Call::Unlink(a)
            | Call::Utimens(a, _)
            | Call::Write(a)
            | Call::Read(a)
            | Call::Setxattr(a) => (a, ""),
        };
        // (a symlink's target is stored as given)
        let a = match call {
            Call::Symlink(t, _) => CString::new(t).expect("target"),
            _ => cpath(dir, a),
        };
        let times = match call {
            Call::Utimens(_, Some((x, y))) => Some([timespec(x), timespec(y)]),
            _ => None,
        };
        Ready { call, a, b: cpath(dir, b), times }
    }

    /// Make the call: 0 or the errno. Only syscalls (it runs in a forked
    /// child).
    fn run(&self) -> i32 {
        let (a, b) = (self.a.as_ptr(), self.b.as_ptr());
        let at = libc::AT_FDCWD;
        // SAFETY: NUL-terminated paths and valid buffers, all made before.
        let r = unsafe {
            match self.call {
                Call::Chmod(_, m) => libc::chmod(a, m),
                Call::Chown(_, u, g) => libc::lchown(a, u, g),
                Call::Link(..) => libc::linkat(at, a, at, b, 0),
                Call::Mkdir(_, m) => libc::mkdir(a, m),
                Call::Mkfifo(_) => libc::mkfifo(a, 0o644),
                Call::Mknod(_, m) => libc::mknod(a, m, libc::makedev(1, 7)),
                Call::Open(_, fl) => {
                    let fd = libc::open(a, fl | libc::O_CLOEXEC, 0o644);
                    if fd >= 0 {
                        libc::close(fd);
                    }
                    fd.min(0)
                }
                Call::Rename(_, _, fl) => libc::renameat2(at, a, at, b, fl),
                Call::Rmdir(_) => libc::rmdir(a),
                Call::Symlink(..) => libc::symlink(a, b),
                Call::Truncate(_, n) => libc::truncate(a, n),
                Call::Ftruncate(_, n) => {
                    let fd = libc::open(a, libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return *libc::__errno_location();
                    }
                    let r = libc::ftruncate(fd, n);
                    let e = *libc::__errno_location();
                    libc::close(fd);
                    if r != 0 {
                        return e;
                    }
                    0
                }
                Call::Unlink(_) => libc::unlink(a),
                Call::Utimens(..) => {
                    let t = self.times.as_ref().map(|t| t.as_ptr()).unwrap_or(std::ptr::null());
                    libc::utimensat(at, a, t, 0)
                }
                Call::Write(_) | Call::Read(_) => {
                    let write = matches!(self.call, Call::Write(_));
                    let fd = libc::open(a, if write { libc::O_WRONLY } else { libc::O_RDONLY } | libc::O_CLOEXEC);
                    if fd < 0 {
                        return *libc::__errno_location();
                    }
                    let mut buf = *b"WXYZ";
                    let n = if write {
                        libc::pwrite(fd, buf.as_ptr().cast(), 4, 0)
                    } else {
                        libc::read(fd, buf.as_mut_ptr().cast(), 4)
                    };
                    let e = *libc::__errno_location();
                    libc::close(fd);
                    if n < 0 {
                        return e;
                    }
                    0
                }
                Call::Setxattr(_) => libc::setxattr(a, c"user.test".as_ptr(), b"v".as_ptr().cast(), 1, 0),
            }
        };
        if r == 0 {
            0
        } else {
            // SAFETY: reading this thread's errno.
            unsafe { *libc::__errno_location() }
        }
    }
}

/// Make `r` as `who`: in a forked child that takes the uid (and gid, no
/// groups) first, so the test process keeps root. 0 or the errno.
fn call_as(who: Who, r: &Ready) -> i32 {
    // SAFETY: the child only makes syscalls and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let e = unsafe {
            if who == Who::Nobody
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(NOBODY, NOBODY, NOBODY) != 0
                    || libc::setresuid(NOBODY, NOBODY, NOBODY) != 0)
            {
                250
            } else {
                r.run()
            }
        };
        // SAFETY: leave the child without running the parent's destructors.
        unsafe { libc::_exit(e) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status), "the call's child died: {status}");
    let e = libc::WEXITSTATUS(status);
    assert_ne!(e, 250, "could not become uid {NOBODY}");
    e
}

/// Times of an object (lstat), as (atime, mtime, ctime) in ns.
fn times(p: &Path) -> Option<(i128, i128, i128)> {
    let m = std::fs::symlink_metadata(p).ok()?;
    let ns = |s: i64, n: i64| s as i128 * 1_000_000_000 + n as i128;
    Some((ns(m.atime(), m.atime_nsec()), ns(m.mtime(), m.mtime_nsec()), ns(m.ctime(), m.ctime_nsec())))
}

fn now_ns() -> i128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0)
}

fn prepare(dir: &Path, prep: &[Prep]) {
    std::fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    for p in prep {
        let r = match *p {
            Prep::File(f, mode) => std::fs::write(dir.join(f), b"data")
                .and_then(|()| std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(mode))),
            Prep::Dir(d, mode) => std::fs::create_dir_all(dir.join(d))
                .and_then(|()| std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(mode))),
            Prep::Link(a, b) => std::fs::hard_link(dir.join(a), dir.join(b)),
            Prep::Own(f, u, g) => std::os::unix::fs::lchown(dir.join(f), Some(u), Some(g)),
        };
        r.unwrap_or_else(|e| panic!("preparing {}: {e}", dir.display()));
    }
}

/// Run the timed part of a step on `dir`: its outcome without the part
/// read after syncing.
fn run_step(dir: &Path, s: &Step) -> String {
    let watch: Vec<(PathBuf, PathBuf)> = s
        .watch
        .iter()
        .map(|w| match w.split_once('>') {
            Some((a, b)) => (dir.join(a), dir.join(b)),
            None => (dir.join(w), dir.join(w)),
        })
        .collect();
    let before: Vec<_> = watch.iter().map(|(a, _)| times(a)).collect();
    let ready = Ready::new(dir, s.call);
    let t0 = now_ns();
    let e = call_as(s.who, &ready);
    let t1 = now_ns();
    let mut out = if e == 0 { "ok".to_string() } else { errno_name(e) };
    let mut parts = Vec::new();
    for ((label, (_, after_path)), before) in s.watch.iter().zip(&watch).zip(before) {
        let label = label.split('>').next_back().unwrap_or(label);
        let what = match (before, times(after_path)) {
            (Some(b), Some(a)) => {
                let flag = |x: bool, c: char| if x { c } else { '-' };
                format!("{}{}{}", flag(a.0 != b.0, 'a'), flag(a.1 != b.1, 'm'), flag(a.2 != b.2, 'c'))
            }
            (None, _) => "absent before".into(),
            (_, None) => "gone".into(),
        };
        parts.push(format!("{label}:{what}"));
    }
    if !parts.is_empty() {
        out += &format!(" | {}", parts.join(" "));
    }
    if let (Some(n), 0) = (s.new, e) {
        // (file systems stamp with a coarse clock: a few ms of slack)
        let slack = 20_000_000;
        let current = |t: i128| t >= t0 - slack && t <= t1 + slack;
        let what = match times(&dir.join(n)) {
            Some((a, m, c)) => format!(
                "{}{}{}",
                if current(a) { 'a' } else { '-' },
                if current(m) { 'm' } else { '-' },
                if current(c) { 'c' } else { '-' }
            ),
            None => "absent".into(),
        };
        out += &format!(" | new {n}:{what} current");
    }
    if let (Call::Utimens(p, Some((x, y))), 0) = (s.call, e) {
        let m = std::fs::symlink_metadata(dir.join(p)).ok();
        let mut shown = Vec::new();
        if let (T::At(..), Some(m)) = (x, &m) {
            shown.push(format!("atime {}.{:09}", m.atime(), m.atime_nsec()));
        }
        if let (T::At(..), Some(m)) = (y, &m) {
            shown.push(format!("mtime {}.{:09}", m.mtime(), m.mtime_nsec()));
        }
        if !shown.is_empty() {
            out += &format!(" | {}", shown.join(" "));
        }
    }
    out
}

/// Mode, owner and link count of a step's kept object (after syncing).
fn kept(dir: &Path, s: &Step) -> String {
    let Some(k) = s.keep else { return String::new() };
    match std::fs::symlink_metadata(dir.join(k)) {
        Ok(m) => format!(" | {k} {:o} {}:{} n{}", m.mode() & 0o7777, m.uid(), m.gid(), m.nlink()),
        Err(_) => format!(" | {k} absent"),
    }
}

/// Run the whole script on two trees (the reference first of each step,
/// so both see the same clock), `sync` bringing the second to rest; the
/// outcomes of each.
fn run_script(steps: &[Step], reference: &Path, mount: &Path, sync: &dyn Fn()) -> (Vec<String>, Vec<String>) {
    for root in [reference, mount] {
        for (i, s) in steps.iter().enumerate() {
            prepare(&root.join(format!("s{i:03}")), s.prep);
        }
    }
    sync();
    // every prepared time lies at least a clock tick behind the calls
    std::thread::sleep(Duration::from_millis(30));
    let mut outs = (Vec::new(), Vec::new());
    for (i, s) in steps.iter().enumerate() {
        let d = format!("s{i:03}");
        outs.0.push(run_step(&reference.join(&d), s));
        outs.1.push(run_step(&mount.join(&d), s));
    }
    sync();
    for (i, s) in steps.iter().enumerate() {
        let d = format!("s{i:03}");
        outs.0[i] += &kept(&reference.join(&d), s);
        outs.1[i] += &kept(&mount.join(&d), s);
    }
    outs
}

/// The conformance group on a mount of a `vol` volume.
fn conformance(vol: Vol) {
    sweep_mounts();
    // SAFETY: sets this test process's umask (each test is its own process).
    unsafe { libc::umask(0o022) };
    let ext4 = SmallFs::new(64, &[]);
    let reference = ext4.mnt().join("ref");
    std::fs::create_dir(&reference).expect("reference dir");
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let args: &[&str] = if vol == Vol::Trusted { &["--trusted"] } else { &[] };
    let p = Proc::start_args(&dirs, "127.0.0.1:0", args);
    let m = MountProc::start(&p.addr, &p.fingerprint, &tok);
    let mount = m.mnt.join("ref");
    std::fs::create_dir(&mount).expect("dir in the mount");
    for d in [&reference, &mount] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let mnt = m.mnt.clone();
    let sync = move || {
        izo_out(&["sync".as_ref(), mnt.as_os_str()]);
    };
    let steps = script();
    let (want, got) = run_script(&steps, &reference, &mount, &sync);
    if std::env::var_os("IZO_POSIX_SHOW").is_some() {
        for (s, w) in steps.iter().zip(&want) {
            eprintln!("{:<48} {w}", s.name);
        }
    }
    let mut bad = Vec::new();
    for (s, (w, g)) in steps.iter().zip(want.iter().zip(&got)) {
        let allowed = s.differs.iter().find(|(v, ..)| v.is_none_or(|v| v == vol));
        let (expect, why) = match allowed {
            Some((_, o, why)) => (o.to_string(), format!(" (allowed: {why}; ext4: {w})")),
            None => (w.clone(), String::new()),
        };
        if *g != expect {
            let who = if s.who == Who::Nobody { " as uid 65534" } else { "" };
            bad.push(format!("  {}{who}:\n    want {expect}{why}\n    got  {g}", s.name));
        }
    }
    drop(m);
    assert!(
        bad.is_empty(),
        "{} of {} steps on a {vol:?} volume's mount differ from ext4:\n{}\n(issue 12: times are points 3, 17 \
         and 18, device nodes 15, ENAMETOOLONG 16, EFBIG 19, setgid directories 20)",
        bad.len(),
        steps.len(),
        bad.join("\n")
    );
}

#[test]
fn calls_on_a_trusted_volumes_mount_behave_as_on_ext4() {
    conformance(Vol::Trusted);
}

#[test]
fn calls_on_a_default_volumes_mount_behave_as_on_ext4() {
    conformance(Vol::Default);
}

/// A server (trusted or not) and its temp dirs, with an rw token.
fn served_volume(args: &[&str]) -> (Dirs, Proc, String) {
    sweep_mounts();
    let dirs = Dirs::new();
    let tok = dirs.token(izo_server::auth::Rights::Rw);
    let p = Proc::start_args(&dirs, "127.0.0.1:0", args);
    (dirs, p, tok)
}

fn sync(m: &MountProc) {
    izo_out(&["sync".as_ref(), m.mnt.as_os_str()]);
}

fn ctime_of(p: &Path) -> (i64, i64) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.ctime(), m.ctime_nsec())
}

fn atime_of(p: &Path) -> (i64, i64) {
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
    (m.atime(), m.atime_nsec())
}

/// Issue 12 point 17: st_ctime was st_mtime, so a chmod, chown, link or
/// unlink of one of two links did not move it. Now each replica keeps its
/// own: a local change moves it, a foreign record applied moves it on the
/// replica that applies it, the replica's own echo does not, and it stays
/// what it was across a remount and across a SIGKILL of the daemon.
#[test]
fn ctime_is_kept_per_replica_moved_by_local_changes_and_foreign_records_and_kept_across_remounts() {
    let (_dirs, p, tok) = served_volume(&[]);
    let a = MountProc::start(&p.addr, &p.fingerprint, &tok);
    let b = MountProc::start(&p.addr, &p.fingerprint, &tok);
    let (fa, fb) = (a.mnt.join("f"), b.mnt.join("f"));
    std::fs::write(&fa, b"data").expect("write on A");
    sync(&a);
    sync(&b);
    let (a0, b0) = (ctime_of(&fa), ctime_of(&fb));
    std::thread::sleep(Duration::from_millis(20));
    std::fs::set_permissions(&fa, std::fs::Permissions::from_mode(0o600)).expect("chmod on A");
    let a1 = ctime_of(&fa);
    assert!(a1 > a0, "point 17: a local chmod moves the ctime ({a0:?} -> {a1:?})");
    sync(&a);
    sync(&b);
    assert_eq!(ctime_of(&fa), a1, "point 17: the replica's own echo leaves its ctime");
    let b1 = ctime_of(&fb);
    assert!(b1 > b0, "point 17: a foreign chmod moves the ctime where it is applied ({b0:?} -> {b1:?})");
    // unlink of one of two links
    std::fs::hard_link(&fa, a.mnt.join("g")).expect("link");
    let a2 = ctime_of(&fa);
    assert!(a2 > a1, "point 17: link moves the ctime");
    std::thread::sleep(Duration::from_millis(20));
    std::fs::remove_file(a.mnt.join("g")).expect("unlink");
    let a3 = ctime_of(&fa);
    assert!(a3 > a2, "point 17: unlink of one of two links moves the ctime");
    sync(&a);
    let (mnt, cache) = (a.mnt.clone(), a.cache.clone());
    let mut a = a;
    a.stop();
    let mut a = MountProc::start_at(&p.addr, &p.fingerprint, &tok, &mnt, &cache);
    assert_eq!(ctime_of(&fa), a3, "point 17: the ctime is kept across a remount");
    std::thread::sleep(Duration::from_millis(20));
    std::os::unix::fs::chown(&fa, Some(7), Some(7)).expect("chown");
    let a4 = ctime_of(&fa);
    assert!(a4 > a3, "point 17: chown moves the ctime");
    a.kill();
    let a = MountProc::start_at(&p.addr, &p.fingerprint, &tok, &mnt, &cache);
    assert_eq!(ctime_of(&fa), a4, "point 17: the ctime is kept across a SIGKILL of the daemon");
    drop(a);
}

/// Issue 12 point 18: utimensat's atime was dropped and st_atime was
/// st_mtime. An explicit atime now replicates (another replica, the export,
/// a new replica made from the server all show it), and the server reads
/// the export with O_NOATIME, so its own reads (a new replica's initial
/// replication) leave the atime a client set, on a relatime export where a
/// read of a file whose atime is older than its mtime would move it.
#[test]
fn explicit_atimes_replicate_and_the_servers_own_reads_leave_them() {
    let (dirs, p, tok) = served_volume(&[]);
    let a = MountProc::start(&p.addr, &p.fingerprint, &tok);
    let b = MountProc::start(&p.addr, &p.fingerprint, &tok);
    let f = a.mnt.join("f");
    std::fs::write(&f, b"some bytes to read").expect("write");
    let (at, mt) = ((1_000_000_000, 123_456_789), (1_100_000_000, 987_654_321));
    let c = CString::new(f.as_os_str().as_bytes()).expect("path");
    let ts = [libc::timespec { tv_sec: at.0, tv_nsec: at.1 }, libc::timespec { tv_sec: mt.0, tv_nsec: mt.1 }];
    // SAFETY: a NUL-terminated path and two timespecs.
    assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) }, 0, "utimensat");
    assert_eq!(atime_of(&f), at, "point 18: the mount shows the atime it was given");
    sync(&a);
    sync(&b);
    assert_eq!(atime_of(&b.mnt.join("f")), at, "point 18: an explicit atime replicates");
    let ex = dirs.export.join("f");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while atime_of(&ex) != at && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(atime_of(&ex), at, "point 18: the export gets the explicit atime");
    // a new replica reads every file from the server
    let n = MountProc::start(&p.addr, &p.fingerprint, &tok);
    assert_eq!(std::fs::read(n.mnt.join("f")).expect("read on the new replica"), b"some bytes to read");
    assert_eq!(atime_of(&n.mnt.join("f")), at, "point 18: a new replica has the explicit atime");
    assert_eq!(atime_of(&ex), at, "point 18: the server's own reads (O_NOATIME) leave the export's atime");
    // reads on the mount are not tracked (noatime-like)
    std::fs::read(&f).expect("read on A");
    assert_eq!(atime_of(&f), at, "point 18: a read does not move the atime (noatime-like)");
    drop((a, b, n));
}

/// Issue 12 point 21: st_blocks was size / 512 rounded up, so `du`
/// overstated sparse files; now a file's blocks are what its cache file
/// has allocated, on the replica that wrote it and on one that fetched it.
#[test]
fn a_sparse_files_blocks_are_the_allocated_ones() {
    let (_dirs, p, tok) = served_volume(&[]);
    let a = MountProc::start(&p.addr, &p.fingerprint, &tok);
    let b = MountProc::start(&p.addr, &p.fingerprint, &tok);
    let f = a.mnt.join("sparse");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(&f).expect("create");
        file.set_len(64 << 20).expect("64 MiB hole");
        file.write_all_at(&[7u8; 4096], 32 << 20).expect("4 KiB in the middle");
    }
    let blocks = |p: &Path| std::fs::metadata(p).expect("stat").blocks();
    assert_eq!(std::fs::metadata(&f).expect("stat").len(), 64 << 20);
    assert!(blocks(&f) * 512 < 1 << 20, "point 21: 4 KiB written in a 64 MiB hole: {} blocks", blocks(&f));
    sync(&a);
    sync(&b);
    let g = b.mnt.join("sparse");
    assert_eq!(std::fs::metadata(&g).expect("stat on B").len(), 64 << 20);
    assert!(blocks(&g) * 512 < 1 << 20, "point 21: the replica that fetched it: {} blocks", blocks(&g));
    let du = std::process::Command::new("du").arg("-k").arg(&f).output().expect("du");
    let kib: u64 =
        String::from_utf8_lossy(&du.stdout).split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(kib < 1024, "point 21: du says {kib} KiB");
    drop((a, b));
}
