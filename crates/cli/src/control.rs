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

/// Where the daemon with this pid listens.
pub fn socket_path(pid: u32) -> PathBuf {
    PathBuf::from("/run/izo").join(format!("{pid}.sock"))
}

/// What `izo status` reports besides the replica's own numbers.
pub struct Info {
    pub volume: String,
    pub addr: String,
    pub cache: PathBuf,
    pub mountpoint: PathBuf,
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p).map(|rd| rd.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

async fn status(r: &Replica, info: &Info) -> String {
    let at = r.applied_seq();
    let server = tokio::time::timeout(Duration::from_secs(1), r.client.server_stats()).await;
    let counter = |s: &[(String, u64)], name: &str| s.iter().find(|(k, _)| k == name).map(|(_, v)| *v);
    let (conn, head, commits) = match &server {
        Ok(Ok(s)) => (
            "connected",
            counter(s, "applied_seq"),
            match (counter(s, "records"), counter(s, "batches"), counter(s, "fsyncs")) {
                (Some(r), Some(b), Some(f)) => {
                    format!("server: {r} records in {b} group commits ({f} fsyncs) since it started\n")
                }
                _ => String::new(),
            },
        ),
        _ => ("not answering", None, String::new()),
    };
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
    let ops: Vec<String> = r.ops.list().iter().map(|(k, v)| format!("{k} {v}")).collect();
    let kept = r.parked().unwrap_or_default();
    let kept = if kept.is_empty() {
        String::new()
    } else {
        format!("parked (refused by the server, kept in the cache):\n  {}\n", kept.join("\n  "))
    };
    let db = std::fs::metadata(info.cache.join("cache.redb")).map(|m| m.len()).unwrap_or(0);
    let data = dir_size(&info.cache.join("data"));
    format!(
        "volume: {} from {} mounted at {} (replicate mode, replica {:?})\n\
         connection: {conn}\n\
         stream: applied through seq {at}; {lag}\n\
         pending: {} changes made here not answered yet ({} bytes); {} answered, {} retried, {} refused \
         (parked) since start\n\
         {commits}fetched: {} bytes from the server since start\n\
         cache: {} ({:.1} MB of data, {:.1} MB of metadata)\n\
         requests served: {}\n{kept}",
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
            let answer = match line.trim() {
                "sync" => match r.sync().await {
                    Ok(seq) => format!("synced: this replica has everything the server had applied (seq {seq})\n"),
                    Err(e) => format!("error: {e}\n"),
                },
                "status" => status(&r, &info).await,
                other => format!("error: unknown command {other:?}\n"),
            };
            let _ = wr.write_all(answer.as_bytes()).await;
        });
    }
}

/// The intermezzo mount holding `path`: its daemon's pid.
fn mount_of(path: &Path) -> Result<(PathBuf, u32)> {
    let path = std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    let mut best: Option<(PathBuf, u32)> = None;
    for line in info.lines() {
        let Some((_, after)) = line.split_once(" - fuse.izo ") else { continue };
        let Some(pid) = after.split(' ').next().and_then(|s| s.strip_prefix("izo:")).and_then(|p| p.parse().ok())
        else {
            continue;
        };
        let mp = PathBuf::from(line.split(' ').nth(4).unwrap_or_default().replace("\\040", " "));
        if path.starts_with(&mp) && best.as_ref().is_none_or(|(b, _)| mp.as_os_str().len() > b.as_os_str().len()) {
            best = Some((mp, pid));
        }
    }
    best.with_context(|| format!("{} is not inside an intermezzo mount", path.display()))
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
    s.set_read_timeout(Some(Duration::from_secs(30))).context("socket timeout")?;
    s.write_all(format!("{cmd}\n").as_bytes()).context("sending the command")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).with_context(|| format!("reading the answer of {}", sock.display()))?;
    print!("{answer}");
    if answer.starts_with("error") || answer.is_empty() {
        bail!("{cmd} on {} failed", mp.display());
    }
    Ok(())
}
