//! `izo demo`: a server on a temporary export and a short client session
//! that lists and changes the volume over real TLS. Until the FUSE mount
//! lands this is the one-command tour of the system.

use anyhow::{Context, Result};
use clap::Args;
use izo_client::{Client, ClientConfig};
use izo_proto::*;
use izo_server::auth::{Rights, Tokens};
use izo_server::{Server, ServerConfig};
use std::path::PathBuf;

#[derive(Args)]
pub struct DemoArgs {
    /// Keep the export here instead of a temporary directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

pub fn run(args: DemoArgs) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("izo-demo-{}", std::process::id()));
    let base = args.dir.unwrap_or(tmp);
    let export = base.join("export");
    let state = base.join("state");
    std::fs::create_dir_all(&export).with_context(|| format!("creating {}", export.display()))?;
    let cfg = ServerConfig {
        export: export.clone(),
        state_dir: Some(state.clone()),
        listen: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    };
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let server = Server::open(&cfg).context("opening the demo volume")?;
        let listener = tokio::net::TcpListener::bind(&cfg.listen).await.context("binding loopback")?;
        let addr = listener.local_addr()?.to_string();
        let fp = server.fingerprint.clone();
        let volume = server.volume.clone();
        tokio::spawn(server.clone().serve(listener));
        println!("server: volume {volume:?} exported from {}", export.display());
        println!("server: listening on {addr}, certificate {fp}");
        let token = Tokens::new(&state).create(&volume, Rights::Rw, "demo").context("creating a token")?;
        let mut cc = ClientConfig::new(addr, volume, token);
        cc.fingerprint = Some(fp);
        let c = Client::connect(cc).await.context("connecting")?;
        println!("client: connected as replica {:?}", c.replica());
        let dir = ObjectId::new();
        c.mutate(Op::Mkdir { parent: ObjectId::ROOT, name: b"notes".to_vec(), id: dir, mode: 0o755, uid: 0, gid: 0 })
            .await?;
        let f = ObjectId::new();
        c.mutate(Op::Create { parent: dir, name: b"hello.txt".to_vec(), id: f, mode: 0o644, uid: 0, gid: 0 }).await?;
        let text = b"hello from intermezzo\n".to_vec();
        c.mutate(Op::Write { id: f, base: 0, offset: 0, data: text.clone() }).await?;
        let e = Expect { id: f, base: Versions::default() };
        c.mutate(Op::Rename {
            parent: dir,
            name: b"hello.txt".to_vec(),
            expect: e,
            new_parent: dir,
            new_name: b"greeting.txt".to_vec(),
            target: None,
            mode: RenameMode::Replace,
        })
        .await?;
        println!("client: made notes/, wrote notes/hello.txt, renamed it to notes/greeting.txt");
        for entry in c.readdir(dir).await? {
            let a = &entry.attr;
            println!(
                "client: ls notes/ -> {:?} {:?} {} bytes, data version {}",
                String::from_utf8_lossy(&entry.name),
                a.kind,
                a.size,
                a.versions.data
            );
        }
        let back = c.read(f, 0, 1 << 20).await?;
        println!("client: read back {:?}", String::from_utf8_lossy(&back));
        let on_disk = std::fs::read(export.join("notes/greeting.txt")).context("reading the export")?;
        println!("server: {}/notes/greeting.txt holds {:?}", export.display(), String::from_utf8_lossy(&on_disk));
        anyhow::ensure!(on_disk == text, "export content differs from what the client wrote");
        let stats = c.server_stats().await?;
        let show: Vec<String> = stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("server counters: {}", show.join(" "));
        println!("demo ok; files left in {}", base.display());
        Ok(())
    })
}
