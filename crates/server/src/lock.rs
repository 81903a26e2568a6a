//! One server per state dir and one per export. Both are claimed with an
//! exclusive `flock` before anything is read or changed: `server.lock` in
//! the state dir and `server.lock` in the export's stage directory (so the
//! export is claimed whatever path or bind mount leads to it). Each lock
//! file names the server holding it, for the message the next one prints.
//! The kernel drops a lock when its holder exits, even on SIGKILL.

use crate::config::ServerConfig;
use crate::{sys, ServerError};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Name of the lock file, in the state dir and in the stage directory.
pub const LOCK_FILE: &str = "server.lock";

/// The two locks of a running server; dropping them releases both.
pub struct Locks {
    state: File,
    export: File,
    /// Device and inode of the stage directory the export lock is in.
    pub(crate) stage: (u64, u64),
    info: Info,
}

#[derive(Clone)]
struct Info {
    state: PathBuf,
    export: PathBuf,
    listen: String,
}

impl Info {
    fn text(&self) -> String {
        format!(
            "pid {}\nstate {}\nexport {}\nlisten {}\n",
            std::process::id(),
            self.state.display(),
            self.export.display(),
            self.listen
        )
    }
}

/// Who holds a lock, as its file says.
fn holder(f: &File) -> String {
    let mut buf = vec![0u8; 4096];
    let n = f.read_at(&mut buf, 0).unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()));
    match (field("pid "), field("state "), field("export "), field("listen ")) {
        (Some(pid), Some(state), Some(export), Some(listen)) => {
            format!("pid {pid}, state dir {state}, export {export}, listening on {listen}")
        }
        _ => "a server that is just starting".into(),
    }
}

/// Take an exclusive lock on `f` without waiting; false if another holds it.
fn try_lock(f: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    match sys::cvt(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

fn write_info(f: &File, info: &Info) -> io::Result<()> {
    f.set_len(0)?;
    f.write_all_at(info.text().as_bytes(), 0)
}

impl Locks {
    /// Claim the state dir and the export of `cfg`, creating the state dir
    /// and the stage directory if needed and nothing else. Fails naming the
    /// server that holds either.
    pub fn take(cfg: &ServerConfig) -> Result<Locks, ServerError> {
        let state = cfg.state_path();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&state)
            .map_err(|e| ServerError::io(format!("creating state dir {}", state.display()), e))?;
        let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let info = Info { state: abs(&state), export: abs(&cfg.export), listen: cfg.listen.clone() };
        let path = state.join(LOCK_FILE);
        let state_lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| ServerError::io(format!("opening {}", path.display()), e))?;
        if !try_lock(&state_lock).map_err(|e| ServerError::io(format!("locking {}", path.display()), e))? {
            return Err(ServerError::Busy(format!(
                "state dir {} is in use by another izo serve ({}); stop that server first, or give this one \
                 its own --state",
                info.state.display(),
                holder(&state_lock)
            )));
        }
        let (export_lock, stage) = lock_export(&cfg.export, &info)?;
        write_info(&state_lock, &info).map_err(|e| ServerError::io(format!("writing {}", path.display()), e))?;
        Ok(Locks { state: state_lock, export: export_lock, stage, info })
    }

    /// Note the address actually listened on in both lock files.
    pub fn set_listen(&mut self, addr: &str) {
        self.info.listen = addr.to_string();
        for f in [&self.state, &self.export] {
            if let Err(e) = write_info(f, &self.info) {
                tracing::warn!("updating a lock file with the listen address: {e}");
            }
        }
    }
}

/// Lock `export/.izo-stage/server.lock`; also returns the stage
/// directory's device and inode.
fn lock_export(export: &Path, info: &Info) -> Result<(File, (u64, u64)), ServerError> {
    let what = |w: &str| format!("{w} in export {}", export.display());
    let root = sys::open_dir_path(export).map_err(|e| ServerError::io(what("opening the root"), e))?;
    match sys::mkdirat(root.as_fd(), crate::tree::STAGE_DIR, 0o700) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(ServerError::io(what("creating the stage directory"), e))
        }
        _ => {}
    }
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let stage = sys::openat(root.as_fd(), crate::tree::STAGE_DIR, flags, 0)
        .map_err(|e| ServerError::io(what("opening the stage directory"), e))?;
    let st = sys::fstatat(stage.as_fd(), b"").map_err(|e| ServerError::io(what("stat of the stage directory"), e))?;
    let flags = libc::O_RDWR | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let fd: OwnedFd = sys::openat(stage.as_fd(), LOCK_FILE.as_bytes(), flags, 0o600)
        .map_err(|e| ServerError::io(what("opening the lock file"), e))?;
    let f = File::from(fd);
    if !try_lock(&f).map_err(|e| ServerError::io(what("locking"), e))? {
        return Err(ServerError::Busy(format!(
            "export {} is already served by another izo serve ({}); stop that server first (one server per \
             export)",
            info.export.display(),
            holder(&f)
        )));
    }
    write_info(&f, info).map_err(|e| ServerError::io(what("writing the lock file"), e))?;
    Ok((f, (st.st_dev, st.st_ino)))
}
