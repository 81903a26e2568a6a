//! Digest of a directory tree: every path with its kind, attributes,
//! content hash, replicated xattrs and hard-link group.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Name of the server's internal staging directory, skipped directly under the root.
pub const STAGE_DIR: &[u8] = b".izo-stage";

/// Most difference lines [`Digest::diff`] returns.
pub const MAX_DIFF_LINES: usize = 50;

/// Kind of a node in a digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Kind {
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
    /// Block device node.
    BlockDev,
    /// Character device node.
    CharDev,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
            Kind::Fifo => 4,
            Kind::Socket => 5,
            Kind::BlockDev => 6,
            Kind::CharDev => 7,
        }
    }
}

impl From<izo_proto::FileKind> for Kind {
    fn from(k: izo_proto::FileKind) -> Self {
        use izo_proto::FileKind as F;
        match k {
            F::File => Kind::File,
            F::Dir => Kind::Dir,
            F::Symlink => Kind::Symlink,
            F::Fifo => Kind::Fifo,
            F::Socket => Kind::Socket,
            F::BlockDev => Kind::BlockDev,
            F::CharDev => Kind::CharDev,
        }
    }
}

/// What a digest records for one path.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Node {
    /// Object kind.
    pub kind: Kind,
    /// `st_mode & 0o7777`; always `0o777` for symlinks.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Modification time as (seconds, nanoseconds).
    pub mtime: (i64, u32),
    /// Size in bytes for files; 0 for everything else.
    pub size: u64,
    /// blake3 of the bytes of a file, of a symlink's target or of a device
    /// node's device number (`st_rdev`, 8 bytes LE); zeros otherwise.
    pub content: [u8; 32],
    /// Xattrs named `user.*` or `system.posix_acl*`.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// For a non-directory with several names in the tree: the smallest of them.
    pub link_group: Option<Vec<u8>>,
}

/// Whether an xattr name is part of the replicated state.
pub fn digest_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name.starts_with(b"system.posix_acl")
}

/// A digest of a whole tree: relative path (root = empty) → node.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Digest {
    /// All recorded paths, as raw bytes relative to the root.
    pub nodes: BTreeMap<Vec<u8>, Node>,
}

impl Digest {
    /// blake3 over a canonical, length-prefixed encoding of all nodes.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new();
        let bytes = |h: &mut blake3::Hasher, b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        h.update(&(self.nodes.len() as u64).to_le_bytes());
        for (path, n) in &self.nodes {
            bytes(&mut h, path);
            h.update(&[n.kind.code()]);
            h.update(&n.mode.to_le_bytes());
            h.update(&n.uid.to_le_bytes());
            h.update(&n.gid.to_le_bytes());
            h.update(&n.mtime.0.to_le_bytes());
            h.update(&n.mtime.1.to_le_bytes());
            h.update(&n.size.to_le_bytes());
            h.update(&n.content);
            h.update(&(n.xattrs.len() as u64).to_le_bytes());
            for (k, v) in &n.xattrs {
                bytes(&mut h, k);
                bytes(&mut h, v);
            }
            match &n.link_group {
                None => {
                    h.update(&[0]);
                }
                Some(g) => {
                    h.update(&[1]);
                    bytes(&mut h, g);
                }
            }
        }
        *h.finalize().as_bytes()
    }

    /// A copy with every mtime set to `(0, 0)`.
    pub fn without_mtimes(&self) -> Digest {
        self.map_nodes(|_| true)
    }

    /// A copy with the mtimes of directories set to `(0, 0)`.
    pub fn without_dir_mtimes(&self) -> Digest {
        self.map_nodes(|n| n.kind == Kind::Dir)
    }

    fn map_nodes(&self, zero_mtime: impl Fn(&Node) -> bool) -> Digest {
        let mut d = self.clone();
        for n in d.nodes.values_mut() {
            if zero_mtime(n) {
                n.mtime = (0, 0);
            }
        }
        d
    }

    /// Human-readable differences from `self` ("left") to `other` ("right"),
    /// at most [`MAX_DIFF_LINES`] lines; empty when the digests are equal.
    pub fn diff(&self, other: &Digest) -> Vec<String> {
        let mut out = Vec::new();
        let mut a = self.nodes.iter().peekable();
        let mut b = other.nodes.iter().peekable();
        loop {
            let order = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some((pa, _)), Some((pb, _))) => pa.cmp(pb),
            };
            match order {
                std::cmp::Ordering::Less => {
                    if let Some((p, n)) = a.next() {
                        out.push(format!("{}: only on left ({:?})", show(p), n.kind));
                    }
                }
                std::cmp::Ordering::Greater => {
                    if let Some((p, n)) = b.next() {
                        out.push(format!("{}: only on right ({:?})", show(p), n.kind));
                    }
                }
                std::cmp::Ordering::Equal => {
                    if let (Some((p, na)), Some((_, nb))) = (a.next(), b.next()) {
                        node_diff(&show(p), na, nb, &mut out);
                    }
                }
            }
        }
        if out.len() > MAX_DIFF_LINES {
            let more = out.len() - (MAX_DIFF_LINES - 1);
            out.truncate(MAX_DIFF_LINES - 1);
            out.push(format!("... and {more} more differences"));
        }
        out
    }
}

/// A path for messages: `/` + lossy UTF-8 (the root shows as `/`).
fn show(path: &[u8]) -> String {
    format!("/{}", String::from_utf8_lossy(path))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn node_diff(p: &str, a: &Node, b: &Node, out: &mut Vec<String>) {
    let mut field = |name: &str, l: String, r: String| {
        if l != r {
            out.push(format!("{p}: {name}: left {l}, right {r}"));
        }
    };
    field("kind", format!("{:?}", a.kind), format!("{:?}", b.kind));
    field("mode", format!("{:o}", a.mode), format!("{:o}", b.mode));
    field("uid", a.uid.to_string(), b.uid.to_string());
    field("gid", a.gid.to_string(), b.gid.to_string());
    let t = |m: (i64, u32)| format!("{}.{:09}", m.0, m.1);
    field("mtime", t(a.mtime), t(b.mtime));
    field("size", a.size.to_string(), b.size.to_string());
    field("content", hex(&a.content[..8]), hex(&b.content[..8]));
    let g = |l: &Option<Vec<u8>>| l.as_deref().map_or("none".into(), show);
    field("link_group", g(&a.link_group), g(&b.link_group));
    let names: std::collections::BTreeSet<&Vec<u8>> = a.xattrs.keys().chain(b.xattrs.keys()).collect();
    for name in names {
        let v = |m: &BTreeMap<Vec<u8>, Vec<u8>>| {
            m.get(name).map_or("absent".into(), |v| format!("{:?}", String::from_utf8_lossy(v)))
        };
        let label = format!("xattr {}", String::from_utf8_lossy(name));
        field(&label, v(&a.xattrs), v(&b.xattrs));
    }
}

/// Digest the tree at `root` without following symlinks. The entry
/// [`STAGE_DIR`] directly under the root is skipped.
///
/// `link_group` is set for non-directories whose inode has two or more
/// names inside the walked tree (links from outside it are not counted).
pub fn tree_digest(root: &Path) -> Result<Digest> {
    let mut nodes = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    let mut stack: Vec<(PathBuf, Vec<u8>)> = vec![(root.to_path_buf(), Vec::new())];
    while let Some((abs, rel)) = stack.pop() {
        let md = fs::symlink_metadata(&abs).with_context(|| format!("lstat {}", abs.display()))?;
        let ft = md.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_block_device() {
            Kind::BlockDev
        } else if ft.is_char_device() {
            Kind::CharDev
        } else {
            bail!("{}: unsupported file type", abs.display());
        };
        let (size, content) = match kind {
            Kind::File => (md.len(), hash_file(&abs)?),
            Kind::Symlink => {
                let target = fs::read_link(&abs).with_context(|| format!("readlink {}", abs.display()))?;
                (0, *blake3::hash(target.as_os_str().as_bytes()).as_bytes())
            }
            Kind::BlockDev | Kind::CharDev => (0, *blake3::hash(&md.rdev().to_le_bytes()).as_bytes()),
            _ => (0, [0; 32]),
        };
        let nsec = u32::try_from(md.mtime_nsec()).with_context(|| format!("{}: bad mtime nsec", abs.display()))?;
        let node = Node {
            kind,
            mode: if kind == Kind::Symlink { 0o777 } else { md.mode() & 0o7777 },
            uid: md.uid(),
            gid: md.gid(),
            mtime: (md.mtime(), nsec),
            size,
            content,
            xattrs: read_xattrs(&abs)?,
            link_group: None,
        };
        if kind != Kind::Dir && md.nlink() > 1 {
            inodes.entry((md.dev(), md.ino())).or_default().push(rel.clone());
        }
        if kind == Kind::Dir {
            let rd = fs::read_dir(&abs).with_context(|| format!("readdir {}", abs.display()))?;
            for entry in rd {
                let entry = entry.with_context(|| format!("readdir {}", abs.display()))?;
                let name = entry.file_name();
                let name = name.as_bytes();
                if rel.is_empty() && name == STAGE_DIR {
                    continue;
                }
                let mut child = rel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(name);
                stack.push((entry.path(), child));
            }
        }
        nodes.insert(rel, node);
    }
    for paths in inodes.into_values() {
        if paths.len() < 2 {
            continue;
        }
        let Some(smallest) = paths.iter().min().cloned() else {
            continue;
        };
        for p in &paths {
            if let Some(n) = nodes.get_mut(p) {
                n.link_group = Some(smallest.clone());
            }
        }
    }
    Ok(Digest { nodes })
}

fn hash_file(path: &Path) -> Result<[u8; 32]> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut h = blake3::Hasher::new();
    io::copy(&mut f, &mut h).with_context(|| format!("read {}", path.display()))?;
    Ok(*h.finalize().as_bytes())
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).with_context(|| format!("{}: NUL in path", path.display()))
}

/// The `user.*` and `system.posix_acl*` xattrs of `path` (not following symlinks).
fn read_xattrs(path: &Path) -> Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let cp = c_path(path)?;
    let mut out = BTreeMap::new();
    let list = xattr_call(path, "llistxattr", |buf, len| {
        // SAFETY: `cp` is a valid C string; `buf` is null with len 0 or valid for `len` bytes.
        unsafe { libc::llistxattr(cp.as_ptr(), buf.cast(), len) }
    })?;
    let Some(list) = list else {
        return Ok(out);
    };
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if !digest_xattr(name) {
            continue;
        }
        let cname = CString::new(name).context("xattr name with NUL")?;
        let value = xattr_call(path, "lgetxattr", |buf, len| {
            // SAFETY: as above; `cname` is a valid C string.
            unsafe { libc::lgetxattr(cp.as_ptr(), cname.as_ptr(), buf.cast(), len) }
        })?;
        // A name that vanished between list and get is simply absent.
        if let Some(value) = value {
            out.insert(name.to_vec(), value);
        }
    }
    Ok(out)
}

/// Run a size-query-then-fetch xattr syscall, retrying on ERANGE.
/// `None` when xattrs are unsupported or the attribute is gone.
fn xattr_call(path: &Path, what: &str, call: impl Fn(*mut u8, usize) -> libc::ssize_t) -> Result<Option<Vec<u8>>> {
    loop {
        let n = call(std::ptr::null_mut(), 0);
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTSUP) | Some(libc::ENODATA) => Ok(None),
                _ => Err(e).with_context(|| format!("{what} {}", path.display())),
            };
        }
        let mut buf = vec![0u8; n as usize];
        let m = call(buf.as_mut_ptr(), buf.len());
        if m < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::ERANGE) => continue,
                Some(libc::ENOTSUP) | Some(libc::ENODATA) => return Ok(None),
                _ => return Err(e).with_context(|| format!("{what} {}", path.display())),
            }
        }
        buf.truncate(m as usize);
        return Ok(Some(buf));
    }
}
