//! A cache's storage in memory, with the two crash models.
//!
//! Every file keeps what a reader sees (every write that returned) and what
//! the last sync made durable. A [`Crash::Kill`] keeps the first; a
//! [`Crash::PowerLoss`] goes back to the second, for the log files, the
//! data files and the database (an [`izo_memdisk::MemDisk`]) alike. A crash
//! also fences off the handles made before it: the cache that was running
//! is dead, and nothing it does afterwards (dropping its database, say)
//! reaches the storage. A clone made after the crash is the restarted
//! process's view.

use super::Storage;
use crate::cache::CacheError;
use izo_memdisk::MemDisk;
use izo_proto::ObjectId;
use redb::Database;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// How a simulated machine stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Crash {
    /// The daemon is killed: every write that returned survives.
    Kill,
    /// The machine loses power: only what a sync covered survives.
    PowerLoss,
}

/// One file of the storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Log(u64),
    Data(ObjectId),
}

#[derive(Default)]
struct State {
    /// What readers see.
    live: BTreeMap<Key, Vec<u8>>,
    /// What survives a power loss.
    durable: BTreeMap<Key, Vec<u8>>,
    /// Files whose live state differs from their durable one.
    unsynced: BTreeSet<Key>,
    /// The database's bytes.
    disk: MemDisk,
    /// Crashes so far: a handle of an older epoch belongs to a dead process.
    epoch: u64,
    /// Mutating steps so far.
    steps: u64,
    /// A crash armed for when `steps` reaches the number.
    armed: Option<(u64, Crash)>,
}

impl State {
    fn sync(&mut self, k: Key) {
        match self.live.get(&k) {
            Some(v) => self.durable.insert(k, v.clone()),
            None => self.durable.remove(&k),
        };
        self.unsynced.remove(&k);
    }

    fn crash(&mut self, how: Crash) {
        if how == Crash::PowerLoss {
            for k in std::mem::take(&mut self.unsynced) {
                match self.durable.get(&k) {
                    Some(v) => self.live.insert(k, v.clone()),
                    None => self.live.remove(&k),
                };
            }
            self.disk.power_loss();
        }
        self.epoch += 1;
        self.armed = None;
    }

    /// The file `k` to change (created empty if missing).
    fn file(&mut self, k: Key) -> &mut Vec<u8> {
        self.unsynced.insert(k);
        self.live.entry(k).or_default()
    }
}

/// A cache's storage in memory. Clones share it; a clone made after a
/// crash is the restarted process's (the ones made before are fenced off).
pub struct MemStorage {
    state: Arc<Mutex<State>>,
    epoch: u64,
}

impl Clone for MemStorage {
    fn clone(&self) -> MemStorage {
        let epoch = self.lock().epoch;
        MemStorage { state: self.state.clone(), epoch }
    }
}

impl std::fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStorage").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

impl Default for MemStorage {
    fn default() -> MemStorage {
        MemStorage::new()
    }
}

fn crashed() -> io::Error {
    io::Error::other("the storage crashed under this process (simulated)")
}

fn name(k: Key) -> PathBuf {
    match k {
        Key::Log(g) => PathBuf::from(format!("<memory>/changes.{g:020}.log")),
        Key::Data(id) => PathBuf::from(format!("<memory>/data/{id}")),
    }
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> MemStorage {
        MemStorage { state: Arc::default(), epoch: 0 }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The daemon is killed now: what was written stays.
    pub fn kill(&self) {
        self.lock().crash(Crash::Kill);
    }

    /// The machine loses power now: every write since its last sync is gone.
    pub fn power_loss(&self) {
        self.lock().crash(Crash::PowerLoss);
    }

    /// Crash `how` in place of the mutating step after the next `steps`
    /// ones (a write, a sync, a removal, of any file or the database).
    pub fn crash_after(&self, steps: u64, how: Crash) {
        let mut st = self.lock();
        st.armed = Some((st.steps + steps, how));
    }

    /// Mutating steps taken so far.
    pub fn steps(&self) -> u64 {
        self.lock().steps
    }

    /// Whether a crash happened since this handle was made.
    pub fn is_fenced(&self) -> bool {
        self.lock().epoch != self.epoch
    }

    /// The state, if this handle's process is alive.
    fn look(&self) -> io::Result<MutexGuard<'_, State>> {
        let st = self.lock();
        if st.epoch != self.epoch {
            return Err(crashed());
        }
        Ok(st)
    }

    /// The state for one mutating step, unless an armed crash falls here.
    fn step(&self) -> io::Result<MutexGuard<'_, State>> {
        let mut st = self.look()?;
        if let Some((at, how)) = st.armed {
            if st.steps >= at {
                st.crash(how);
                return Err(crashed());
            }
        }
        st.steps += 1;
        Ok(st)
    }

    fn at<T>(&self, k: Key, r: io::Result<T>) -> Result<T, CacheError> {
        r.map_err(|err| CacheError::Io { path: name(k), err })
    }

    fn change(&self, k: Key, f: impl FnOnce(&mut Vec<u8>)) -> Result<(), CacheError> {
        let mut st = self.at(k, self.step())?;
        f(st.file(k));
        Ok(())
    }
}

/// redb's view of the database bytes, fenced like every other file.
#[derive(Debug)]
struct Backend(MemStorage);

impl redb::StorageBackend for Backend {
    fn len(&self) -> io::Result<u64> {
        let disk = self.0.look()?.disk.clone();
        disk.len()
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let disk = self.0.look()?.disk.clone();
        disk.read(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.step()?.disk.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> io::Result<()> {
        self.0.step()?.disk.sync_data(eventual)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.step()?.disk.write(offset, data)
    }
}

impl Storage for MemStorage {
    fn dir(&self) -> Option<&Path> {
        None
    }

    fn db_name(&self) -> PathBuf {
        PathBuf::from("<memory>/cache.redb")
    }

    fn open_db(&self, cache_bytes: usize) -> Result<Database, CacheError> {
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create_with_backend(Backend(self.clone_same_epoch()))
            .map_err(|e| CacheError::Db { path: self.db_name(), why: e.to_string() })
    }

    fn log_gens(&self) -> Result<Vec<u64>, CacheError> {
        let st = self.at(Key::Log(0), self.look())?;
        Ok(st.live.keys().filter_map(|k| if let Key::Log(g) = k { Some(*g) } else { None }).collect())
    }

    fn log_len(&self, gen: u64) -> Result<u64, CacheError> {
        let st = self.at(Key::Log(gen), self.look())?;
        Ok(st.live.get(&Key::Log(gen)).map_or(0, |v| v.len() as u64))
    }

    fn log_append(&self, gen: u64, bytes: &[u8]) -> Result<(), CacheError> {
        self.change(Key::Log(gen), |f| f.extend_from_slice(bytes))
    }

    fn log_read(&self, gen: u64) -> Result<Vec<u8>, CacheError> {
        let k = Key::Log(gen);
        let st = self.at(k, self.look())?;
        let found = st.live.get(&k).cloned().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound));
        self.at(k, found)
    }

    fn log_replace(&self, gen: u64, bytes: &[u8]) -> Result<(), CacheError> {
        let k = Key::Log(gen);
        let mut st = self.at(k, self.step())?;
        *st.file(k) = bytes.to_vec();
        st.sync(k);
        Ok(())
    }

    fn log_remove(&self, gen: u64) -> Result<(), CacheError> {
        let k = Key::Log(gen);
        let mut st = self.at(k, self.step())?;
        if st.live.remove(&k).is_some() {
            st.unsynced.insert(k);
        }
        Ok(())
    }

    fn data_create(&self, id: ObjectId) -> Result<(), CacheError> {
        self.change(Key::Data(id), Vec::clear)
    }

    fn data_write_at(&self, id: ObjectId, offset: u64, bytes: &[u8]) -> Result<(), CacheError> {
        let k = Key::Data(id);
        let Some(end) = usize::try_from(offset).ok().and_then(|o| o.checked_add(bytes.len())) else {
            return self.at(k, Err(io::ErrorKind::InvalidInput.into()));
        };
        self.change(k, |f| {
            if f.len() < end {
                f.resize(end, 0);
            }
            f[end - bytes.len()..end].copy_from_slice(bytes);
        })
    }

    fn data_read_at(&self, id: ObjectId, offset: u64, buf: &mut [u8]) -> Result<usize, CacheError> {
        let k = Key::Data(id);
        let st = self.at(k, self.look())?;
        let Some(f) = st.live.get(&k) else { return Ok(0) };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(f.len());
        let n = buf.len().min(f.len() - start);
        buf[..n].copy_from_slice(&f[start..start + n]);
        Ok(n)
    }

    fn data_len(&self, id: ObjectId) -> Result<Option<u64>, CacheError> {
        let k = Key::Data(id);
        let st = self.at(k, self.look())?;
        Ok(st.live.get(&k).map(|f| f.len() as u64))
    }

    fn data_set_len(&self, id: ObjectId, len: u64) -> Result<(), CacheError> {
        let k = Key::Data(id);
        let len = self.at(k, usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput.into()))?;
        self.change(k, |f| f.resize(len, 0))
    }

    fn data_punch(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError> {
        self.change(Key::Data(id), |f| {
            let start = usize::try_from(offset).unwrap_or(usize::MAX).min(f.len());
            let end = usize::try_from(offset.saturating_add(len)).unwrap_or(usize::MAX).min(f.len());
            f[start..end].fill(0);
        })
    }

    fn data_allocate(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError> {
        let k = Key::Data(id);
        let end = offset.checked_add(len).and_then(|e| usize::try_from(e).ok());
        let end = self.at(k, end.ok_or_else(|| io::ErrorKind::InvalidInput.into()))?;
        self.change(k, |f| {
            if f.len() < end {
                f.resize(end, 0);
            }
        })
    }

    fn data_remove(&self, id: ObjectId) -> Result<(), CacheError> {
        let k = Key::Data(id);
        let mut st = self.at(k, self.step())?;
        if st.live.remove(&k).is_some() {
            st.unsynced.insert(k);
        }
        Ok(())
    }

    fn data_sync(&self, id: ObjectId) -> Result<(), CacheError> {
        let k = Key::Data(id);
        self.at(k, self.step())?.sync(k);
        Ok(())
    }

    fn sync_all(&self) -> Result<(), CacheError> {
        let mut st = self.at(Key::Log(0), self.step())?;
        for k in std::mem::take(&mut st.unsynced) {
            st.sync(k);
        }
        Ok(())
    }
}

impl MemStorage {
    /// A separate copy of what a reader sees now, all of it durable and
    /// shared with nobody (to run a twin from the same state).
    pub fn fork(&self) -> MemStorage {
        use redb::StorageBackend;
        let st = self.lock();
        let disk = MemDisk::new();
        let bytes = st.disk.len().and_then(|n| st.disk.read(0, n as usize));
        if let Ok(b) = bytes {
            let _ = disk.write(0, &b).and_then(|_| disk.sync_data(false));
        }
        let copy = State { live: st.live.clone(), durable: st.live.clone(), disk, ..State::default() };
        MemStorage { state: Arc::new(Mutex::new(copy)), epoch: 0 }
    }

    /// A handle of this one's process (a plain clone takes the newest).
    fn clone_same_epoch(&self) -> MemStorage {
        MemStorage { state: self.state.clone(), epoch: self.epoch }
    }
}
