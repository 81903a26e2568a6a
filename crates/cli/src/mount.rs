//! `izo mount`: a replicate-mode client — replicate the volume into a local
//! cache, mount it with FUSE, follow the server's record stream.

use anyhow::{bail, Context, Result};
use clap::Args;
use izo_client::cache::Cache;
use izo_client::replica::{Progress, Replica};
use izo_client::{Client, ClientConfig};
use std::io::Write;
use std::path::PathBuf;
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
    /// The server's certificate fingerprint (SHA256:…), as `izo serve` prints it.
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
    let cache_dir = args.cache.clone().unwrap_or_else(|| default_cache(&volume));
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let cache = Cache::open(&cache_dir).with_context(|| format!("opening the cache in {}", cache_dir.display()))?;
    let mut cfg = ClientConfig::new(addr.clone(), volume.clone(), args.token.clone());
    cfg.fingerprint = args.fingerprint.clone();
    // a remount speaks as the same replica
    if let Some(r) = cache.meta128("replica").context("reading the cache")? {
        cfg.replica = izo_proto::ReplicaId(r);
    }
    let client = rt.block_on(Client::connect(cfg)).with_context(|| {
        format!("connecting to {addr} for volume {volume:?} (check the address, token and fingerprint)")
    })?;
    let replica = Replica::new(client, cache, rt.handle().clone())
        .with_context(|| format!("loading the changes queued in {}", cache_dir.display()))?;
    replica.sync_close.store(args.sync_close, std::sync::atomic::Ordering::Relaxed);
    replica.check_incarnation().context("checking the volume's incarnation against the cache")?;
    let start = Instant::now();
    rt.block_on(replica.initial_sync(|p| show(p, start))).context("initial replication")?;
    eprintln!();
    let mounted = izo_fuse::mount(replica.clone(), &args.mountpoint)
        .with_context(|| format!("mounting on {} (needs /dev/fuse and root)", args.mountpoint.display()))?;
    let follower = rt.spawn(replica.clone().follow());
    rt.spawn(replica.clone().send());
    let sock = crate::control::socket_path(std::process::id());
    let info = std::sync::Arc::new(crate::control::Info {
        volume: volume.clone(),
        addr: addr.clone(),
        cache: cache_dir.clone(),
        mountpoint: args.mountpoint.clone(),
    });
    let listener = std::fs::create_dir_all("/run/izo")
        .and_then(|_| {
            let _ = std::fs::remove_file(&sock);
            let _g = rt.enter();
            tokio::net::UnixListener::bind(&sock)
        })
        .with_context(|| format!("control socket {} (for izo sync and izo status)", sock.display()))?;
    rt.spawn(crate::control::serve(listener, replica.clone(), info));
    println!("izo: mounted {volume} from {addr} at {} (cache {})", args.mountpoint.display(), cache_dir.display());
    let _ = std::io::stdout().flush();
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            r = follower => {
                if let Ok(Err(e)) = r {
                    eprintln!("izo: the record stream stopped: {e}; unmounting");
                }
            }
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
