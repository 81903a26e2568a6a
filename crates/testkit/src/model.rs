//! Reference model of a volume: applies accepted [`Op`]s in order and
//! produces the [`Digest`] a real tree holding the same state would have.

use crate::digest::{digest_xattr, Digest, Kind, Node};
use izo_proto::{valid_name, FileKind, ObjectId, Op, RenameMode, Timestamp};
use std::collections::{BTreeMap, HashMap};

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
        Model {
            objects: HashMap::from([(ObjectId::ROOT, root)]),
            dentries: BTreeMap::new(),
        }
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
        self.apply_inner(op, time)
            .map_err(|e| format!("{}: {e}", op.kind()))
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
                let o = Self::fresh(FileKind::Symlink, 0o777, *uid, *gid, time, target.clone());
                self.create(*parent, name, *id, o, time)
            }
            Op::Mknod { parent, name, id, kind, mode, uid, gid } => {
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
                let end = offset
                    .checked_add(data.len() as u64)
                    .ok_or("write range overflows")?;
                let f = self.file_mut(*id)?;
                let size = (f.data.len() as u64).max(end);
                resize(&mut f.data, size)?;
                let start = *offset as usize;
                f.data[start..start + data.len()].copy_from_slice(data);
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
                let o = self.obj_mut(*id)?;
                if let Some(mode) = attrs.mode {
                    if o.kind != FileKind::Symlink {
                        o.mode = mode & 0o7777;
                    }
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
        Object {
            kind,
            mode,
            uid,
            gid,
            mtime: t,
            data,
            xattrs: BTreeMap::new(),
            names: 1,
            parent: ObjectId::ROOT,
        }
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

    fn check_dir(&self, id: ObjectId) -> Res {
        match self.obj(id)?.kind {
            FileKind::Dir => Ok(()),
            k => Err(format!("{id} is a {k:?}, not a directory")),
        }
    }

    /// `parent` is a directory and `name` is a valid name absent from it.
    fn check_new_name(&self, parent: ObjectId, name: &[u8]) -> Res {
        self.check_dir(parent)?;
        if !valid_name(name) {
            return Err(format!("invalid name {:?}", String::from_utf8_lossy(name)));
        }
        if self.lookup(parent, name).is_some() {
            return Err(format!("{:?} exists", String::from_utf8_lossy(name)));
        }
        Ok(())
    }

    fn touch(&mut self, id: ObjectId, time: Timestamp) -> Res {
        self.obj_mut(id)?.mtime = time;
        Ok(())
    }

    fn is_empty_dir(&self, id: ObjectId) -> bool {
        let first = self.dentries.range((id, Vec::new())..).next();
        !matches!(first, Some(((p, _), _)) if *p == id)
    }

    /// Whether `x` is directory `dir` or lies below it.
    fn within(&self, mut x: ObjectId, dir: ObjectId) -> bool {
        loop {
            if x == dir {
                return true;
            }
            match self.objects.get(&x) {
                Some(o) if x != ObjectId::ROOT => x = o.parent,
                _ => return false,
            }
        }
    }

    fn create(&mut self, parent: ObjectId, name: &[u8], id: ObjectId, o: Object, t: Timestamp) -> Res {
        if self.objects.contains_key(&id) {
            return Err(format!("object {id} already exists"));
        }
        self.check_new_name(parent, name)?;
        self.objects.insert(id, o);
        self.dentries.insert((parent, name.to_vec()), id);
        self.touch(parent, t)
    }

    /// Checks for removing `name` → `id` from `parent` as unlink or rmdir.
    fn check_remove(&self, parent: ObjectId, name: &[u8], id: ObjectId, dir: bool) -> Res {
        let Some(found) = self.lookup(parent, name) else {
            return Err(format!("{:?} absent", String::from_utf8_lossy(name)));
        };
        if found != id {
            return Err(format!("name points to {found}, not {id}"));
        }
        match (self.obj(id)?.kind == FileKind::Dir, dir) {
            (true, false) => Err("is a directory".into()),
            (false, true) => Err("not a directory".into()),
            (true, true) if !self.is_empty_dir(id) => Err("directory not empty".into()),
            _ => Ok(()),
        }
    }

    /// Drop the name `(parent, name)` of `id`, and `id` when it was the last.
    fn drop_name(&mut self, parent: ObjectId, name: &[u8], id: ObjectId) -> Res {
        self.dentries.remove(&(parent, name.to_vec()));
        let o = self.obj_mut(id)?;
        o.names -= 1;
        if o.names == 0 {
            self.objects.remove(&id);
        }
        Ok(())
    }

    fn remove(&mut self, parent: ObjectId, name: &[u8], id: ObjectId, dir: bool, t: Timestamp) -> Res {
        self.check_remove(parent, name, id, dir)?;
        self.drop_name(parent, name, id)?;
        self.touch(parent, t)
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &mut self,
        parent: ObjectId,
        name: &[u8],
        src: ObjectId,
        new_parent: ObjectId,
        new_name: &[u8],
        target: Option<ObjectId>,
        mode: RenameMode,
        t: Timestamp,
    ) -> Res {
        match self.lookup(parent, name) {
            Some(found) if found == src => {}
            Some(found) => return Err(format!("source points to {found}, not {src}")),
            None => return Err(format!("{:?} absent", String::from_utf8_lossy(name))),
        }
        self.check_dir(new_parent)?;
        if !valid_name(new_name) {
            return Err(format!("invalid name {:?}", String::from_utf8_lossy(new_name)));
        }
        let dst = self.lookup(new_parent, new_name);
        if let (Some(want), Some(found)) = (target, dst) {
            if want != found {
                return Err(format!("target points to {found}, not {want}"));
            }
        }
        match (mode, dst) {
            (RenameMode::NoReplace, Some(_)) => return Err("target exists".into()),
            (RenameMode::Exchange, None) => return Err("exchange target absent".into()),
            _ => {}
        }
        let src_dir = self.obj(src)?.kind == FileKind::Dir;
        if src_dir && self.within(new_parent, src) {
            return Err("cannot move a directory into its own subtree".into());
        }
        match dst {
            Some(d) if d == src => {}
            Some(d) if mode == RenameMode::Exchange => {
                if self.obj(d)?.kind == FileKind::Dir && self.within(parent, d) {
                    return Err("cannot move a directory into its own subtree".into());
                }
                self.dentries.insert((parent, name.to_vec()), d);
                self.dentries.insert((new_parent, new_name.to_vec()), src);
                for (id, p) in [(d, parent), (src, new_parent)] {
                    let o = self.obj_mut(id)?;
                    if o.kind == FileKind::Dir {
                        o.parent = p;
                    }
                }
            }
            _ => {
                if let Some(d) = dst {
                    let dst_dir = self.obj(d)?.kind == FileKind::Dir;
                    if src_dir != dst_dir {
                        return Err("rename between a directory and a non-directory".into());
                    }
                    self.check_remove(new_parent, new_name, d, dst_dir)?;
                    self.drop_name(new_parent, new_name, d)?;
                }
                self.dentries.remove(&(parent, name.to_vec()));
                self.dentries.insert((new_parent, new_name.to_vec()), src);
                if src_dir {
                    self.obj_mut(src)?.parent = new_parent;
                }
            }
        }
        self.touch(parent, t)?;
        self.touch(new_parent, t)
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

fn resize(data: &mut Vec<u8>, size: u64) -> Res {
    if size > MAX_MODEL_FILE {
        return Err(format!("size {size} exceeds the model limit {MAX_MODEL_FILE}"));
    }
    data.resize(size as usize, 0);
    Ok(())
}
