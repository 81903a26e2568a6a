//! Server configuration: a TOML file, every setting overridable by a flag.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `[server]` settings.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Directory exported as the volume's master copy.
    pub export: PathBuf,
    /// State dir: database, keys, tokens (default: per volume under /var/lib/izo).
    pub state_dir: Option<PathBuf>,
    /// Volume name (default: the export directory's base name).
    pub volume: Option<String>,
    /// Address to listen on.
    pub listen: String,
    /// Keep at most this many journal records.
    pub retain_records: u64,
    /// Keep journal records at most this many seconds.
    pub retain_secs: u64,
    /// Keep the journal's records within this many bytes of the state
    /// database's pages (the file stays within about twice this plus the
    /// rest of the metadata; see docs/design.md).
    pub retain_bytes: u64,
    /// Checkpoint interval in milliseconds.
    pub checkpoint_ms: u64,
    /// `preserve` (numeric owners as sent), `squash` (all owned by
    /// `squash_uid:squash_gid`) or `map` (by user and group name).
    pub owners: crate::policy::Owners,
    /// Owner for `squash` (default: the export directory's owner).
    pub squash_uid: Option<u32>,
    /// Group for `squash` (default: the export directory's group).
    pub squash_gid: Option<u32>,
    /// A trusted volume keeps setuid/setgid bits.
    pub trusted: bool,
    /// Journal changes other programs make in the export (fanotify).
    pub capture: bool,
    /// At start, reread every file of the export (not only those whose
    /// ctime is after the last checkpoint) and journal what differs.
    pub rescan: bool,
    /// The state dir was restored from a backup: take a new incarnation at
    /// start (every client resyncs) and let in replicas that hold replies
    /// this state never recorded. Only a flag (`--accept-rollback`), never
    /// a config file setting: it is a decision for one start.
    #[serde(skip)]
    pub accept_rollback: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export: PathBuf::from("."),
            state_dir: None,
            volume: None,
            listen: "127.0.0.1:7227".into(),
            retain_records: 1_000_000,
            retain_secs: 7 * 24 * 3600,
            retain_bytes: 1 << 30,
            checkpoint_ms: 2000,
            owners: crate::policy::Owners::Preserve,
            squash_uid: None,
            squash_gid: None,
            trusted: false,
            capture: true,
            rescan: false,
            accept_rollback: false,
        }
    }
}

/// Whole config file: `[server]` (a `[client]` section belongs to the client).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerFile {
    /// Server settings.
    #[serde(default)]
    pub server: ServerConfig,
}

impl ServerConfig {
    /// Volume name: configured, else the export's base name.
    pub fn volume_name(&self) -> String {
        if let Some(v) = &self.volume {
            return v.clone();
        }
        let abs = std::fs::canonicalize(&self.export).unwrap_or_else(|_| self.export.clone());
        abs.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "root".into())
    }

    /// State dir: configured, else `/var/lib/izo/<volume>` as root or
    /// `$XDG_STATE_HOME|~/.local/state/izo/<volume>` otherwise.
    pub fn state_path(&self) -> PathBuf {
        if let Some(s) = &self.state_dir {
            return s.clone();
        }
        default_state_base().join(self.volume_name())
    }

    /// Parse a TOML file.
    pub fn from_file(path: &Path) -> Result<ServerConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let f: ServerFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(f.server)
    }
}

/// File in the state dir naming the volume it holds (written by the server
/// at every start; `izo token create` checks names against it).
pub const VOLUME_FILE: &str = "volume.toml";

#[derive(Serialize, Deserialize)]
struct VolumeFile {
    name: String,
}

/// What a state dir holds, as `izo token create` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateVolume {
    /// A server recorded this volume name here.
    Named(String),
    /// A volume database written by a server from before the name was
    /// recorded: the name is not known.
    Unnamed,
    /// No volume (the directory is missing, empty, or holds no database).
    Empty,
}

/// The volume the state dir `state` holds.
pub fn state_volume(state: &Path) -> Result<StateVolume, String> {
    let path = state.join(VOLUME_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let f: VolumeFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            Ok(StateVolume::Named(f.name))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if state.join("volume.redb").exists() {
                Ok(StateVolume::Unnamed)
            } else {
                Ok(StateVolume::Empty)
            }
        }
        Err(e) => Err(format!("reading {}: {e}", path.display())),
    }
}

/// Record in `state` that it holds volume `name` (unless it already says so).
pub fn record_volume(state: &Path, name: &str) -> std::io::Result<()> {
    if state_volume(state).ok() == Some(StateVolume::Named(name.to_string())) {
        return Ok(());
    }
    let text = toml::to_string(&VolumeFile { name: name.to_string() }).map_err(std::io::Error::other)?;
    let text = format!("# the volume this state dir holds (written by izo serve)\n{text}");
    let path = state.join(VOLUME_FILE);
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// Base of default state dirs: `/var/lib/izo` as root,
/// `$XDG_STATE_HOME/izo` or `~/.local/state/izo` otherwise.
pub fn default_state_base() -> PathBuf {
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/izo");
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(x).join("izo");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/izo")
}
