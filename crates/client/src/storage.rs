//! Where the cache's bytes live: the seam between the cache and the disk.
//!
//! The cache writes three things: its redb database, its append-only log
//! files (`changes.<gen>.log`) and one data file per regular file. A
//! [`Storage`] gives it all three. [`Disk`] is the real one (files under
//! the cache directory, the layout of docs/formats.md); [`MemStorage`]
//! keeps everything in memory and can crash in the two ways that matter:
//! a process kill (every write that returned survives) and a power loss
//! (only what a sync covered survives). Tests and the simulation run whole
//! caches on it, crash them and reopen a cache on what is left.
//!
//! Only [`Disk`] has real files, so only it can hand a data file's path
//! to the kernel (the FUSE passthrough path).

// redb's error is large; it only travels on the rare failure path.
#![allow(clippy::result_large_err)]

mod mem;

pub use mem::{Crash, MemStorage};

use crate::cache::CacheError;
use izo_proto::ObjectId;
use redb::Database;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// What the cache writes outside its database, and the database itself.
///
/// Every call is one step a crash can fall before or after: a write that
/// returned is in the page cache (a kill keeps it), and only
/// [`Storage::sync_all`], [`Storage::data_sync`], a durable redb commit and
/// [`Storage::log_replace`] make anything survive a power loss.
pub trait Storage: Send + Sync {
    /// The cache directory, if the cache lives in real files.
    fn dir(&self) -> Option<&Path>;
    /// A name for the database in error messages.
    fn db_name(&self) -> PathBuf;
    /// Open (or create) the database, with redb's page cache of `cache_bytes`.
    fn open_db(&self, cache_bytes: usize) -> Result<Database, CacheError>;

    /// Generations of the log files present, oldest first.
    fn log_gens(&self) -> Result<Vec<u64>, CacheError>;
    /// Bytes in a log file (0 if it does not exist).
    fn log_len(&self, gen: u64) -> Result<u64, CacheError>;
    /// Append `bytes` to a log file (created if missing), in one write.
    fn log_append(&self, gen: u64, bytes: &[u8]) -> Result<(), CacheError>;
    /// The whole content of a log file.
    fn log_read(&self, gen: u64) -> Result<Vec<u8>, CacheError>;
    /// Replace a log file's content at once, durably (a crash leaves the
    /// old or the new content).
    fn log_replace(&self, gen: u64, bytes: &[u8]) -> Result<(), CacheError>;
    /// Remove a log file (absent is fine).
    fn log_remove(&self, gen: u64) -> Result<(), CacheError>;

    /// Create an empty data file, truncating one that exists.
    fn data_create(&self, id: ObjectId) -> Result<(), CacheError>;
    /// Write at `offset` (the file is created if missing).
    fn data_write_at(&self, id: ObjectId, offset: u64, bytes: &[u8]) -> Result<(), CacheError>;
    /// Read at `offset` into `buf`: the bytes read (fewer at the end, 0
    /// past it or when the file is missing).
    fn data_read_at(&self, id: ObjectId, offset: u64, buf: &mut [u8]) -> Result<usize, CacheError>;
    /// A data file's length, `None` if it does not exist.
    fn data_len(&self, id: ObjectId) -> Result<Option<u64>, CacheError>;
    /// Truncate or extend with zeros (the file is created if missing).
    fn data_set_len(&self, id: ObjectId, len: u64) -> Result<(), CacheError>;
    /// Deallocate a range, keeping the size (it reads as zeros after).
    fn data_punch(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError>;
    /// Allocate a range (fallocate mode 0: may grow the file, with zeros).
    fn data_allocate(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError>;
    /// Remove a data file (absent is fine).
    fn data_remove(&self, id: ObjectId) -> Result<(), CacheError>;
    /// Make one data file durable (fsync).
    fn data_sync(&self, id: ObjectId) -> Result<(), CacheError>;
    /// Make every data file and log file durable (syncfs of the cache's
    /// file system).
    fn sync_all(&self) -> Result<(), CacheError>;

    /// Keep (`true`) or give up (`false`) the reserve: room on the cache's
    /// disk held back so that a delete or truncate (which needs log space
    /// and free database pages) still works on a full disk. Returns whether
    /// the reserve is held now. Storage without a disk has none.
    fn reserve(&self, _keep: bool) -> Result<bool, CacheError> {
        Ok(false)
    }
}

/// Bytes held back on the cache's disk for deletes and truncates.
pub const RESERVE: u64 = 8 << 20;

/// The cache in real files under a directory (today's layout).
pub struct Disk {
    dir: PathBuf,
    data: PathBuf,
    /// The log file taking appends, and its generation (kept open).
    log: Mutex<Option<(u64, File)>>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |err| CacheError::Io { path: path.to_path_buf(), err }
}

impl Disk {
    /// The cache in `dir` (its `data/` subdirectory is created).
    pub fn new(dir: &Path) -> Result<Disk, CacheError> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(io(&data))?;
        Ok(Disk { dir: dir.to_path_buf(), data, log: Mutex::new(None) })
    }

    /// Where data files live.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The data file of an object.
    pub fn data_path(&self, id: ObjectId) -> PathBuf {
        self.data.join(id.to_string())
    }

    fn log_path(&self, gen: u64) -> PathBuf {
        self.dir.join(format!("changes.{gen:020}.log"))
    }

    fn open_data(&self, id: ObjectId) -> Result<File, CacheError> {
        let path = self.data_path(id);
        OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io(&path))
    }

    fn fallocate(&self, id: ObjectId, mode: i32, offset: u64, len: u64) -> Result<(), CacheError> {
        use std::os::fd::AsRawFd;
        let f = self.open_data(id)?;
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) } != 0 {
            return Err(io(&self.data_path(id))(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn log_lock(&self) -> std::sync::MutexGuard<'_, Option<(u64, File)>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for Disk {
    fn dir(&self) -> Option<&Path> {
        Some(&self.dir)
    }

    fn db_name(&self) -> PathBuf {
        self.dir.join("cache.redb")
    }

    fn open_db(&self, cache_bytes: usize) -> Result<Database, CacheError> {
        let path = self.db_name();
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(&path)
            .map_err(|e| CacheError::Db { path, why: e.to_string() })
    }

    fn log_gens(&self) -> Result<Vec<u64>, CacheError> {
        let rd = std::fs::read_dir(&self.dir).map_err(io(&self.dir))?;
        let mut gens: Vec<u64> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("changes.")?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        gens.sort();
        Ok(gens)
    }

    fn log_len(&self, gen: u64) -> Result<u64, CacheError> {
        let path = self.log_path(gen);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn log_append(&self, gen: u64, bytes: &[u8]) -> Result<(), CacheError> {
        let path = self.log_path(gen);
        let mut log = self.log_lock();
        if log.as_ref().is_none_or(|(g, _)| *g != gen) {
            let f = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
            *log = Some((gen, f));
        }
        let (_, f) = log.as_mut().ok_or_else(|| io(&path)(std::io::ErrorKind::NotFound.into()))?;
        f.write_all(bytes).map_err(io(&path))
    }

    fn log_read(&self, gen: u64) -> Result<Vec<u8>, CacheError> {
        let path = self.log_path(gen);
        let mut buf = Vec::new();
        File::open(&path).and_then(|mut f| f.read_to_end(&mut buf)).map_err(io(&path))?;
        Ok(buf)
    }

    fn log_replace(&self, gen: u64, bytes: &[u8]) -> Result<(), CacheError> {
        let path = self.log_path(gen);
        let tmp = path.with_extension("log.upgrade");
        {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
        }
        let mut log = self.log_lock();
        if log.as_ref().is_some_and(|(g, _)| *g == gen) {
            *log = None;
        }
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    fn log_remove(&self, gen: u64) -> Result<(), CacheError> {
        let mut log = self.log_lock();
        if log.as_ref().is_some_and(|(g, _)| *g == gen) {
            *log = None;
        }
        let path = self.log_path(gen);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    fn data_create(&self, id: ObjectId) -> Result<(), CacheError> {
        let path = self.data_path(id);
        File::create(&path).map(drop).map_err(io(&path))
    }

    fn data_write_at(&self, id: ObjectId, offset: u64, bytes: &[u8]) -> Result<(), CacheError> {
        self.open_data(id)?.write_all_at(bytes, offset).map_err(io(&self.data_path(id)))
    }

    fn data_read_at(&self, id: ObjectId, offset: u64, buf: &mut [u8]) -> Result<usize, CacheError> {
        let path = self.data_path(id);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(&path)(e)),
        };
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(got)
    }

    fn data_len(&self, id: ObjectId) -> Result<Option<u64>, CacheError> {
        let path = self.data_path(id);
        match std::fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn data_set_len(&self, id: ObjectId, len: u64) -> Result<(), CacheError> {
        self.open_data(id)?.set_len(len).map_err(io(&self.data_path(id)))
    }

    fn data_punch(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError> {
        self.fallocate(id, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }

    fn data_allocate(&self, id: ObjectId, offset: u64, len: u64) -> Result<(), CacheError> {
        self.fallocate(id, 0, offset, len)
    }

    fn data_remove(&self, id: ObjectId) -> Result<(), CacheError> {
        let path = self.data_path(id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    fn data_sync(&self, id: ObjectId) -> Result<(), CacheError> {
        let path = self.data_path(id);
        match File::open(&path) {
            Ok(f) => f.sync_data().map_err(io(&path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    fn reserve(&self, keep: bool) -> Result<bool, CacheError> {
        use std::os::fd::AsRawFd;
        let path = self.dir.join("reserve");
        if !keep {
            return match std::fs::remove_file(&path) {
                Ok(()) => Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(io(&path)(e)),
            };
        }
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == RESERVE) {
            return Ok(true);
        }
        // (allocated for real, not a sparse file: the blocks are what counts)
        let f = OpenOptions::new().create(true).write(true).truncate(false).open(&path).map_err(io(&path))?;
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, RESERVE as libc::off_t) } != 0 {
            let e = std::io::Error::last_os_error();
            drop(f);
            let _ = std::fs::remove_file(&path);
            return match e.raw_os_error() {
                // (no room for it now: taken again once there is)
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EOPNOTSUPP) => Ok(false),
                _ => Err(io(&path)(e)),
            };
        }
        Ok(true)
    }

    fn sync_all(&self) -> Result<(), CacheError> {
        use std::os::fd::AsRawFd;
        let d = File::open(&self.data).map_err(io(&self.data))?;
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
            return Err(io(&self.data)(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}
