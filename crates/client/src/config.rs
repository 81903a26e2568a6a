//! The `[client]` section of the TOML config; every setting has a flag.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// How much of the volume a client keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// A full replica, data included.
    #[default]
    Replicate,
    /// The whole namespace; data fetched when first read.
    OnDemand,
}

/// `[client]` settings.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ClientSection {
    /// `host[:port]` of the server.
    pub server: Option<String>,
    /// Volume name.
    pub volume: Option<String>,
    /// Access token.
    pub token: Option<String>,
    /// Pinned certificate fingerprint (`SHA256:…`).
    pub fingerprint: Option<String>,
    /// Cache directory.
    pub cache_dir: Option<PathBuf>,
    /// Replicate or on-demand.
    pub mode: CacheMode,
}

/// A whole config file as the client reads it (the `[server]` section is
/// the server's business and is kept as opaque TOML here).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// Client settings.
    #[serde(default)]
    pub client: ClientSection,
    /// Server settings, not interpreted by the client.
    #[serde(default)]
    pub server: Option<toml::Value>,
}

impl ClientFile {
    /// Parse config text; the error names the line and the key.
    pub fn parse(text: &str) -> Result<ClientFile, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_client_section_parses_and_unknown_keys_are_named() {
        let f = ClientFile::parse(
            "[client]\nserver = \"files.example:7227\"\nvolume = \"home\"\nmode = \"on-demand\"\ncache_dir = \"/var/cache/izo\"\n",
        )
        .expect("parses");
        assert_eq!(f.client.mode, CacheMode::OnDemand);
        assert_eq!(f.client.volume.as_deref(), Some("home"));
        let err = ClientFile::parse("[client]\nservr = \"x\"\n").expect_err("typo refused");
        assert!(err.contains("servr"), "{err}");
    }
}
