//! The record stream: what a record changes in the cache, as edits the
//! engine filters against local changes, data effects the shell lands only
//! on idle objects, and questions for the server ([`Need`]).

use super::{visible_change, Engine, Inval, Now, View, R};
use crate::cache::{with_ctime, Edit};
use izo_proto::*;

/// A data effect of someone else's record on a file's data file. The shell
/// lands it only if [`Engine::may_land`] says the object is idle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    /// Bytes the record carries.
    Write {
        /// The file.
        id: ObjectId,
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// Bytes the record elided: fetched from the server first.
    Fetch {
        /// The file.
        id: ObjectId,
        /// Where.
        offset: u64,
        /// How many.
        len: u64,
    },
    /// A hole punched.
    Punch {
        /// The file.
        id: ObjectId,
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// Space allocated (the size may grow).
    Allocate {
        /// The file.
        id: ObjectId,
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
    /// The data file's length follows the size.
    SetLen {
        /// The file.
        id: ObjectId,
        /// The new size.
        size: u64,
    },
}

impl Data {
    /// The file it lands on.
    pub fn id(&self) -> ObjectId {
        match self {
            Data::Write { id, .. }
            | Data::Fetch { id, .. }
            | Data::Punch { id, .. }
            | Data::Allocate { id, .. }
            | Data::SetLen { id, .. } => *id,
        }
    }
}

/// A question for the server a record leaves open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Someone else changed an object's xattrs: all of them, put with
    /// `attr` (a gone object: nothing).
    Xattrs {
        /// The object.
        id: ObjectId,
        /// Its attributes from the record.
        attr: Attr,
    },
    /// The attributes of an object the record changed without carrying
    /// them (a replaced object, a directory of an older server's record):
    /// answered with [`Engine::attr_answer`].
    Attr(ObjectId),
}

/// One record as planned by [`Engine::plan_record`].
#[derive(Debug, Default)]
pub struct Planned {
    /// The lsn of an own record (its echo).
    pub own: Option<u64>,
    /// Edits, filtered when the batch commits ([`Engine::apply_records`]).
    pub edits: Vec<Edit>,
    /// Kernel caches to drop (none for an own record: the kernel has the
    /// local state already).
    pub inval: Vec<Inval>,
    /// Data effects to land (someone else's records only).
    pub data: Vec<Data>,
    /// Questions for the server; their answers' edits go in `edits`.
    pub needs: Vec<Need>,
}

/// A batch of records as it lands on the cache.
#[derive(Debug, Default)]
pub struct Batch {
    /// Edits to log (one record), the stream position last.
    pub edits: Vec<Edit>,
    /// Kernel caches to drop once logged.
    pub inval: Vec<Inval>,
    /// Objects forgotten (and their inodes): their data goes once no
    /// handle holds them.
    pub forgotten: Vec<(ObjectId, Option<u64>)>,
}

/// What to do with a refresh the server answered.
#[derive(Debug, PartialEq, Eq)]
pub enum Refresh {
    /// Take it (its data, then `Edit::Put`).
    Apply,
    /// Busy again or older than what the stream brought: nothing now.
    Skip,
}

fn ino(view: &dyn View, id: ObjectId) -> R<Option<u64>> {
    Ok(view.get(id)?.map(|c| c.ino))
}

/// Is `attr` at least as new as what the view holds?
fn newer(view: &dyn View, attr: &Attr) -> R<bool> {
    Ok(match view.get(attr.id)? {
        Some(c) => attr.versions.data >= c.attr.versions.data && attr.versions.meta >= c.attr.versions.meta,
        None => true,
    })
}

impl Engine {
    /// Is a record the echo of an op made here whose local effect is in
    /// the cache (one this engine holds, or one logged before the start)?
    /// Its lsn then. A record of this replica past what the cache logged
    /// (a power loss took the change before it was synced) is taken as
    /// someone else's: its effects land, unless a local change holds them
    /// off (the busy rule).
    pub fn own(&self, r: &Record, me: ReplicaId) -> Option<u64> {
        match r.origin {
            Origin::Replica(id, cseq)
                if id == me && (self.logged.holds(cseq) || self.c.objs_of.contains_key(&cseq)) =>
            {
                Some(cseq)
            }
            _ => None,
        }
    }

    /// What one record changes in the cache. An own record's effects are
    /// already there (its echo only advances versions).
    pub fn plan_record(view: &dyn View, r: &Record, own: Option<u64>) -> R<Planned> {
        let mut p = Planned { own, ..Planned::default() };
        let is_own = own.is_some();
        let mut refresh = Vec::new(); // objects whose attributes changed
        match &r.op {
            Op::Create { parent, name, id, .. }
            | Op::Mkdir { parent, name, id, .. }
            | Op::Symlink { parent, name, id, .. }
            | Op::Mknod { parent, name, id, .. } => {
                let target = match &r.op {
                    Op::Symlink { target, .. } => Some(target.clone()),
                    _ => None,
                };
                if let Some(a) = &r.attr {
                    p.edits.push(Edit::Put { attr: a.clone(), target, xattrs: Some(Vec::new()) });
                }
                p.edits.push(Edit::Link { parent: *parent, name: name.clone(), id: *id });
                refresh.push(*parent);
                if let Some(i) = ino(view, *parent)? {
                    p.inval.push(Inval::Entry(i, name.clone()));
                }
            }
            Op::Link { id, parent, name } => {
                p.edits.push(Edit::Link { parent: *parent, name: name.clone(), id: *id });
                refresh.push(*parent);
                if let Some(i) = ino(view, *parent)? {
                    p.inval.push(Inval::Entry(i, name.clone()));
                }
                if let Some(i) = ino(view, *id)? {
                    p.inval.push(Inval::Inode(i));
                }
            }
            Op::Unlink { parent, name, expect } | Op::Rmdir { parent, name, expect } => {
                p.edits.push(Edit::UnlinkIf { parent: *parent, name: name.clone(), id: expect.id });
                if r.attr.is_none() {
                    p.edits.push(Edit::Forget { id: expect.id });
                }
                refresh.push(*parent);
                if let Some(i) = ino(view, *parent)? {
                    p.inval.push(Inval::Entry(i, name.clone()));
                }
                if let Some(i) = ino(view, expect.id)? {
                    p.inval.push(Inval::Inode(i));
                }
            }
            Op::Rename { parent, name, expect, new_parent, new_name, target, mode } => {
                match mode {
                    RenameMode::Exchange => {
                        if let Some(t) = target {
                            p.edits.push(Edit::Link { parent: *parent, name: name.clone(), id: t.id });
                        }
                    }
                    _ => p.edits.push(Edit::UnlinkIf { parent: *parent, name: name.clone(), id: expect.id }),
                }
                p.edits.push(Edit::Link { parent: *new_parent, name: new_name.clone(), id: expect.id });
                refresh.extend([*parent, *new_parent]);
                if let (Some(t), false) = (target, *mode == RenameMode::Exchange) {
                    // the replaced object may be gone
                    refresh.push(t.id);
                }
                for (d, n) in [(*parent, name), (*new_parent, new_name)] {
                    if let Some(i) = ino(view, d)? {
                        p.inval.push(Inval::Entry(i, n.clone()));
                    }
                }
            }
            // (the journal records an append as the write it was placed as;
            // a record naming one is taken as that write at its offset)
            Op::Write { id, offset, data, .. } | Op::Append { id, local_offset: offset, data, .. } => {
                if !is_own {
                    p.data.push(match data.is_empty() {
                        false => Data::Write { id: *id, offset: *offset, data: data.clone() },
                        true => Data::Fetch { id: *id, offset: *offset, len: r.elided },
                    });
                }
                if let Some(i) = ino(view, *id)? {
                    p.inval.push(Inval::Inode(i));
                }
            }
            Op::Truncate { id, .. } | Op::Allocate { id, .. } | Op::PunchHole { id, .. } => {
                if !is_own {
                    match &r.op {
                        Op::PunchHole { offset, len, .. } => {
                            p.data.push(Data::Punch { id: *id, offset: *offset, len: *len })
                        }
                        Op::Allocate { offset, len, .. } => {
                            p.data.push(Data::Allocate { id: *id, offset: *offset, len: *len })
                        }
                        _ => {}
                    }
                }
                if let Some(i) = ino(view, *id)? {
                    p.inval.push(Inval::Inode(i));
                }
            }
            Op::SetAttr { id, .. } => {
                if let Some(i) = ino(view, *id)? {
                    p.inval.push(Inval::Inode(i));
                }
            }
            Op::SetXattr { id, .. } | Op::RemoveXattr { id, .. } => {
                if let (false, Some(a)) = (is_own, &r.attr) {
                    p.needs.push(Need::Xattrs { id: *id, attr: a.clone() });
                }
                if let Some(i) = ino(view, *id)? {
                    p.inval.push(Inval::Inode(i));
                }
            }
        }
        if let Some(a) = &r.attr {
            if newer(view, a)? {
                // keep the data file's length with the size
                if a.kind == FileKind::File && !is_own {
                    p.data.push(Data::SetLen { id: a.id, size: a.size });
                }
                p.edits.push(Edit::attr(a.clone()));
            }
        }
        // Directories' attributes come with the record; a replaced object
        // (and a record from an older server): ask the server.
        for id in refresh {
            if let Some(a) = r.dirs.iter().find(|a| a.id == id) {
                if newer(view, a)? {
                    p.edits.push(Edit::attr(a.clone()));
                }
            } else {
                p.needs.push(Need::Attr(id));
            }
            if let Some(i) = ino(view, id)? {
                p.inval.push(Inval::Inode(i));
            }
        }
        if is_own {
            p.inval.clear();
        }
        Ok(p)
    }

    /// The server's answer to [`Need::Attr`] (`None`: the object is gone).
    pub fn attr_answer(view: &dyn View, id: ObjectId, attr: Option<Attr>) -> R<Vec<Edit>> {
        Ok(match attr {
            Some(a) if newer(view, &a)? => vec![Edit::attr(a)],
            Some(_) => Vec::new(),
            None if view.get(id)?.is_some() => vec![Edit::Forget { id }],
            None => Vec::new(),
        })
    }

    /// May someone else's data effect land on `id` now? Not while it has
    /// local changes the server has not echoed: then it is noted stale
    /// (fetched whole once idle). Call with cache changes held off.
    pub fn may_land(&mut self, id: ObjectId) -> bool {
        if self.c.busy(id) {
            self.c.stale.insert(id);
            return false;
        }
        true
    }

    /// An edit of a record, as it may land on the cache now. An own
    /// record's namespace edits are already applied; its attributes only
    /// advance versions while the object has more local changes on the
    /// way. Someone else's never overwrite a local change the server has
    /// not seen.
    fn filter(&mut self, view: &dyn View, e: Edit, own: bool, inval: &mut Vec<Inval>) -> R<Option<Edit>> {
        let c = &mut self.c;
        Ok(match e {
            Edit::Link { .. } | Edit::Unlink { .. } | Edit::UnlinkIf { .. } | Edit::Forget { .. } if own => None,
            Edit::Put { attr, target, xattrs } if own => match view.get(attr.id)? {
                None => None, // removed here since
                Some(_) if c.busy(attr.id) => {
                    // the server's attributes (its mtime) once idle
                    let versions = attr.versions;
                    let id = attr.id;
                    c.stash.insert(id, attr);
                    Some(Edit::Versions { id, versions })
                }
                Some(cur) => {
                    // newer than anything stashed for it
                    c.stash.remove(&attr.id);
                    c.ready.retain(|a| a.id != attr.id);
                    // the kernel may hold the local values (a local mtime)
                    if visible_change(&cur.attr, &attr) {
                        inval.push(Inval::Attr(cur.ino));
                    }
                    Some(Edit::Put { attr, target, xattrs })
                }
            },
            Edit::Put { attr, .. } if c.busy(attr.id) => {
                c.stale.insert(attr.id);
                None
            }
            Edit::Forget { id } if c.busy(id) => {
                c.stale.insert(id);
                None
            }
            Edit::Link { parent, name, id } => match view.lookup(parent, &name)? {
                Some(o) if o != id && c.busy(o) => {
                    // The name is held by a local change the server has not
                    // seen: the server will refuse that change (and the
                    // replica resync), unless it never goes out (cancelled by
                    // an unlink): then only a resync brings the name back.
                    c.resync = true;
                    None
                }
                _ => {
                    // A new name for an object with local changes on the way:
                    // one of those may remove that name on the server after
                    // this one, and its echo (an own record) changes nothing
                    // here: once settled, a resync says which names are left.
                    if c.busy(id) {
                        c.resync = true;
                    }
                    Some(Edit::Link { parent, name, id })
                }
            },
            e => Some(e),
        })
    }

    /// Records (in order, up to seq `last`) as they land on the cache in
    /// one transaction: their filtered edits, the answers they cover, the
    /// attributes that went idle, then the stream position.
    pub fn apply_records(&mut self, view: &dyn View, planned: Vec<Planned>, last: Seq, now: Now) -> R<Batch> {
        let mut b = Batch::default();
        let resync_before = self.c.resync;
        for p in planned {
            if let Some(lsn) = p.own {
                self.c.release(lsn); // its echo is here
            }
            let from = b.edits.len();
            for e in p.edits {
                if let Some(e) = self.filter(view, e, p.own.is_some(), &mut b.inval)? {
                    if let Edit::Forget { id } = &e {
                        b.forgotten.push((*id, view.get(*id)?.map(|c| c.ino)));
                    }
                    b.edits.push(e);
                }
            }
            if p.own.is_none() {
                // a foreign change moves the ctime of what it changed here
                // (an own echo changes nothing that was not already)
                let changed = b.edits.split_off(from);
                b.edits.extend(with_ctime(changed, now.wall));
            }
            b.inval.extend(p.inval);
        }
        // answered ops whose records this batch covers: their log entries
        // go with it
        let done: Vec<u64> = self.c.acked_at.iter().filter(|(s, _)| *s <= last).map(|(_, l)| *l).collect();
        self.c.acked_at.retain(|(s, _)| *s > last);
        for l in done {
            self.c.release(l);
            self.c.done.push(l);
        }
        let (ready, inval) = self.take_ready(view)?;
        b.edits.extend(ready);
        b.inval.extend(inval);
        b.edits.extend(self.c.done.drain(..).map(Edit::CmlDone));
        if self.c.resync && !resync_before {
            b.edits.push(Edit::Meta(super::RESYNC.into(), 1));
        }
        b.edits.push(Edit::Seq(last));
        Ok(b)
    }

    /// Between batches of the stream: whether to resync now (a refused
    /// local change left the cache ahead of the server and nothing local is
    /// on the way), and the objects to ask the server about again.
    pub fn housekeep(&mut self) -> (bool, Vec<(ObjectId, bool)>) {
        let redo = self.c.resync && self.settled();
        // (each object once: with its content if any asked for it)
        let mut want: Vec<(ObjectId, bool)> = Vec::new();
        for (id, all) in std::mem::take(&mut self.c.refresh) {
            match want.iter_mut().find(|(w, _)| *w == id) {
                Some((_, a)) => *a |= all,
                None => want.push((id, all)),
            }
        }
        (redo, want)
    }

    /// A refresh failed (or the server is away): ask again later.
    pub fn refresh_again(&mut self, id: ObjectId, all: bool) {
        match self.c.refresh.iter_mut().find(|(w, _)| *w == id) {
            Some((_, a)) => *a |= all,
            None => self.c.refresh.push((id, all)),
        }
    }

    /// The server answered a refresh of `id` with `attr`: take it unless
    /// the object is busy again (then later) or the stream brought newer.
    pub fn refresh_answer(&mut self, view: &dyn View, id: ObjectId, all: bool, attr: &Attr) -> R<Refresh> {
        if self.c.busy(id) {
            if all {
                self.c.stale.insert(id);
            } else {
                self.c.refresh.push((id, false));
            }
            return Ok(Refresh::Skip);
        }
        let fresh = match view.get(id)? {
            Some(c) => attr.versions.data >= c.attr.versions.data && attr.versions.meta >= c.attr.versions.meta,
            // removed here while someone else gave it a new name: the
            // server has it, and the name came here; taken back whole
            None => all,
        };
        Ok(if fresh { Refresh::Apply } else { Refresh::Skip })
    }

    /// The cache was replaced by a snapshot at `seq` (taken while settled):
    /// every echo it covers is in it (the entries of answered ops waiting
    /// for theirs go with the next commit).
    pub fn resynced(&mut self, seq: Seq) {
        let c = &mut self.c;
        c.resync = false;
        c.done.extend(c.acked_at.drain(..).map(|(_, l)| l));
        c.pending.clear();
        c.objs_of.clear();
        c.stash.clear();
        c.ready.clear();
        c.stale.clear();
        self.applied = seq;
    }
}
