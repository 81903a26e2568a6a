//! Read-only access to the metadata: lookups, listings, snapshots.

use crate::store::{db, Store, StoreError};
use crate::tables::*;
use izo_proto::*;
use redb::{Durability, ReadOnlyTable, ReadableTable};

type R<T> = Result<T, OpError>;

fn row_in(t: &ReadOnlyTable<&'static [u8], &'static [u8]>, id: ObjectId) -> R<ObjectRow> {
    match t.get(id.to_bytes().as_slice()).map_err(db)? {
        Some(v) => dec(v.value()).ok_or_else(|| StoreError::Corrupt("objects").into()),
        None => Err(OpError::NotFound(format!("object {id}"))),
    }
}

impl Store {
    /// Metadata row of an object.
    pub fn object(&self, id: ObjectId) -> R<ObjectRow> {
        let r = self.db.begin_read().map_err(db)?;
        row_in(&r.open_table(OBJECTS).map_err(db)?, id)
    }

    /// Attributes of an object.
    pub fn getattr(&self, id: ObjectId) -> R<Attr> {
        Ok(self.object(id)?.attr(id))
    }

    /// Resolve `name` in `parent`.
    pub fn lookup(&self, parent: ObjectId, name: &[u8]) -> R<Attr> {
        let r = self.db.begin_read().map_err(db)?;
        let d = r.open_table(DENTRIES).map_err(db)?;
        let child = d.get(dkey(parent, name).as_slice()).map_err(db)?.map(|v| id_at(v.value(), 0));
        let Some(child) = child else {
            return Err(OpError::NotFound(format!("{:?} in {parent}", String::from_utf8_lossy(name))));
        };
        Ok(row_in(&r.open_table(OBJECTS).map_err(db)?, child)?.attr(child))
    }

    /// Up to `max` entries of directory `id` after `cookie`.
    pub fn readdir(&self, id: ObjectId, cookie: u64, max: u32) -> R<(Vec<DirEntry>, bool)> {
        let r = self.db.begin_read().map_err(db)?;
        let objs = r.open_table(OBJECTS).map_err(db)?;
        if row_in(&objs, id)?.kind != FileKind::Dir {
            return Err(OpError::NotDir(format!("{id}")));
        }
        let cookies = r.open_table(COOKIES).map_err(db)?;
        let dents = r.open_table(DENTRIES).map_err(db)?;
        let lo = ckey(id, cookie.saturating_add(1));
        let (_, hi) = prefix_range(id);
        let mut out = Vec::new();
        let max = max.clamp(1, 4096) as usize;
        for row in cookies.range(lo.as_slice()..hi.as_slice()).map_err(db)? {
            if out.len() == max {
                return Ok((out, false));
            }
            let (k, name) = row.map_err(db)?;
            let c = u64::from_be_bytes(k.value()[16..24].try_into().map_err(|_| StoreError::Corrupt("cookies"))?);
            let name = name.value().to_vec();
            let child = dents.get(dkey(id, &name).as_slice()).map_err(db)?.map(|v| id_at(v.value(), 0));
            let Some(child) = child else { continue };
            out.push(DirEntry { attr: row_in(&objs, child)?.attr(child), name, cookie: c });
        }
        Ok((out, true))
    }

    /// Symlink target.
    pub fn readlink(&self, id: ObjectId) -> R<Vec<u8>> {
        self.object(id)?.target.ok_or_else(|| OpError::Invalid(format!("{id} is not a symlink")))
    }

    /// Extended attributes of an object, by name.
    pub fn xattrs(&self, id: ObjectId) -> R<Vec<(Vec<u8>, Vec<u8>)>> {
        let r = self.db.begin_read().map_err(db)?;
        row_in(&r.open_table(OBJECTS).map_err(db)?, id)?;
        xattrs_in(&r.open_table(XATTRS).map_err(db)?, id)
    }

    /// Block hashes of an object as stored (stale ones included; see
    /// `ObjectRow::stale`).
    pub fn hashes(&self, id: ObjectId) -> R<Vec<[u8; 32]>> {
        let r = self.db.begin_read().map_err(db)?;
        hashes_in(&r.open_table(HASHES).map_err(db)?, id)
    }

    /// An object's row and block hashes read together (one transaction).
    pub fn row_and_hashes(&self, id: ObjectId) -> R<(ObjectRow, Vec<[u8; 32]>)> {
        let r = self.db.begin_read().map_err(db)?;
        let row = row_in(&r.open_table(OBJECTS).map_err(db)?, id)?;
        Ok((row, hashes_in(&r.open_table(HASHES).map_err(db)?, id)?))
    }

    /// Store freshly computed block hashes if the data version is unchanged.
    pub fn set_hashes(&self, id: ObjectId, version: Seq, blocks: Vec<[u8; 32]>) -> R<bool> {
        Ok(self.set_hashes_many(vec![(id, version, blocks)])? == 1)
    }

    /// [`Store::set_hashes`] for many files in one transaction; how many
    /// were stored (the others changed meanwhile).
    pub fn set_hashes_many(&self, files: Vec<(ObjectId, Seq, Vec<[u8; 32]>)>) -> R<usize> {
        let mut tx = self.db.begin_write().map_err(db)?;
        tx.set_durability(Durability::None);
        let mut done = 0;
        {
            let mut t = tx.open_table(OBJECTS).map_err(db)?;
            let mut h = tx.open_table(HASHES).map_err(db)?;
            for (id, version, blocks) in files {
                let row = t.get(id.to_bytes().as_slice()).map_err(db)?.and_then(|v| dec::<ObjectRow>(v.value()));
                if let Some(mut row) = row.filter(|r| r.versions.data == version) {
                    row.stale.clear();
                    t.insert(id.to_bytes().as_slice(), enc(&row).as_slice()).map_err(db)?;
                    h.insert(id.to_bytes().as_slice(), blocks.concat().as_slice()).map_err(db)?;
                    done += 1;
                }
            }
        }
        tx.commit().map_err(db)?;
        Ok(done)
    }

    /// Ids of files with stale block hashes.
    pub fn stale_objects(&self) -> R<Vec<ObjectId>> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(OBJECTS).map_err(db)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            if dec::<ObjectRow>(v.value()).is_some_and(|r| !r.stale.is_empty()) {
                out.push(id_at(k.value(), 0));
            }
        }
        Ok(out)
    }

    /// Walk every object in one read transaction; returns the seq the
    /// snapshot is consistent at. `f` may stop the walk with an error.
    pub fn snapshot<E: From<OpError>>(&self, mut f: impl FnMut(SnapshotEntry) -> Result<(), E>) -> Result<Seq, E> {
        let r = self.db.begin_read().map_err(|e| OpError::from(db(e)))?;
        let seq = {
            let m = r.open_table(META).map_err(|e| OpError::from(db(e)))?;
            let v = m.get("head").map_err(|e| OpError::from(db(e)))?;
            v.and_then(|v| v.value().try_into().ok().map(u64::from_be_bytes)).unwrap_or(0)
        };
        let open = |e: redb::TableError| OpError::from(db(e));
        let objs = r.open_table(OBJECTS).map_err(open)?;
        let links = r.open_table(LINKS).map_err(open)?;
        let xattrs = r.open_table(XATTRS).map_err(open)?;
        let hashes = r.open_table(HASHES).map_err(open)?;
        for row in objs.iter().map_err(|e| OpError::from(db(e)))? {
            let (k, v) = row.map_err(|e| OpError::from(db(e)))?;
            let id = id_at(k.value(), 0);
            let row: ObjectRow = dec(v.value()).ok_or_else(|| OpError::from(StoreError::Corrupt("objects")))?;
            let (lo, hi) = prefix_range(id);
            let mut names = Vec::new();
            for l in links.range(lo.as_slice()..hi.as_slice()).map_err(|e| OpError::from(db(e)))? {
                let (lk, _) = l.map_err(|e| OpError::from(db(e)))?;
                names.push((id_at(lk.value(), 16), lk.value()[32..].to_vec()));
            }
            let entry = SnapshotEntry {
                attr: row.attr(id),
                links: names,
                target: row.target.clone(),
                xattrs: xattrs_in(&xattrs, id)?,
                // stale hashes would describe old content: send none, and
                // the receiver fetches the whole file
                blocks: if row.stale.is_empty() { hashes_in(&hashes, id)? } else { Vec::new() },
            };
            f(entry)?;
        }
        Ok(seq)
    }
}

pub(crate) fn hashes_in(t: &impl ReadableTable<&'static [u8], &'static [u8]>, id: ObjectId) -> R<Vec<[u8; 32]>> {
    let v = t.get(id.to_bytes().as_slice()).map_err(db)?;
    let Some(v) = v else { return Ok(Vec::new()) };
    Ok(v.value().chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect())
}

pub(crate) fn xattrs_in(
    t: &impl ReadableTable<&'static [u8], &'static [u8]>,
    id: ObjectId,
) -> R<Vec<(Vec<u8>, Vec<u8>)>> {
    let (lo, hi) = prefix_range(id);
    let mut out = Vec::new();
    for row in t.range(lo.as_slice()..hi.as_slice()).map_err(db)? {
        let (k, v) = row.map_err(db)?;
        out.push((k.value()[16..].to_vec(), v.value().to_vec()));
    }
    Ok(out)
}
