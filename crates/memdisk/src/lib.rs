//! An in-memory disk for redb ([`redb::StorageBackend`]) with the two crash
//! models the tests need:
//!
//! - a **process kill**: every `write` that returned survives (the page
//!   cache keeps it), so nothing is dropped: [`MemDisk::kill`] is a no-op
//!   kept for symmetry;
//! - a **power loss**: only what a `sync_data` covered survives:
//!   [`MemDisk::power_loss`] drops every write since the last sync.
//!
//! Clones share the same bytes, so a database can be "reopened" from the
//! disk a crashed one left (open a new `Database` on a clone).

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default, Debug)]
struct Bytes {
    /// What a reader sees (every write that returned).
    live: Vec<u8>,
    /// What the last sync made durable.
    durable: Vec<u8>,
    /// Syncs done (a test can check that a commit synced).
    syncs: u64,
    /// Ranges of `live` written since the last sync: a sync copies only
    /// these, so a commit costs what it wrote, not the size of the disk.
    dirty: Vec<(usize, usize)>,
}

/// The disk. Cheap to clone; clones share the bytes.
#[derive(Clone, Default, Debug)]
pub struct MemDisk {
    bytes: Arc<Mutex<Bytes>>,
}

impl MemDisk {
    /// An empty disk.
    pub fn new() -> MemDisk {
        MemDisk::default()
    }

    fn lock(&self) -> MutexGuard<'_, Bytes> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A power loss: every write since the last sync is gone.
    pub fn power_loss(&self) {
        let mut b = self.lock();
        b.live = b.durable.clone();
        b.dirty.clear();
    }

    /// A process kill: what was written stays (nothing to do; named so a
    /// test says which model it means).
    pub fn kill(&self) {}

    /// Syncs done so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Bytes written since the last sync would be lost by a power loss.
    pub fn unsynced(&self) -> bool {
        let b = self.lock();
        b.live != b.durable
    }
}

impl redb::StorageBackend for MemDisk {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.lock().live.len() as u64)
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        let b = self.lock();
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = start.checked_add(len).filter(|e| *e <= b.live.len());
        match end {
            Some(end) => Ok(b.live[start..end].to_vec()),
            None => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of the disk")),
        }
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut b = self.lock();
        let old = b.live.len();
        resize(&mut b.live, len);
        if len > old {
            // (the zeros are new content too: the durable copy may hold old bytes there)
            b.dirty.push((old, len));
        }
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> Result<(), io::Error> {
        let mut b = self.lock();
        let Bytes { live, durable, dirty, .. } = &mut *b;
        resize(durable, live.len());
        for (start, end) in dirty.drain(..) {
            let end = end.min(live.len());
            if start < end {
                durable[start..end].copy_from_slice(&live[start..end]);
            }
        }
        b.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut b = self.lock();
        let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = start + data.len();
        if b.live.len() < end {
            resize(&mut b.live, end);
        }
        b.live[start..end].copy_from_slice(data);
        b.dirty.push((start, end));
        Ok(())
    }
}

/// `v.resize(len, 0)` as a zeroed allocation and a copy: `resize` fills
/// byte by byte when this crate is built without optimisation (tests), and
/// redb grows its file by megabytes.
fn resize(v: &mut Vec<u8>, len: usize) {
    if len > v.len() {
        v.extend_from_slice(&vec![0; len - v.len()]);
    } else {
        v.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{Database, Durability, ReadableTable, TableDefinition};

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn put(db: &Database, k: u64, durable: bool) {
        let mut tx = db.begin_write().expect("begin");
        if !durable {
            tx.set_durability(Durability::None);
        }
        tx.open_table(T).expect("table").insert(k, k).expect("insert");
        tx.commit().expect("commit");
    }

    fn keys(disk: &MemDisk) -> Vec<u64> {
        let db = Database::builder().create_with_backend(disk.clone()).expect("reopen");
        let tx = db.begin_read().expect("read");
        let t = tx.open_table(T).expect("table");
        t.iter().expect("iter").map(|r| r.expect("row").0.value()).collect()
    }

    /// A sync copies only what changed, yet a power loss shows exactly
    /// what the last sync saw: a shrunk and regrown tail reads as zeros.
    #[test]
    fn power_loss_shows_the_disk_as_last_synced() {
        use redb::StorageBackend;
        let disk = MemDisk::new();
        disk.write(0, &[7; 64]).expect("write");
        disk.sync_data(false).expect("sync");
        disk.set_len(16).expect("shrink");
        disk.set_len(64).expect("grow");
        disk.write(0, &[1; 4]).expect("write");
        disk.sync_data(false).expect("sync");
        disk.write(8, &[9; 4]).expect("unsynced write");
        disk.power_loss();
        let mut want = vec![1; 4];
        want.extend([7; 12]);
        want.extend([0; 48]);
        assert_eq!(disk.read(0, 64).expect("read"), want);
        assert!(!disk.unsynced());
    }

    /// A durable commit survives a power loss; a non-durable one only a kill.
    #[test]
    fn power_loss_keeps_only_durable_commits() {
        let disk = MemDisk::new();
        {
            let db = Database::builder().create_with_backend(disk.clone()).expect("create");
            put(&db, 1, true);
            put(&db, 2, false);
        }
        disk.kill();
        assert_eq!(keys(&disk), vec![1, 2], "a kill keeps every commit that returned");
        let disk = MemDisk::new();
        {
            let db = Database::builder().create_with_backend(disk.clone()).expect("create");
            put(&db, 1, true);
            put(&db, 2, false);
            // (dropping the database writes nothing durable behind the test's back)
            std::mem::forget(db);
        }
        disk.power_loss();
        assert_eq!(keys(&disk), vec![1], "a power loss keeps only what was synced");
    }
}
