//! `izo`: the intermezzo command line. Glue over the library crates.

mod config;
mod control;
mod demo;
mod log;
mod mount;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "izo", version, about = "intermezzo: a distributed file system with disconnected operation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Export a directory as a volume.
    Serve(serve::ServeArgs),
    /// Manage access tokens.
    Token {
        #[command(subcommand)]
        cmd: serve::TokenCmd,
    },
    /// Start a server on a temporary export and run a short client session.
    Demo(demo::DemoArgs),
    /// Print journal records of a stopped server.
    Log(log::LogArgs),
    /// Mount a volume (replicate mode: a full local replica that follows the server).
    Mount(mount::MountArgs),
    /// Wait until the mount holding PATH has everything the server acked.
    Sync(control::SyncArgs),
    /// Connection, stream position and lag, pending work and cache of a mount.
    Status(control::PathArg),
    /// Check a config file.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Parse a config file (`[server]` and `[client]` sections) and report errors.
    Check {
        /// The TOML file.
        file: std::path::PathBuf,
    },
}

fn main() {
    // Frames of up to a few MiB are allocated and freed at a high rate;
    // keep them in the heap instead of an mmap (page faults and zeroing)
    // per allocation. SAFETY: mallopt only tunes the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("IZO_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r: Result<()> = match cli.cmd {
        Cmd::Serve(a) => serve::run(a),
        Cmd::Token { cmd } => serve::token(cmd),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Log(a) => log::run(a),
        Cmd::Mount(a) => mount::run(a),
        Cmd::Sync(a) => control::ask(&a.path, &format!("sync {}", a.timeout)),
        Cmd::Status(a) => control::ask(&a.path, "status"),
        Cmd::Config { cmd: ConfigCmd::Check { file } } => config::check(file),
    };
    if let Err(e) = r {
        eprintln!("izo: error: {e:#}");
        std::process::exit(1);
    }
}
