//! The mount daemon's control socket (`/run/izo/PID.sock`) and the
//! commands that use it: `izo sync [PATH]` (wait until this replica has
//! everything the server acked) and `izo status [PATH]`.

use anyhow::{bail, Context, Result};
use clap::Args;
use izo_client::replica::Replica;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Where control sockets live.
const SOCKET_DIR: &str = "/run/izo";

/// Where the daemon with this pid listens.
pub fn socket_path(pid: u32) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{pid}.sock"))
}

/// Remove the sockets of daemons that are gone (a SIGKILL leaves its
/// socket behind): their pid is dead, or reused by a process that does
/// not listen on it.
fn sweep_sockets(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_suffix(".sock")).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let alive = Path::new("/proc").join(pid.to_string()).exists();
        let refused = || {
            std::os::unix::net::UnixStream::connect(e.path())
                .is_err_and(|err| err.kind() == std::io::ErrorKind::ConnectionRefused)
        };
        if !alive || refused() {
            match std::fs::remove_file(e.path()) {
                Ok(()) => tracing::info!("removed {}: its daemon is gone", e.path().display()),
                Err(err) => tracing::warn!("removing the stale control socket {}: {err}", e.path().display()),
            }
        }
    }
}

/// This daemon's control socket (for `izo sync` and `izo status`), after
/// sweeping those of daemons that are gone.
pub fn listen(rt: &tokio::runtime::Runtime) -> Result<(PathBuf, tokio::net::UnixListener)> {
    let sock = socket_path(std::process::id());
    std::fs::create_dir_all(SOCKET_DIR).with_context(|| format!("creating {SOCKET_DIR}"))?;
    sweep_sockets(Path::new(SOCKET_DIR));
    let _ = std::fs::remove_file(&sock);
    let _g = rt.enter();
    let l = tokio::net::UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    Ok((sock, l))
}

/// What `izo status` reports besides the replica's own numbers.
pub struct Info {
    pub volume: String,
    pub addr: String,
    pub cache: PathBuf,
    pub mountpoint: PathBuf,
    /// Why the record stream stopped, if it did (the mount keeps serving).
    pub stream_stopped: std::sync::Mutex<Option<String>>,
}

impl Info {
    pub fn new(volume: String, addr: String, cache: PathBuf, mountpoint: PathBuf) -> Info {
        Info { volume, addr, cache, mountpoint, stream_stopped: Default::default() }
    }
}

/// The connection line of `izo status`: up, or why not and what to do.
fn connection(r: &Replica, answering: bool) -> String {
    use izo_client::ClientError;
    let ro = if r.client.writable() { "" } else { " (read-only token: the mount is read-only)" };
    let link = r.client.link();
    let offline = match link.offline.as_secs() {
        0 => String::new(),
        s => format!("; {s} s offline since the mount"),
    };
    if r.client.is_connected() {
        let slow = if answering { "" } else { ", but the server is not answering" };
        return format!("connected{ro}{slow} since {} ({} s){offline}", when(link.since), link.for_.as_secs());
    }
    let hint = match r.client.problem() {
        None => "connecting".to_string(),
        Some(e @ ClientError::Refused { reason: izo_proto::RefuseReason::Auth, .. }) => {
            format!("{e} (is the token still valid? remount with a token the server accepts)")
        }
        Some(e @ ClientError::Fingerprint(_)) => {
            format!("{e} (refused: the server may be an impostor; remount with --fingerprint if it changed on purpose)")
        }
        Some(e) => e.to_string(),
    };
    format!(
        "not connected{ro} since {} ({} s){offline}: {hint}; the mount serves its cache and keeps trying",
        when(link.since),
        link.for_.as_secs()
    )
}

/// A wall-clock time as people read it (UTC).
fn when(t: izo_proto::Timestamp) -> String {
    let days = t.secs.div_euclid(86_400);
    let secs = t.secs.rem_euclid(86_400);
    // (days since 1970-01-01 to a civil date: Howard Hinnant's algorithm)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The refused (parked) changes, one line each, named by path.
fn refused_lines(r: &Replica) -> Vec<String> {
    let refused = match r.refused() {
        Ok(v) => v,
        Err(e) => return vec![format!("(the parked list cannot be read: {e})")],
    };
    refused
        .into_iter()
        .map(|c| {
            let at = match (&c.path, c.object) {
                (Some(p), _) => p.clone(),
                (None, Some(id)) => format!("object {id} (no longer in the namespace)"),
                (None, None) => "?".into(),
            };
            format!("{at}: {} ({} bytes kept): {} (change {})", c.kind, c.bytes, c.error, c.lsn)
        })
        .collect()
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p).map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

async fn status(r: &Replica, info: &Info) -> String {
    let at = r.applied_seq();
    let server = tokio::time::timeout(Duration::from_secs(1), r.client.server_stats()).await;
    let counter = |s: &[(String, u64)], name: &str| s.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    let (answering, head, commits) = match &server {
        Ok(Ok(s)) => (
            true,
            counter(s, "applied_seq"),
            match (counter(s, "records"), counter(s, "batches"), counter(s, "fsyncs")) {
                (Some(r), Some(b), Some(f)) => {
                    format!("server: {r} records in {b} group commits ({f} fsyncs) since it started\n")
                }
                _ => String::new(),
            },
        ),
        _ => (false, None, String::new()),
    };
    let conn = connection(r, answering);
    let stopped = info.stream_stopped.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let stopped = stopped.map(|e| format!("; the stream stopped: {e}")).unwrap_or_default();
    let lag = match head {
        Some(h) if h > at => {
            let secs = r.applied_time().map(|t| (izo_proto::Timestamp::now().secs - t.secs).max(0));
            let secs = secs.map(|s| format!("{s} s")).unwrap_or_else(|| "?".into());
            format!("server at {h}: {} records and {secs} behind", h - at)
        }
        Some(h) => format!("server at {h}: up to date (0 records, 0 s behind)"),
        None => "server position unknown".into(),
    };
    let (pend, sent, parked, retried) = r.cml_stats();
    let oldest = match r.oldest_pending() {
        Some(t) => format!("; the oldest was made {} s ago", (izo_proto::Timestamp::now().secs - t.secs).max(0)),
        None => String::new(),
    };
    let ops: Vec<String> = r.ops.list().iter().map(|(k, v)| format!("{k} {v}")).collect();
    let kept = refused_lines(r);
    let kept = if kept.is_empty() {
        String::new()
    } else {
        format!("parked (refused by the server, kept in the cache):\n  {}\n", kept.join("\n  "))
    };
    let problems: String = r.cache_problems().iter().map(|p| format!("cache problem: {p}\n")).collect();
    let db = std::fs::metadata(info.cache.join("cache.redb")).map(|m| m.len()).unwrap_or(0);
    let data = dir_size(&info.cache.join("data"));
    format!(
        "volume: {} from {} mounted at {} (replicate mode, replica {:?})\n\
         connection: {conn}\n\
         stream: applied through seq {at}; {lag}{stopped}\n\
         pending: {} changes made here not answered yet ({} bytes){oldest}; {} answered, {} retried, {} \
         refused (parked) since start\n\
         {commits}fetched: {} bytes from the server since start\n\
         cache: {} ({:.1} MB of data, {:.1} MB of metadata)\n\
         requests served: {}\n{problems}{kept}",
        info.volume,
        info.addr,
        info.mountpoint.display(),
        r.client.replica(),
        pend.0,
        pend.1,
        sent,
        retried,
        parked,
        r.fetched(),
        info.cache.display(),
        data as f64 / 1e6,
        db as f64 / 1e6,
        ops.join(", "),
    )
}

/// Serve the control socket until the runtime stops.
pub async fn serve(listener: tokio::net::UnixListener, r: Arc<Replica>, info: Arc<Info>) {
    while let Ok((s, _)) = listener.accept().await {
        let (r, info) = (r.clone(), info.clone());
        tokio::spawn(async move {
            let (rd, mut wr) = s.into_split();
            let mut line = String::new();
            if BufReader::new(rd).read_line(&mut line).await.is_err() {
                return;
            }
            let mut words = line.split_whitespace();
            let (cmd, arg) = (words.next().unwrap_or_default(), words.next());
            let answer = match cmd {
                "sync" => {
                    match r.sync_within(Duration::from_secs(arg.and_then(|a| a.parse().ok()).unwrap_or(10))).await {
                        Ok(seq) => {
                            let refused = refused_lines(&r);
                            if refused.is_empty() {
                                format!("synced: this replica has everything the server had applied (seq {seq})\n")
                            } else {
                                format!(
                                    "error: the server refused {} changes made here; they are kept in the cache \
                                 (parked), not on the server:\n  {}\n",
                                    refused.len(),
                                    refused.join("\n  ")
                                )
                            }
                        }
                        Err(e) => format!("error: {e}\n"),
                    }
                }
                "status" => status(&r, &info).await,
                other => format!("error: unknown command {other:?}\n"),
            };
            let _ = wr.write_all(answer.as_bytes()).await;
        });
    }
}

/// One line of `/proc/self/mountinfo`.
pub struct MountEntry {
    /// Where it is mounted.
    pub point: PathBuf,
    /// File system type (`fuse.izo`, `fuse.sshfs`, `ext4`, …).
    pub fstype: String,
    /// Mount source (`izo:PID` for an intermezzo mount).
    pub source: String,
}

impl MountEntry {
    /// The pid of the intermezzo daemon serving it.
    pub fn izo_pid(&self) -> Option<u32> {
        (self.fstype == "fuse.izo").then(|| self.source.strip_prefix("izo:")?.parse().ok())?
    }
}

/// Undo mountinfo's octal escapes (`\040` for a space, …).
fn unescape(field: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let (mut out, mut i) = (Vec::with_capacity(b.len()), 0);
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Every mount this process sees.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let before: Vec<&str> = before.split(' ').collect();
            let mut after = after.split(' ');
            Some(MountEntry {
                point: unescape(before.get(4)?),
                fstype: after.next()?.to_string(),
                source: after.next()?.to_string(),
            })
        })
        .collect())
}

/// The intermezzo mount holding `path`: its daemon's pid.
fn mount_of(path: &Path) -> Result<(PathBuf, u32)> {
    let path = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let mut best: Option<(PathBuf, u32)> = None;
    for m in mounts()? {
        let Some(pid) = m.izo_pid() else { continue };
        if path.starts_with(&m.point)
            && best.as_ref().is_none_or(|(b, _)| m.point.as_os_str().len() > b.as_os_str().len())
        {
            best = Some((m.point, pid));
        }
    }
    best.with_context(|| format!("{} is not inside an intermezzo mount", path.display()))
}

#[derive(Args)]
pub struct SyncArgs {
    /// A path inside the mount (default: the current directory).
    #[arg(default_value = ".")]
    pub path: PathBuf,
    /// Give up after this many seconds, saying why (the server is away, or
    /// still applying changes made here, or the cache is full).
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

#[derive(Args)]
pub struct PathArg {
    /// A path inside the mount (default: the current directory).
    #[arg(default_value = ".")]
    pub path: PathBuf,
}

/// Ask the daemon of the mount holding `path`.
pub fn ask(path: &Path, cmd: &str) -> Result<()> {
    use std::io::{Read, Write};
    let (mp, pid) = mount_of(path)?;
    let sock = socket_path(pid);
    let mut s = std::os::unix::net::UnixStream::connect(&sock)
        .with_context(|| format!("connecting to the daemon of {} at {}", mp.display(), sock.display()))?;
    let name = cmd.split_whitespace().next().unwrap_or(cmd);
    let wait = cmd.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10u64);
    s.set_read_timeout(Some(Duration::from_secs(wait + 20))).context("socket timeout")?;
    s.write_all(format!("{cmd}\n").as_bytes()).context("sending the command")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).with_context(|| format!("reading the answer of {}", sock.display()))?;
    if answer.is_empty() {
        bail!("{name} on {}: the daemon ({}) gave no answer", mp.display(), sock.display());
    }
    if let Some(why) = answer.strip_prefix("error: ") {
        bail!("{name} on {}: {}", mp.display(), why.trim_end());
    }
    print!("{answer}");
    Ok(())
}
