//! Reference model of a volume: applies accepted [`Op`]s in order and
//! produces the [`Digest`] a real tree holding the same state would have.

use crate::digest::{digest_xattr, Digest, Kind, Node};
use izo_proto::{FileKind, ObjectId, Op, Timestamp};
use std::collections::{BTreeMap, HashMap};

mod namespace;

/// Largest file the model keeps in memory; larger sizes are refused.
pub const MAX_MODEL_FILE: u64 = 1 << 30;

/// One object of the model.
#[derive(Clone, Debug)]
struct Object {
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: Timestamp,
    /// File bytes, or the target of a symlink.
    data: Vec<u8>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Number of names; the object is dropped when it reaches zero.
    names: u32,
    /// For directories: the directory holding its one name (root: itself).
    parent: ObjectId,
}

/// The reference model: objects by id and dentries (parent, name) → id.
/// Version fields of ops are ignored: it is fed only accepted ops, in order.
#[derive(Clone, Debug)]
pub struct Model {
    objects: HashMap<ObjectId, Object>,
    dentries: BTreeMap<(ObjectId, Vec<u8>), ObjectId>,
}

type Res = Result<(), String>;

impl Model {
    /// An empty volume whose root directory has the given attributes.
    pub fn new(root_mode: u32, root_uid: u32, root_gid: u32, root_mtime: Timestamp) -> Model {
        let root = Object {
            kind: FileKind::Dir,
            mode: root_mode & 0o7777,
            uid: root_uid,
            gid: root_gid,
            mtime: root_mtime,
            data: Vec::new(),
            xattrs: BTreeMap::new(),
            names: 1,
            parent: ObjectId::ROOT,
        };
        Model { objects: HashMap::from([(ObjectId::ROOT, root)]), dentries: BTreeMap::new() }
    }

    /// The object `name` in directory `parent` points to.
    pub fn lookup(&self, parent: ObjectId, name: &[u8]) -> Option<ObjectId> {
        self.dentries.get(&(parent, name.to_vec())).copied()
    }

    /// The kind of an object, if it exists.
    pub fn kind(&self, id: ObjectId) -> Option<FileKind> {
        self.objects.get(&id).map(|o| o.kind)
    }

    /// The bytes of a file (or a symlink's target), if the object exists.
    pub fn content(&self, id: ObjectId) -> Option<&[u8]> {
        self.objects.get(&id).map(|o| o.data.as_slice())
    }

    /// Apply one op stamped with server time `time`. On error the model is unchanged.
    pub fn apply(&mut self, op: &Op, time: Timestamp) -> Res {
        self.apply_inner(op, time).map_err(|e| format!("{}: {e}", op.kind()))
    }

    fn apply_inner(&mut self, op: &Op, time: Timestamp) -> Res {
        match op {
            Op::Create { parent, name, id, mode, uid, gid } => {
                let o = Self::fresh(FileKind::File, *mode & 0o7777, *uid, *gid, time, vec![]);
                self.create(*parent, name, *id, o, time)
            }
            Op::Mkdir { parent, name, id, mode, uid, gid } => {
                let mut o = Self::fresh(FileKind::Dir, *mode & 0o7777, *uid, *gid, time, vec![]);
                o.parent = *parent;
                self.create(*parent, name, *id, o, time)
            }
            Op::Symlink { parent, name, id, target, uid, gid } => {
                // Linux: an empty target is ENOENT, a longer one than
                // PATH_MAX less its NUL is ENAMETOOLONG
                if target.is_empty() || target.len() > 4095 || target.contains(&0) {
                    return Err(format!("symlink target of {} bytes", target.len()));
                }
                let o = Self::fresh(FileKind::Symlink, 0o777, *uid, *gid, time, target.clone());
                self.create(*parent, name, *id, o, time)
            }
            Op::Mknod { parent, name, id, kind, mode, uid, gid, .. } => {
                // the model is of a volume that is not trusted: no device nodes
                if !matches!(kind, FileKind::Fifo | FileKind::Socket) {
                    return Err(format!("mknod of kind {kind:?}"));
                }
                let o = Self::fresh(*kind, *mode & 0o7777, *uid, *gid, time, vec![]);
                self.create(*parent, name, *id, o, time)
            }
            Op::Link { id, parent, name } => {
                if self.obj(*id)?.kind == FileKind::Dir {
                    return Err("cannot link a directory".into());
                }
                self.check_new_name(*parent, name)?;
                self.dentries.insert((*parent, name.clone()), *id);
                self.obj_mut(*id)?.names += 1;
                self.touch(*parent, time)
            }
            Op::Unlink { parent, name, expect } => self.remove(*parent, name, expect.id, false, time),
            Op::Rmdir { parent, name, expect } => self.remove(*parent, name, expect.id, true, time),
            Op::Rename { parent, name, expect, new_parent, new_name, target, mode } => {
                let target = target.map(|t| t.id);
                self.rename(*parent, name, expect.id, *new_parent, new_name, target, *mode, time)
            }
            Op::Write { id, offset, data, .. } => {
                let end = offset.checked_add(data.len() as u64).ok_or("write range overflows")?;
                let f = self.file_mut(*id)?;
                let size = (f.data.len() as u64).max(end);
                resize(&mut f.data, size)?;
                let start = *offset as usize;
                f.data[start..start + data.len()].copy_from_slice(data);
                f.mtime = time;
                Ok(())
            }
            Op::Append { id, data, .. } => {
                // (no versions here: an append lands at the end of the file,
                // where a replica that saw every change before it put it)
                let f = self.file_mut(*id)?;
                f.data.extend_from_slice(data);
                f.mtime = time;
                Ok(())
            }
            Op::Truncate { id, size, .. } => {
                let f = self.file_mut(*id)?;
                resize(&mut f.data, *size)?;
                f.mtime = time;
                Ok(())
            }
            Op::Allocate { id, offset, len, .. } => {
                let end = offset.checked_add(*len).ok_or("allocate range overflows")?;
                let f = self.file_mut(*id)?;
                let size = (f.data.len() as u64).max(end);
                resize(&mut f.data, size)?;
                f.mtime = time;
                Ok(())
            }
            Op::PunchHole { id, offset, len, .. } => {
                let f = self.file_mut(*id)?;
                let size = f.data.len() as u64;
                let end = offset.saturating_add(*len).min(size);
                if *offset < end {
                    f.data[*offset as usize..end as usize].fill(0);
                }
                f.mtime = time;
                Ok(())
            }
            Op::SetAttr { id, attrs, .. } => {
                for t in [attrs.mtime, attrs.atime].into_iter().flatten() {
                    if !ext4_time(t) {
                        return Err(format!("time {t:?} outside what ext4 stores"));
                    }
                }
                let o = self.obj_mut(*id)?;
                if let Some(mode) = attrs.mode {
                    // Linux refuses a mode change on a symlink inode (EOPNOTSUPP)
                    if o.kind == FileKind::Symlink {
                        return Err("a symlink has no mode of its own".into());
                    }
                    o.mode = mode & 0o7777;
                }
                if let Some(uid) = attrs.uid {
                    o.uid = uid;
                }
                if let Some(gid) = attrs.gid {
                    o.gid = gid;
                }
                if let Some(mtime) = attrs.mtime {
                    o.mtime = mtime;
                }
                Ok(())
            }
            Op::SetXattr { id, name, value, .. } => {
                self.obj_mut(*id)?.xattrs.insert(name.clone(), value.clone());
                Ok(())
            }
            Op::RemoveXattr { id, name, .. } => match self.obj_mut(*id)?.xattrs.remove(name) {
                Some(_) => Ok(()),
                None => Err(format!("no xattr {:?}", String::from_utf8_lossy(name))),
            },
        }
    }

    fn fresh(kind: FileKind, mode: u32, uid: u32, gid: u32, t: Timestamp, data: Vec<u8>) -> Object {
        Object { kind, mode, uid, gid, mtime: t, data, xattrs: BTreeMap::new(), names: 1, parent: ObjectId::ROOT }
    }

    fn obj(&self, id: ObjectId) -> Result<&Object, String> {
        self.objects.get(&id).ok_or_else(|| format!("no object {id}"))
    }

    fn obj_mut(&mut self, id: ObjectId) -> Result<&mut Object, String> {
        self.objects.get_mut(&id).ok_or_else(|| format!("no object {id}"))
    }

    fn file_mut(&mut self, id: ObjectId) -> Result<&mut Object, String> {
        let o = self.obj_mut(id)?;
        match o.kind {
            FileKind::File => Ok(o),
            k => Err(format!("{id} is a {k:?}, not a file")),
        }
    }

    /// The digest `tree_digest` would produce on a real tree in this state.
    pub fn digest(&self) -> Digest {
        let mut nodes = BTreeMap::new();
        let mut names: HashMap<ObjectId, Vec<Vec<u8>>> = HashMap::new();
        let mut stack = vec![(ObjectId::ROOT, Vec::new())];
        while let Some((id, path)) = stack.pop() {
            let Some(o) = self.objects.get(&id) else {
                continue;
            };
            let kind = Kind::from(o.kind);
            if kind == Kind::Dir {
                let children = self.dentries.range((id, Vec::new())..);
                for ((_, name), child) in children.take_while(|((p, _), _)| *p == id) {
                    let mut cp = path.clone();
                    if !cp.is_empty() {
                        cp.push(b'/');
                    }
                    cp.extend_from_slice(name);
                    stack.push((*child, cp));
                }
            } else if o.names > 1 {
                names.entry(id).or_default().push(path.clone());
            }
            let content = match kind {
                Kind::File | Kind::Symlink => *blake3::hash(&o.data).as_bytes(),
                _ => [0; 32],
            };
            let xattrs = o.xattrs.iter().filter(|(k, _)| digest_xattr(k));
            let node = Node {
                kind,
                mode: if kind == Kind::Symlink { 0o777 } else { o.mode },
                uid: o.uid,
                gid: o.gid,
                mtime: (o.mtime.secs, o.mtime.nsec),
                size: if kind == Kind::File { o.data.len() as u64 } else { 0 },
                content,
                xattrs: xattrs.map(|(k, v)| (k.clone(), v.clone())).collect(),
                link_group: None,
            };
            nodes.insert(path, node);
        }
        for paths in names.into_values() {
            let Some(smallest) = paths.iter().min().cloned() else {
                continue;
            };
            for p in paths {
                if let Some(n) = nodes.get_mut(&p) {
                    n.link_group = Some(smallest.clone());
                }
            }
        }
        Digest { nodes }
    }
}

/// A time ext4 stores: 1901-12-13 to 2446-05-10, nanoseconds below one second.
fn ext4_time(t: Timestamp) -> bool {
    t.secs >= i32::MIN as i64 && t.secs <= 15_032_385_535 && t.nsec < 1_000_000_000
}

fn resize(data: &mut Vec<u8>, size: u64) -> Res {
    if size > MAX_MODEL_FILE {
        return Err(format!("size {size} exceeds the model limit {MAX_MODEL_FILE}"));
    }
    data.resize(size as usize, 0);
    Ok(())
}
