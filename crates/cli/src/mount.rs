//! `izo mount`: a replicate-mode client — replicate the volume into a local
//! cache, mount it with FUSE, follow the server's record stream.

use anyhow::{bail, Context, Result};
use clap::Args;
use izo_client::replica::Replica;
use izo_client::start::{start, Progress, StartOpts};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct MountArgs {
    /// The volume: `HOST[:PORT]/VOLUME` (port 7227 by default).
    volume: String,
    /// Where to mount it.
    mountpoint: PathBuf,
    /// Cache mode: `replicate` keeps a full local replica.
    #[arg(long, default_value = "replicate")]
    mode: String,
    /// Access token (`izo token create` on the server).
    #[arg(long)]
    token: String,
    /// The server's certificate fingerprint (SHA256:…), as `izo serve`
    /// prints it. Without it, the certificate the server presents at the
    /// first mount is trusted and remembered in CACHE/server-fingerprint;
    /// a different one at a later mount or reconnect is refused. To accept
    /// a server's new certificate, pass it here (or remove that file).
    #[arg(long)]
    fingerprint: Option<String>,
    /// Cache directory (default: `/var/cache/izo/VOLUME` as root,
    /// `~/.cache/izo/VOLUME` otherwise).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// close(2) waits until the server has the file's changes (NFS-like
    /// close-to-open), as fsync does; by default close does not wait.
    #[arg(long)]
    sync_close: bool,
    /// Mount even if the mount point is not empty (its files are hidden
    /// while the volume is mounted).
    #[arg(long)]
    nonempty: bool,
    /// Let device nodes on the mount open their devices (mount option
    /// `dev`; the default is `nodev`). Device nodes exist only on volumes
    /// served with `--trusted`.
    #[arg(long)]
    dev: bool,
    /// Let set-user-ID and set-group-ID bits take effect (mount option
    /// `suid`; the default is `nosuid`). Only a `--trusted` volume keeps them.
    #[arg(long)]
    suid: bool,
}

fn parse_volume(v: &str) -> Result<(String, String)> {
    let Some((host, volume)) = v.rsplit_once('/') else {
        bail!("{v:?}: give the volume as HOST[:PORT]/VOLUME, e.g. 127.0.0.1:7227/home");
    };
    if volume.is_empty() || host.is_empty() {
        bail!("{v:?}: give the volume as HOST[:PORT]/VOLUME");
    }
    let addr = if host.contains(':') { host.to_string() } else { format!("{host}:7227") };
    Ok((addr, volume.to_string()))
}

fn default_cache(volume: &str) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/izo").join(volume);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/izo").join(volume)
}

/// Refuse a mount point that cannot or should not take the mount, before
/// anything is replicated: one that is missing, not a directory, already
/// a FUSE mount (mounting over it hides it, and stopping either daemon
/// would take both down), or not empty (unless `nonempty`).
fn check_mountpoint(mp: &Path, nonempty: bool) -> Result<()> {
    let shown = mp.display();
    // mountinfo first: a dead FUSE mount fails every stat (ENOTCONN)
    let parent = match mp.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let abs = match (std::fs::canonicalize(parent), mp.file_name()) {
        (Ok(p), Some(name)) => p.join(name),
        (Ok(_), None) => std::fs::canonicalize(mp).unwrap_or_else(|_| mp.to_path_buf()),
        (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("the mount point {shown} does not exist: create the directory (mkdir -p {shown})")
        }
        (Err(e), _) => return Err(e).with_context(|| format!("resolving {}", parent.display())),
    };
    for m in crate::control::mounts()?.into_iter().filter(|m| m.point == abs) {
        match m.izo_pid() {
            Some(pid) if Path::new("/proc").join(pid.to_string()).exists() => bail!(
                "{shown} is already an intermezzo mount (by PID {pid}): stop that daemon first \
                 (kill {pid}) or mount on another directory"
            ),
            Some(pid) => bail!(
                "{shown} is a dead intermezzo mount (its daemon, PID {pid}, is gone): clear it with \
                 `umount -l {shown}`, then mount again"
            ),
            None if m.fstype == "fuse" || m.fstype.starts_with("fuse.") || m.fstype == "fuseblk" => bail!(
                "{shown} is already a FUSE mount ({} from {}): unmount it first or mount on another directory",
                m.fstype,
                m.source
            ),
            None => {}
        }
    }
    match std::fs::metadata(mp) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("the mount point {shown} is not a directory: mount on a directory"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("the mount point {shown} does not exist: create the directory (mkdir -p {shown})")
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            bail!("{shown} is a dead FUSE mount: clear it with `umount -l {shown}`, then mount again")
        }
        Err(e) => return Err(e).with_context(|| format!("checking the mount point {shown}")),
    }
    let used = std::fs::read_dir(mp).with_context(|| format!("listing the mount point {shown}"))?.next().is_some();
    if used && !nonempty {
        bail!(
            "the mount point {shown} is not empty: its files would be hidden while the volume is mounted; \
             mount on an empty directory, or pass --nonempty to mount over them"
        );
    }
    Ok(())
}

/// What happens while the client starts, on stderr.
fn say(p: &Progress, addr: &str, began: Instant) {
    match p {
        Progress::FirstTrust { fingerprint, file } => eprintln!(
            "izo: first mount from {addr}: trusting its certificate {fingerprint} (remembered in {}; compare \
             it with the fingerprint `izo serve` printed)",
            file.display()
        ),
        Progress::Replaced { fingerprint, old, file } => {
            eprintln!("izo: the server's new certificate {fingerprint} replaces {old} in {}", file.display())
        }
        Progress::Replicating(p) => show(p, began),
        Progress::Offline { why } => eprintln!(
            "izo: offline: {why}; the mount works from its cache, keeps what you change, and connects to {addr} \
             in the background (izo status shows when)"
        ),
    }
}

fn show(p: &izo_client::replica::Progress, start: Instant) {
    let secs = start.elapsed().as_secs_f64().max(0.001);
    let rate = p.bytes_done as f64 / secs;
    let left = p.bytes.saturating_sub(p.bytes_done) as f64;
    let eta = if rate > 0.0 { format!("{:.0}s", left / rate) } else { "?".into() };
    eprint!(
        "\rizo: replicating: {}/{} files, {:.1}/{:.1} MB, {:.1} MB/s, ETA {eta}   ",
        p.files_done,
        p.files,
        p.bytes_done as f64 / 1e6,
        p.bytes as f64 / 1e6,
        rate / 1e6
    );
}

/// Before stopping: what was changed here is made durable and, if the
/// server answers within 2 s, sent (what is left goes at the next mount).
pub fn finish(rt: &tokio::runtime::Runtime, replica: &Replica) {
    if let Err(e) = replica.fold() {
        eprintln!("izo: making local changes durable: {e}");
    }
    let (left, _, _, _) = replica.cml_stats();
    if left.0 > 0 && rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), replica.sync()).await }).is_err()
    {
        let ((ops, bytes), _, _, _) = replica.cml_stats();
        eprintln!("izo: {ops} changes ({bytes} bytes) are kept in the cache and sent at the next mount");
    }
}

pub fn run(args: MountArgs) -> Result<()> {
    if args.mode != "replicate" {
        bail!("--mode {}: only `replicate` is built so far (on-demand mode is not)", args.mode);
    }
    let (addr, volume) = parse_volume(&args.volume)?;
    check_mountpoint(&args.mountpoint, args.nonempty)?;
    let cache_dir = args.cache.clone().unwrap_or_else(|| default_cache(&volume));
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let opts = StartOpts {
        addr: addr.clone(),
        volume: volume.clone(),
        token: args.token.clone(),
        fingerprint: args.fingerprint.clone(),
        cache_dir: cache_dir.clone(),
        sync_close: args.sync_close,
    };
    let began = Instant::now();
    let started = rt.block_on(start(opts, |p| say(p, &addr, began)))?;
    eprintln!();
    let replica = started.replica.clone();
    // the control socket answers before the mount appears: a script that
    // waits for the mount can run `izo sync` at once
    let info =
        Arc::new(crate::control::Info::new(volume.clone(), addr.clone(), cache_dir.clone(), args.mountpoint.clone()));
    let (sock, listener) = crate::control::listen(&rt).context("the control socket (for izo sync and izo status)")?;
    rt.spawn(crate::control::serve(listener, replica.clone(), info.clone()));
    let flags = izo_fuse::MountFlags { dev: args.dev, suid: args.suid };
    let mounted = izo_fuse::mount(replica.clone(), &args.mountpoint, flags).with_context(|| {
        let _ = std::fs::remove_file(&sock);
        format!("mounting on {} (FUSE needs /dev/fuse, and root or fusermount3)", args.mountpoint.display())
    })?;
    let _tasks = rt.block_on(async { started.spawn(stream_stopped(info.clone())) });
    let ro = if replica.client.writable() { "" } else { " read-only (the token is)" };
    println!("izo: mounted {volume} from {addr} at {}{ro} (cache {})", args.mountpoint.display(), cache_dir.display());
    let _ = std::io::stdout().flush();
    // Only a signal unmounts: whatever the server does, the mount keeps
    // serving its cache (izo status says what is wrong).
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })
    .context("waiting for a signal")?;
    eprintln!("izo: unmounting {}", args.mountpoint.display());
    let _ = std::fs::remove_file(&sock);
    mounted.unmount().with_context(|| format!("unmounting {}", args.mountpoint.display()))?;
    finish(&rt, &replica);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// Where the record stream's stops go: said once on stderr, and shown by
/// `izo status` until it is followed again. The mount stays either way.
pub fn stream_stopped(info: Arc<crate::control::Info>) -> impl Fn(Option<String>) + Send + 'static {
    move |why| {
        if let Some(why) = &why {
            eprintln!(
                "izo: the record stream stopped ({why}); the mount keeps serving its cache, following again in 5 s"
            );
        }
        *info.stream_stopped.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
}
