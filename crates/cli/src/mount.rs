//! `izo mount`: a replicate-mode client — replicate the volume into a local
//! cache, mount it with FUSE, follow the server's record stream.

use anyhow::{bail, Context, Result};
use clap::Args;
use izo_client::cache::Cache;
use izo_client::replica::{Progress, Replica};
use izo_client::tls::Mismatch;
use izo_client::{Client, ClientConfig, ClientError};
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

/// The server certificate a cache trusts, kept beside it: taken at the
/// first mount without `--fingerprint`, replaced by a `--fingerprint`.
struct Pin {
    file: PathBuf,
}

impl Pin {
    fn of(cache_dir: &Path) -> Pin {
        Pin { file: cache_dir.join("server-fingerprint") }
    }

    /// The fingerprint remembered, if any.
    fn read(&self) -> Result<Option<String>> {
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.file.display())),
        };
        let fp = text.trim();
        let hex = fp.strip_prefix("SHA256:").unwrap_or_default();
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "{} does not hold a certificate fingerprint (SHA256:…): remove it, or pass --fingerprint",
                self.file.display()
            );
        }
        Ok(Some(fp.to_string()))
    }

    /// Remember `fp` (when it is not what the file holds already).
    fn remember(&self, fp: &str, had: Option<&str>) -> Result<()> {
        if had.is_some_and(|h| h.eq_ignore_ascii_case(fp)) {
            return Ok(());
        }
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{fp}\n"))
            .and_then(|_| std::fs::rename(&tmp, &self.file))
            .with_context(|| format!("remembering the server's certificate in {}", self.file.display()))
    }

    /// What to tell the user when the server's certificate is not the one trusted.
    fn refused(&self, addr: &str, m: &Mismatch, given: bool) -> anyhow::Error {
        let (file, new) = (self.file.display(), &m.presented);
        match given {
            true => anyhow::anyhow!(
                "the server at {addr} presents certificate {new}, not {} given with --fingerprint: check the \
                 fingerprint `izo serve` printed",
                m.pinned
            ),
            false => anyhow::anyhow!(
                "the server at {addr} presents certificate {new}, but this cache trusts {} (remembered in {file} at \
                 its first mount). Someone may be impersonating the server. If its certificate changed on purpose \
                 (a new state dir, for example), accept the new one with --fingerprint {new}, or remove {file}",
                m.pinned
            ),
        }
    }
}

fn show(p: &Progress, start: Instant) {
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
    let cache = Cache::open(&cache_dir).with_context(|| format!("opening the cache in {}", cache_dir.display()))?;
    let pin = Pin::of(&cache_dir);
    let remembered = pin.read()?;
    let mut cfg = ClientConfig::new(addr.clone(), volume.clone(), args.token.clone());
    cfg.fingerprint = args.fingerprint.clone().or(remembered.clone());
    // a remount speaks as the same replica
    if let Some(r) = cache.meta128("replica").context("reading the cache")? {
        cfg.replica = izo_proto::ReplicaId(r);
    }
    let client = match rt.block_on(Client::connect(cfg)) {
        Ok(c) => c,
        Err(ClientError::Fingerprint(m)) => return Err(pin.refused(&addr, &m, args.fingerprint.is_some())),
        Err(e) => {
            return Err(e).with_context(|| {
                format!("connecting to {addr} for volume {volume:?} (check the address, token and fingerprint)")
            })
        }
    };
    if let Some(fp) = client.server_fingerprint() {
        match (&args.fingerprint, &remembered) {
            (None, None) => eprintln!(
                "izo: first mount from {addr}: trusting its certificate {fp} (remembered in {}; compare it with \
                 the fingerprint `izo serve` printed)",
                pin.file.display()
            ),
            (Some(_), Some(old)) if !old.eq_ignore_ascii_case(&fp) => {
                eprintln!("izo: the server's new certificate {fp} replaces {old} in {}", pin.file.display())
            }
            _ => {}
        }
        pin.remember(&fp, remembered.as_deref())?;
    }
    let replica = Replica::new(client, cache, rt.handle().clone())
        .with_context(|| format!("loading the changes queued in {}", cache_dir.display()))?;
    replica.sync_close.store(args.sync_close, std::sync::atomic::Ordering::Relaxed);
    replica.check_incarnation().context("checking the volume's incarnation against the cache")?;
    let start = Instant::now();
    rt.block_on(replica.initial_sync(|p| show(p, start))).context("initial replication")?;
    eprintln!();
    let flags = izo_fuse::MountFlags { dev: args.dev, suid: args.suid };
    let mounted = izo_fuse::mount(replica.clone(), &args.mountpoint, flags).with_context(|| {
        format!("mounting on {} (FUSE needs /dev/fuse, and root or fusermount3)", args.mountpoint.display())
    })?;
    let info =
        Arc::new(crate::control::Info::new(volume.clone(), addr.clone(), cache_dir.clone(), args.mountpoint.clone()));
    rt.spawn(follow(replica.clone(), info.clone()));
    rt.spawn(replica.clone().send());
    let (sock, listener) = crate::control::listen(&rt).context("the control socket (for izo sync and izo status)")?;
    rt.spawn(crate::control::serve(listener, replica.clone(), info));
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

/// Follow the record stream; should it ever stop, say why (in `izo
/// status` too) and start again: the mount stays either way.
async fn follow(replica: Arc<Replica>, info: Arc<crate::control::Info>) {
    loop {
        let why = match replica.clone().follow().await {
            Ok(()) => "it ended".to_string(),
            Err(e) => e.to_string(),
        };
        eprintln!("izo: the record stream stopped ({why}); the mount keeps serving its cache, following again in 5 s");
        *info.stream_stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        tokio::time::sleep(Duration::from_secs(5)).await;
        *info.stream_stopped.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
