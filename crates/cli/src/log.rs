//! `izo log`: print journal records from a (stopped) server's state dir.

use anyhow::{Context, Result};
use clap::Args;
use izo_journal::Store;
use izo_proto::Timestamp;
use std::path::PathBuf;

#[derive(Args)]
pub struct LogArgs {
    /// The server's state dir.
    #[arg(long)]
    state: PathBuf,
    /// First seq to print.
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// How many records to print at most.
    #[arg(long, default_value_t = 1000)]
    count: usize,
}

pub fn run(a: LogArgs) -> Result<()> {
    let path = a.state.join("volume.redb");
    let store = Store::open(&path, (0o755, 0, 0, Timestamp::default())).with_context(|| {
        format!("opening {} (stop the server first: the database is locked while it runs)", path.display())
    })?;
    println!("head {} checkpoint {} retained from {}", store.head(), store.checkpoint()?, store.retained_from()?);
    for r in store.records_from(a.from, a.count)? {
        let rec = &r.record;
        let mut op = format!("{:?}", rec.op);
        if op.len() > 300 {
            op.truncate(300);
            op.push('…');
        }
        let hs: Vec<String> = r
            .handles
            .iter()
            .map(|(id, h)| format!("{:x}={}", id.0 & 0xffff, h.iter().map(|b| format!("{b:02x}")).collect::<String>()))
            .collect();
        println!(
            "{:>8} {}.{:09} {:?} {op} payload={:?} handles=[{}]",
            rec.seq,
            rec.time.secs,
            rec.time.nsec,
            rec.origin,
            r.payload,
            hs.join(" ")
        );
    }
    Ok(())
}
