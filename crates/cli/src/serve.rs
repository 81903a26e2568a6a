//! `izo serve` and `izo token`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use izo_server::auth::{Rights, Tokens};
use izo_server::{Server, ServerConfig};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct ServeArgs {
    /// Directory to export (the master copy).
    export: Option<PathBuf>,
    /// TOML config file with a `[server]` section.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:7227; use 0.0.0.0:7227 for other hosts).
    #[arg(long)]
    listen: Option<String>,
    /// State dir (database, keys, tokens).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Volume name (default: the export's base name).
    #[arg(long)]
    volume: Option<String>,
    /// Keep at most this many journal records.
    #[arg(long)]
    retain_records: Option<u64>,
    /// Keep the journal's records within this many bytes of the state
    /// database (default 1 GiB; the file stays within about twice this).
    #[arg(long)]
    retain_bytes: Option<u64>,
    /// Checkpoint interval in milliseconds.
    #[arg(long)]
    checkpoint_ms: Option<u64>,
    /// Owners: `preserve` (numeric ids as sent), `squash` (all owned by the export's owner) or `map` (by name).
    #[arg(long)]
    owners: Option<String>,
    /// Keep setuid/setgid bits (only for volumes whose clients are all trusted).
    #[arg(long)]
    trusted: bool,
    /// Reread every file of the export at start and journal what differs
    /// from the metadata (normally only files changed since the last
    /// checkpoint are reread).
    #[arg(long)]
    rescan: bool,
    /// Do not watch the export for changes other programs make (they are
    /// then not journaled, and a client op may meet an unexpected state).
    #[arg(long)]
    no_capture: bool,
    /// The state dir was restored from a backup: take a new volume
    /// incarnation now, so every client resyncs, and let in replicas that
    /// hold replies this state never recorded (they are refused otherwise).
    /// For the first start after a restore only: every start with it makes
    /// all clients resync.
    #[arg(long)]
    accept_rollback: bool,
}

impl ServeArgs {
    fn config(&self) -> Result<ServerConfig> {
        let mut cfg = match &self.config {
            Some(p) => ServerConfig::from_file(p).map_err(anyhow::Error::msg)?,
            None => ServerConfig::default(),
        };
        if let Some(e) = &self.export {
            cfg.export = e.clone();
        }
        if let Some(l) = &self.listen {
            cfg.listen = l.clone();
        }
        if let Some(s) = &self.state {
            cfg.state_dir = Some(s.clone());
        }
        if let Some(v) = &self.volume {
            cfg.volume = Some(v.clone());
        }
        if let Some(n) = self.retain_records {
            cfg.retain_records = n;
        }
        if let Some(n) = self.retain_bytes {
            cfg.retain_bytes = n;
        }
        if let Some(n) = self.checkpoint_ms {
            cfg.checkpoint_ms = n;
        }
        if let Some(o) = &self.owners {
            cfg.owners = match o.as_str() {
                "preserve" => izo_server::policy::Owners::Preserve,
                "squash" => izo_server::policy::Owners::Squash,
                "map" => izo_server::policy::Owners::Map,
                other => anyhow::bail!("--owners {other:?}: use preserve, squash or map"),
            };
        }
        cfg.trusted |= self.trusted;
        cfg.rescan |= self.rescan;
        cfg.capture &= !self.no_capture;
        cfg.accept_rollback = self.accept_rollback;
        Ok(cfg)
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let cfg = args.config()?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let server = rt.block_on(async move {
        // Claim the state dir and the export first, then the port, and only
        // then read or change anything: a second server started by mistake
        // stops before touching what the running one serves.
        let mut locks = izo_server::Locks::take(&cfg).context("claiming the state dir and the export")?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| {
            format!("listening on {} (is another server running? pick one with --listen)", cfg.listen)
        })?;
        let addr = listener.local_addr().context("local address")?;
        locks.set_listen(&addr.to_string());
        let server = Server::open_locked(&cfg, locks)
            .with_context(|| format!("opening volume from {}", cfg.export.display()))?;
        let export = std::fs::canonicalize(&cfg.export).unwrap_or(cfg.export.clone());
        println!("izo: serving volume {:?} from {}", server.volume, export.display());
        println!("izo: listening on {addr}");
        println!("izo: certificate fingerprint {}", server.fingerprint);
        println!(
            "izo: state in {}; create a token with `izo token create --state {} --volume {}`",
            cfg.state_path().display(),
            cfg.state_path().display(),
            server.volume
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            r = server.clone().serve(listener) => r.context("serving")?,
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        println!("izo: stopping: finishing the batch in hand and checkpointing");
        if !server.shutdown(std::time::Duration::from_secs(30)) {
            anyhow::bail!("the volume did not stop within 30 s; the next start replays the journal");
        }
        Ok(server)
    })?;
    // Connection tasks hold the server; once they are gone this is the last
    // reference, and dropping it closes the database cleanly (an unclean
    // close makes the next open walk the whole file to repair it).
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    if Arc::strong_count(&server) > 1 {
        tracing::warn!("the database was not closed cleanly; the next start checks it");
    }
    drop(server);
    Ok(())
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a token and print it (only its hash is stored).
    Create {
        /// Volume the token is for (default: the one the state dir holds).
        #[arg(long)]
        volume: Option<String>,
        /// The server's state dir (`izo serve` prints it at start).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Read-only token.
        #[arg(long)]
        ro: bool,
        /// A label to recognise the token by.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Give a token a new secret and print it; the old one stops working.
    /// Its id stays, and so do the replicas (client caches) registered
    /// under it: remount them with the new token.
    Rotate {
        /// The token's id (`izo token list`) or label.
        token: String,
        /// The server's state dir.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Volume whose default state dir to use when --state is not given.
        #[arg(long)]
        volume: Option<String>,
    },
    /// List tokens: id, volume, rights, label (never the secrets).
    List {
        /// The server's state dir.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Volume whose default state dir to use when --state is not given.
        #[arg(long)]
        volume: Option<String>,
    },
}

/// The state dir a token command works on, and the volume it holds. A
/// state dir without a volume, or holding another one, is refused: a token
/// written there would be read by no server.
fn token_state(state: Option<PathBuf>, volume: Option<String>) -> Result<(PathBuf, String)> {
    use izo_server::config::{state_volume, StateVolume};
    let given = state.is_some();
    let dir = match (state, &volume) {
        (Some(s), _) => s,
        (None, Some(v)) => ServerConfig { volume: Some(v.clone()), ..ServerConfig::default() }.state_path(),
        (None, None) => anyhow::bail!(
            "no --state given: pass the server's state dir (`izo serve` prints it at start) with --state DIR"
        ),
    };
    let held = state_volume(&dir).map_err(anyhow::Error::msg)?;
    let default = |what: &str| {
        if given {
            format!("state dir {} {what}", dir.display())
        } else {
            format!("no --state given, and the default state dir {} {what}", dir.display())
        }
    };
    match (held, volume) {
        (StateVolume::Named(held), None) => Ok((dir, held)),
        (StateVolume::Named(held), Some(v)) if held == v => Ok((dir, v)),
        (StateVolume::Named(held), Some(v)) => anyhow::bail!(
            "{}; pass --volume {held}, or the --state of the server that exports {v:?}",
            default(&format!("holds volume {held:?}, not {v:?}"))
        ),
        (StateVolume::Unnamed, Some(v)) => {
            eprintln!(
                "izo: warning: {} was written by an older server that did not record the volume name; \
                 assuming {v:?} (starting the server once records it)",
                dir.display()
            );
            Ok((dir, v))
        }
        (StateVolume::Unnamed, None) => anyhow::bail!(
            "{}; pass --volume NAME (start the server once to record it)",
            default("does not say which volume it holds")
        ),
        (StateVolume::Empty, _) => anyhow::bail!(
            "{}; pass the server's --state (`izo serve` prints it at start), or start `izo serve EXPORT --state \
             DIR` once to create the volume there",
            default("holds no volume")
        ),
    }
}

fn rights_name(r: Rights) -> &'static str {
    match r {
        Rights::Ro => "ro",
        Rights::Rw => "rw",
    }
}

pub fn token(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create { volume, state, ro, label } => {
            let (dir, volume) = token_state(state, volume)?;
            let rights = if ro { Rights::Ro } else { Rights::Rw };
            let (id, t) = Tokens::new(&dir)
                .create_with_id(&volume, rights, &label)
                .with_context(|| format!("writing {}/tokens.toml", dir.display()))?;
            eprintln!("izo: token {id} ({}) for volume {volume:?}", rights_name(rights));
            println!("{t}");
            Ok(())
        }
        TokenCmd::Rotate { token, state, volume } => {
            let (dir, _) = token_state(state, volume)?;
            let (id, t) = Tokens::new(&dir)
                .rotate(&token)
                .with_context(|| format!("rotating a token in {}/tokens.toml", dir.display()))?;
            eprintln!("izo: token {id} has a new secret; the old one is refused from now on");
            println!("{t}");
            Ok(())
        }
        TokenCmd::List { state, volume } => {
            let (dir, _) = token_state(state, volume)?;
            let list = Tokens::new(&dir).list().with_context(|| format!("reading {}/tokens.toml", dir.display()))?;
            for t in list {
                println!("{}\t{}\t{}\t{}", t.id, t.volume, rights_name(t.rights), t.label);
            }
            Ok(())
        }
    }
}
