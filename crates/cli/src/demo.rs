//! `izo demo`: the whole system on this machine with no configuration — a
//! server on a fresh export and a replicate-mode client mounted with FUSE,
//! both in this process, over real TLS on loopback. It serves until
//! Ctrl-C (or, with `--once`, walks through a few file operations on the
//! mount, checks them in the export, and stops).

use anyhow::{Context, Result};
use clap::Args;
use izo_client::start::{start, StartOpts};
use izo_server::auth::{Rights, Tokens};
use izo_server::{Server, ServerConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct DemoArgs {
    /// Keep everything here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Walk through a few operations on the mount, check them, and stop.
    #[arg(long)]
    once: bool,
}

fn walk_through(mnt: &Path, export: &Path, sync: &dyn Fn() -> Result<()>) -> Result<()> {
    // (a demo dir used before holds the last walk's files)
    if mnt.join("notes").exists() {
        std::fs::remove_dir_all(mnt.join("notes")).context("rm -r notes on the mount")?;
        std::fs::remove_file(mnt.join("greeting-link")).context("rm greeting-link on the mount")?;
        println!("mount: removed notes/ and greeting-link, left by an earlier demo");
    }
    std::fs::create_dir(mnt.join("notes")).context("mkdir on the mount")?;
    let text = b"hello from intermezzo\n";
    std::fs::write(mnt.join("notes/hello.txt"), text).context("write on the mount")?;
    std::fs::rename(mnt.join("notes/hello.txt"), mnt.join("notes/greeting.txt")).context("rename on the mount")?;
    std::fs::hard_link(mnt.join("notes/greeting.txt"), mnt.join("greeting-link")).context("link on the mount")?;
    println!("mount: mkdir notes, wrote notes/hello.txt, renamed it to notes/greeting.txt, linked it as greeting-link");
    for e in std::fs::read_dir(mnt.join("notes")).context("ls on the mount")? {
        let e = e?;
        println!("mount: ls notes/ -> {:?} {} bytes", e.file_name(), e.metadata()?.len());
    }
    let back = std::fs::read(mnt.join("greeting-link")).context("read on the mount")?;
    println!("mount: cat greeting-link -> {:?}", String::from_utf8_lossy(&back));
    // changes are sent in the background; `izo sync` waits for the server
    sync().context("izo sync")?;
    println!("mount: izo sync -> the server has every change made on the mount");
    let on_disk = std::fs::read(export.join("notes/greeting.txt")).context("reading the export")?;
    println!("server: {}/notes/greeting.txt holds {:?}", export.display(), String::from_utf8_lossy(&on_disk));
    anyhow::ensure!(on_disk == text && back == text, "the export or the mount differs from what was written");
    Ok(())
}

/// The demo client's token, kept in `file` so that a demo run again on its
/// directory is the same client (a replica id belongs to one token).
fn demo_token(file: &Path, tokens: &Tokens, volume: &str) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(kept) = std::fs::read_to_string(file) {
        let kept = kept.trim();
        if tokens.check(kept, volume).is_some() {
            return Ok(kept.to_string());
        }
    }
    let token = tokens.create(volume, Rights::Rw, "demo").context("creating a token")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("keeping the demo's token in {}", file.display()))?;
    std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())
        .with_context(|| format!("keeping the demo's token in {}", file.display()))?;
    Ok(token)
}

pub fn run(args: DemoArgs) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("izo-demo-{}", std::process::id()));
    let base = args.dir.unwrap_or(tmp);
    let (export, state, mnt) = (base.join("export"), base.join("state"), base.join("mnt"));
    for d in [&export, &mnt] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let cfg = ServerConfig {
        export: export.clone(),
        state_dir: Some(state.clone()),
        listen: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let cache_dir = base.join("cache");
    let (server, started) = rt.block_on(async {
        let server = Server::open(&cfg).context("opening the demo volume")?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen).await.context("binding loopback")?;
        let addr = listener.local_addr()?.to_string();
        let fp = server.fingerprint.clone();
        let volume = server.volume.clone();
        tokio::spawn(server.clone().serve(listener));
        println!("server: volume {volume:?} exported from {}", export.display());
        println!("server: listening on {addr}, certificate {fp}");
        let token = demo_token(&base.join("token"), &Tokens::new(&state), &volume)?;
        // the client starts as `izo mount` starts one (its replica id,
        // pinned certificate, queued changes and incarnation check)
        let opts =
            StartOpts { addr, volume, token, fingerprint: Some(fp), cache_dir: cache_dir.clone(), sync_close: false };
        let started = start(opts, |_| {}).await?;
        Ok::<_, anyhow::Error>((server, started))
    })?;
    let replica = started.replica.clone();
    let mounted = izo_fuse::mount(replica.clone(), &mnt, izo_fuse::MountFlags::default())
        .with_context(|| format!("mounting on {} (needs /dev/fuse and root)", mnt.display()))?;
    // `izo sync` and `izo status` work on the demo's mount too
    let info =
        std::sync::Arc::new(crate::control::Info::new("export".into(), "this process".into(), cache_dir, mnt.clone()));
    let tasks = rt.block_on(async { started.spawn(crate::mount::stream_stopped(info.clone())) });
    let sock = match crate::control::listen(&rt) {
        Ok((sock, l)) => {
            rt.spawn(crate::control::serve(l, replica.clone(), info));
            Some(sock)
        }
        Err(e) => {
            eprintln!("izo: no control socket ({e:#}): izo sync and izo status will not find this mount");
            None
        }
    };
    println!("client: replicate mode, mounted at {}", mnt.display());
    let result = if args.once {
        walk_through(&mnt, &export, &|| rt.block_on(replica.sync()).map(drop).map_err(anyhow::Error::from))
    } else {
        println!(
            "ready: use {} like any directory (changes reach {} and every other client);\n       \
             files put in the export by other programs show up on the mount. Ctrl-C stops.",
            mnt.display(),
            export.display()
        );
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            Ok::<_, std::io::Error>(())
        })
        .context("waiting for Ctrl-C")
    };
    if let Some(sock) = &sock {
        let _ = std::fs::remove_file(sock);
    }
    mounted.unmount().with_context(|| format!("unmounting {}", mnt.display()))?;
    crate::mount::finish(&rt, &replica);
    tasks.follower.abort();
    tasks.sender.abort();
    if !server.shutdown(Duration::from_secs(10)) {
        eprintln!("izo: the demo volume did not stop in time; its next start replays the journal");
    }
    rt.shutdown_timeout(Duration::from_secs(1));
    result?;
    println!("demo stopped; files left in {}", base.display());
    Ok(())
}
