//! The journal disk as one server process sees it: a handle on the shared
//! in-memory disk that stops writing when that process dies, so a crashed
//! store dropped afterwards cannot touch what its successor reads.

use izo_memdisk::MemDisk;
use redb::StorageBackend;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A process's handle on the disk.
#[derive(Debug)]
pub(crate) struct Attached {
    disk: MemDisk,
    state: Arc<Access>,
}

/// What a process may still do with its disk handle.
#[derive(Debug, Default)]
pub(crate) struct Access {
    /// Set when the disk fails: every later write and sync fails.
    writes_fail: AtomicBool,
    /// Set when the process dies: every later call fails.
    dead: AtomicBool,
}

impl Access {
    /// The disk refuses writes from now on.
    pub(crate) fn fail_writes(&self) {
        self.writes_fail.store(true, Ordering::Release);
    }

    /// The process is gone: its handle does nothing any more.
    pub(crate) fn kill(&self) {
        self.dead.store(true, Ordering::Release);
        self.fail_writes();
    }
}

impl Attached {
    /// Attach a new process to `disk`; the returned access ends it.
    pub(crate) fn new(disk: &MemDisk) -> (Attached, Arc<Access>) {
        let state = Arc::new(Access::default());
        (Attached { disk: disk.clone(), state: state.clone() }, state)
    }

    fn alive(&self) -> io::Result<()> {
        if self.state.dead.load(Ordering::Acquire) {
            return Err(io::Error::other("the simulated server process is gone"));
        }
        Ok(())
    }

    fn check(&self) -> io::Result<()> {
        self.alive()?;
        if self.state.writes_fail.load(Ordering::Acquire) {
            return Err(io::Error::other("the simulated journal disk refuses writes"));
        }
        Ok(())
    }
}

impl StorageBackend for Attached {
    fn len(&self) -> io::Result<u64> {
        self.alive()?;
        self.disk.len()
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.alive()?;
        self.disk.read(offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.disk.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> io::Result<()> {
        self.check()?;
        self.disk.sync_data(eventual)
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.disk.write(offset, data)
    }
}
