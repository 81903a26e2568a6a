//! The simulated export: the reference model fed every committed record in
//! seq order, as the real server applies records to its directory tree.

use izo_proto::{Attr, FileKind, ObjectId, Op, Record, Seq, SetAttrs, Timestamp};
use izo_testkit::Model;

/// The export and how far it is applied.
#[derive(Clone, Debug)]
pub(crate) struct Export {
    model: Model,
    /// Seq of the last record applied.
    applied: Seq,
    /// Records the journal accepted and the model refused (or applied to a
    /// different result): each one is a bug in one of the two.
    findings: Vec<String>,
}

/// Root directory attributes of a new volume: mode, uid, gid, mtime.
pub(crate) const ROOT: (u32, u32, u32, Timestamp) = (0o755, 0, 0, Timestamp { secs: 0, nsec: 0 });

impl Export {
    /// The export of a new volume.
    pub(crate) fn new() -> Export {
        let (mode, uid, gid, mtime) = ROOT;
        Export { model: Model::new(mode, uid, gid, mtime), applied: 0, findings: Vec::new() }
    }

    pub(crate) fn model(&self) -> &Model {
        &self.model
    }

    pub(crate) fn applied(&self) -> Seq {
        self.applied
    }

    pub(crate) fn findings(&self) -> &[String] {
        &self.findings
    }

    /// Apply one committed record. The tree takes the mtimes the journal
    /// chose (a replica's stamp, never going backwards), so the model's own
    /// (the record time) is overwritten with them.
    pub(crate) fn apply(&mut self, r: &Record) {
        if r.seq != self.applied + 1 {
            self.finding(format!("record {} applied after record {}: a gap in the journal", r.seq, self.applied));
        }
        self.applied = r.seq;
        if let Err(e) = self.model.apply(&r.op, r.time) {
            return self.finding(format!(
                "record {} ({:?}) was accepted by the journal, refused by the model: {e}",
                r.seq, r.op
            ));
        }
        for a in r.attr.iter().chain(&r.dirs) {
            self.take_mtime(r, a);
        }
        if let Some(a) = r.attr.as_ref().filter(|a| a.kind == FileKind::File) {
            let size = self.model.content(a.id).map(|c| c.len() as u64);
            if size.is_some_and(|s| s != a.size) {
                self.finding(format!(
                    "record {}: the journal says size {}, the model holds {size:?} bytes",
                    r.seq, a.size
                ));
            }
        }
    }

    fn take_mtime(&mut self, r: &Record, a: &Attr) {
        if self.model.kind(a.id).is_none() {
            return;
        }
        let attrs = SetAttrs { mtime: Some(a.mtime), ..SetAttrs::default() };
        let set = Op::SetAttr { id: a.id, base: 0, attrs };
        if let Err(e) = self.model.apply(&set, r.time) {
            self.finding(format!("record {}: mtime of {} not settable in the model: {e}", r.seq, a.id));
        }
    }

    /// A disagreement between the journal and the model: loud in debug
    /// builds (the simulation's seed replays it), kept otherwise.
    fn finding(&mut self, what: String) {
        if cfg!(debug_assertions) {
            panic!("simulated server: {what}");
        }
        self.findings.push(what);
    }

    /// A file's content.
    pub(crate) fn read(&self, id: ObjectId) -> Option<Vec<u8>> {
        match self.model.kind(id) {
            Some(FileKind::File) => self.model.content(id).map(<[u8]>::to_vec),
            _ => None,
        }
    }
}
