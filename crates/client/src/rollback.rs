//! After the operator restored the server's state (`izo serve
//! --accept-rollback`), the volume has a new incarnation and this replica
//! resyncs from it. A file version this replica holds that the restored
//! server lacks (no file at that path with those bytes) is not deleted:
//! its bytes move to `<cache>/kept/` and it becomes a parked change named
//! by its path, listed by `izo status` and `izo sync` until resolved.

use crate::cache::{Edit, Kept, Parked};
use crate::replica::{Replica, ReplicaError};
use izo_proto::*;
use std::collections::HashMap;
use std::io::Read;

type R<T> = Result<T, ReplicaError>;

/// Paths of the objects of a snapshot (`/a/b`), from their first link.
fn snapshot_paths(entries: &[SnapshotEntry]) -> HashMap<String, &SnapshotEntry> {
    let up: HashMap<ObjectId, (ObjectId, &[u8])> =
        entries.iter().filter_map(|e| e.links.first().map(|(p, n)| (e.attr.id, (*p, n.as_slice())))).collect();
    let path_of = |mut id: ObjectId| -> Option<String> {
        let mut parts = Vec::new();
        for _ in 0..4096 {
            if id == ObjectId::ROOT {
                parts.reverse();
                return Some(parts.concat());
            }
            let (p, n) = up.get(&id)?;
            parts.push(format!("/{}", String::from_utf8_lossy(n)));
            id = *p;
        }
        None
    };
    entries.iter().filter_map(|e| Some((path_of(e.attr.id)?, e))).collect()
}

/// BLAKE3 of each 1 MiB block of a file, as the server lists them.
fn block_hashes(path: &std::path::Path) -> std::io::Result<Vec<[u8; 32]>> {
    let mut f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    loop {
        let mut got = 0;
        while got < buf.len() {
            match f.read(&mut buf[got..])? {
                0 => break,
                n => got += n,
            }
        }
        if got == 0 {
            return Ok(out);
        }
        out.push(*blake3::hash(&buf[..got]).as_bytes());
        if got < buf.len() {
            return Ok(out);
        }
    }
}

impl Replica {
    /// Keep, as parked changes, the file versions this replica holds that
    /// the snapshot of a restored server lacks; called before the cache
    /// takes the snapshot. Returns how many were kept.
    pub(crate) fn keep_what_the_restored_server_lacks(&self, entries: &[SnapshotEntry]) -> R<usize> {
        let server = snapshot_paths(entries);
        let mut kept = 0;
        let kept_dir = self.cache.dir().join("kept");
        let mut files = Vec::new();
        // every file of the cached namespace with its path
        let mut dirs = vec![(ObjectId::ROOT, String::new())];
        // (a hard-linked file once, under its first name)
        let mut seen = std::collections::HashSet::new();
        while let Some((dir, base)) = dirs.pop() {
            for (name, id) in self.cache.children(dir)? {
                let path = format!("{base}/{}", String::from_utf8_lossy(&name));
                match self.cache.get(id)? {
                    Some(c) if c.attr.kind == FileKind::Dir => dirs.push((id, path)),
                    Some(c) if c.attr.kind == FileKind::File && seen.insert(id) => files.push((id, path, c.attr.size)),
                    _ => {}
                }
            }
        }
        for (id, path, size) in files {
            let data = self.cache.data_path(id);
            let ours = match block_hashes(&data) {
                Ok(h) => h,
                // no data file: no bytes of this file are held here
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(crate::cache::CacheError::Io { path: data.clone(), err }.into()),
            };
            let theirs = server.get(&path);
            if theirs.is_some_and(|e| e.attr.kind == FileKind::File && e.attr.size == size && e.blocks == ours) {
                continue; // the restored server has these bytes at this path
            }
            std::fs::create_dir_all(&kept_dir)
                .map_err(|err| crate::cache::CacheError::Io { path: kept_dir.clone(), err })?;
            let lsn = self.engine().take_lsn();
            let base = path.rsplit('/').next().unwrap_or("file");
            let file = kept_dir.join(format!("{lsn}-{base}"));
            std::fs::rename(&data, &file).map_err(|err| crate::cache::CacheError::Io { path: file.clone(), err })?;
            let error = match theirs {
                Some(e) => OpError::conflict(ConflictKind::DataMoved, Some(e.attr.clone())),
                None => OpError::conflict(ConflictKind::ObjectGone, None),
            };
            tracing::warn!(
                "{path}: the restored server lacks this replica's version; its bytes are kept in {} (izo status \
                 lists it)",
                file.display()
            );
            // (logged right after its move: a kill in between leaves the
            // bytes in kept/, unlisted but not lost)
            let op = Op::Write { id, base: 0, offset: 0, data: Vec::new() };
            self.cache.local(&[Edit::Park(lsn, Parked { op, error, kept: Some(Kept { path, file }) })])?;
            kept += 1;
        }
        Ok(kept)
    }
}
