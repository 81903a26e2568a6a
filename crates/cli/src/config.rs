//! `izo config check FILE`: parse both sections and report the first error.

use anyhow::{Context, Result};
use std::path::PathBuf;

pub fn check(path: PathBuf) -> Result<()> {
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let client =
        izo_client::config::ClientFile::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let server = izo_server::ServerConfig::from_file(&path).map_err(anyhow::Error::msg)?;
    println!("{}: ok", path.display());
    if client.server.is_some() {
        println!(
            "  [server] export {} volume {:?} listen {}",
            server.export.display(),
            server.volume_name(),
            server.listen
        );
    }
    if client.client != Default::default() {
        println!(
            "  [client] server {:?} volume {:?} mode {:?}",
            client.client.server, client.client.volume, client.client.mode
        );
    }
    Ok(())
}
