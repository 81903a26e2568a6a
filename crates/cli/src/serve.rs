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
        Ok(cfg)
    }
}

pub fn run(args: ServeArgs) -> Result<()> {
    let cfg = args.config()?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let server = rt.block_on(async move {
        let server = Server::open(&cfg).with_context(|| format!("opening volume from {}", cfg.export.display()))?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen).await.with_context(|| {
            format!("listening on {} (is another server running? pick one with --listen)", cfg.listen)
        })?;
        let addr = listener.local_addr().context("local address")?;
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
        /// Volume the token is for.
        #[arg(long)]
        volume: String,
        /// The server's state dir.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Read-only token.
        #[arg(long)]
        ro: bool,
        /// A label to recognise the token by.
        #[arg(long, default_value = "")]
        label: String,
    },
}

pub fn token(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create { volume, state, ro, label } => {
            let cfg = ServerConfig { state_dir: state, volume: Some(volume.clone()), ..ServerConfig::default() };
            let dir = cfg.state_path();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating state dir {}", dir.display()))?;
            let rights = if ro { Rights::Ro } else { Rights::Rw };
            let t = Tokens::new(&dir)
                .create(&volume, rights, &label)
                .with_context(|| format!("writing {}/tokens.toml", dir.display()))?;
            println!("{t}");
            Ok(())
        }
    }
}
