//! What the server does not take, as the user sees it: a read-only token
//! refuses every change at once (EROFS, nothing queued), and changes the
//! server refused for good (parked) are named by path.

use crate::cache::CacheError;
use crate::replica::{Replica, ReplicaError};
use izo_proto::*;
use std::collections::{HashMap, HashSet};

/// A change the server refused for good, kept in the cache's parked list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Its place in the modification log.
    pub lsn: u64,
    /// The op kind (`write`, `create`, …).
    pub kind: &'static str,
    /// The path it changed, as the cache knows it now (`None`: no longer
    /// in the namespace); a rename names both ends (`old -> new`).
    pub path: Option<String>,
    /// The object it changed (for a change whose path is gone).
    pub object: Option<ObjectId>,
    /// Bytes of data kept with it (a write's).
    pub bytes: usize,
    /// Why the server refused it.
    pub error: OpError,
}

/// The directory entry an op names, if it names one.
fn entry_of(op: &Op) -> Option<(ObjectId, &[u8])> {
    match op {
        Op::Create { parent, name, .. }
        | Op::Mkdir { parent, name, .. }
        | Op::Symlink { parent, name, .. }
        | Op::Mknod { parent, name, .. }
        | Op::Link { parent, name, .. }
        | Op::Unlink { parent, name, .. }
        | Op::Rmdir { parent, name, .. }
        | Op::Rename { parent, name, .. } => Some((*parent, name)),
        _ => None,
    }
}

/// Where each object sits: one walk of the cached namespace, stopping
/// once every wanted object is found.
fn locate(r: &Replica, wanted: &HashSet<ObjectId>) -> Result<HashMap<ObjectId, String>, CacheError> {
    let mut found = HashMap::from([(ObjectId::ROOT, String::new())]);
    let mut dirs = vec![ObjectId::ROOT];
    while let Some(dir) = dirs.pop() {
        if wanted.iter().all(|w| found.contains_key(w)) {
            break;
        }
        let base = found.get(&dir).cloned().unwrap_or_default();
        for (name, id) in r.cache.children(dir)? {
            let path = format!("{base}/{}", String::from_utf8_lossy(&name));
            if r.cache.get(id)?.is_some_and(|c| c.attr.kind == FileKind::Dir) {
                dirs.push(id);
            }
            found.entry(id).or_insert(path);
        }
    }
    Ok(found)
}

impl Replica {
    /// EROFS at once when the token does not allow changes: called first
    /// by every entry point that changes the replica.
    pub(crate) fn check_writable(&self) -> Result<(), ReplicaError> {
        match self.client.writable() {
            true => Ok(()),
            false => Err(ReplicaError::ReadOnly("the token gives read-only access to this volume".into())),
        }
    }

    /// Where `op` acts, for a log line: the path of the entry it names, or
    /// of the object it changes (`?` when no longer in the namespace).
    pub fn path_of(&self, op: &Op) -> String {
        let mut wanted = HashSet::new();
        wanted.extend(entry_of(op).map(|(parent, _)| parent).or(op.changed_object()));
        let at = locate(self, &wanted).unwrap_or_default();
        let path = match entry_of(op) {
            Some((parent, name)) => at.get(&parent).map(|d| format!("{d}/{}", String::from_utf8_lossy(name))),
            None => op.changed_object().and_then(|id| at.get(&id).cloned()),
        };
        path.unwrap_or_else(|| "?".into())
    }

    /// The changes the server refused for good, each with the path it
    /// changed (relative to the mount point, starting with `/`).
    pub fn refused(&self) -> Result<Vec<Refused>, CacheError> {
        let parked = self.cache.parked()?;
        let mut wanted = HashSet::new();
        for (_, p) in &parked {
            wanted.extend(entry_of(&p.op).map(|(parent, _)| parent).or(p.op.changed_object()));
            if let Op::Rename { new_parent, .. } = &p.op {
                wanted.insert(*new_parent);
            }
        }
        let at = locate(self, &wanted)?;
        let under = |dir: &ObjectId, name: &[u8]| at.get(dir).map(|d| format!("{d}/{}", String::from_utf8_lossy(name)));
        Ok(parked
            .into_iter()
            .map(|(lsn, p)| {
                let path = match (&p.op, entry_of(&p.op)) {
                    _ if p.kept.is_some() => {
                        p.kept.as_ref().map(|k| format!("{} (kept in {})", k.path, k.file.display()))
                    }
                    (Op::Rename { new_parent, new_name, .. }, Some((parent, name))) => {
                        let or_unknown = |p: Option<String>| p.unwrap_or_else(|| "?".into());
                        Some(format!(
                            "{} -> {}",
                            or_unknown(under(&parent, name)),
                            or_unknown(under(new_parent, new_name))
                        ))
                    }
                    (_, Some((parent, name))) => under(&parent, name),
                    (op, None) => op.changed_object().and_then(|id| at.get(&id).cloned()),
                };
                let object = p.op.changed_object().or(p.op.new_object());
                let bytes = match &p.op {
                    Op::Write { data, .. } | Op::Append { data, .. } => data.len(),
                    _ => 0,
                };
                Refused { lsn, kind: p.op.kind(), path, object, bytes, error: p.error }
            })
            .collect())
    }
}
