//! Access tokens: random secrets with read-only or read-write rights on one
//! volume, stored hashed in `tokens.toml` in the state dir. The file is
//! re-read at every handshake so `izo token create` takes effect at once.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What a token allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rights {
    /// Queries and subscriptions only.
    Ro,
    /// Everything.
    Rw,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TokenEntry {
    blake3: String,
    volume: String,
    rights: Rights,
    #[serde(default)]
    label: String,
}

/// The stored form of a token (also what a replica is registered under).
pub fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// The token file of a server.
#[derive(Clone, Debug)]
pub struct Tokens {
    path: PathBuf,
}

impl Tokens {
    /// Tokens kept in `state/tokens.toml`.
    pub fn new(state: &Path) -> Self {
        Tokens { path: state.join("tokens.toml") }
    }

    fn load(&self) -> std::io::Result<TokenFile> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => toml::from_str(&s).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", self.path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile::default()),
            Err(e) => Err(e),
        }
    }

    /// Rights of `token` on `volume`, if any.
    pub fn check(&self, token: &str, volume: &str) -> Option<Rights> {
        let file = match self.load() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("reading tokens: {e}");
                return None;
            }
        };
        let h = hash(token);
        file.token.iter().find(|t| t.blake3 == h && t.volume == volume).map(|t| t.rights)
    }

    /// Create a new token and return it (shown once; only its hash is kept).
    pub fn create(&self, volume: &str, rights: Rights, label: &str) -> std::io::Result<String> {
        let mut file = self.load()?;
        let mut raw = [0u8; 24];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| std::io::Error::other("no randomness"))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let token = format!("izo_{token}");
        file.token.push(TokenEntry {
            blake3: hash(&token),
            volume: volume.to_string(),
            rights,
            label: label.to_string(),
        });
        let text = toml::to_string(&file).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)?;
        Ok(token)
    }
}
