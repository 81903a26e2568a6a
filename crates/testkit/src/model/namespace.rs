//! Namespace ops of the model: creating, linking, removing and renaming
//! names, with the checks the server applies (kinds, emptiness, cycles).

use super::{Model, Object, Res};
use izo_proto::{valid_name, FileKind, ObjectId, RenameMode, Timestamp};

impl Model {
    fn check_dir(&self, id: ObjectId) -> Res {
        match self.obj(id)?.kind {
            FileKind::Dir => Ok(()),
            k => Err(format!("{id} is a {k:?}, not a directory")),
        }
    }

    /// `parent` is a directory and `name` is a valid name absent from it.
    pub(super) fn check_new_name(&self, parent: ObjectId, name: &[u8]) -> Res {
        self.check_dir(parent)?;
        if !valid_name(name) {
            return Err(format!("invalid name {:?}", String::from_utf8_lossy(name)));
        }
        if self.lookup(parent, name).is_some() {
            return Err(format!("{:?} exists", String::from_utf8_lossy(name)));
        }
        Ok(())
    }

    pub(super) fn touch(&mut self, id: ObjectId, time: Timestamp) -> Res {
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

    pub(super) fn create(&mut self, parent: ObjectId, name: &[u8], id: ObjectId, o: Object, t: Timestamp) -> Res {
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

    pub(super) fn remove(&mut self, parent: ObjectId, name: &[u8], id: ObjectId, dir: bool, t: Timestamp) -> Res {
        self.check_remove(parent, name, id, dir)?;
        self.drop_name(parent, name, id)?;
        self.touch(parent, t)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rename(
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
}
