//! Access tokens: random secrets with read-only or read-write rights on one
//! volume, stored hashed in `tokens.toml` in the state dir. The file is
//! re-read at every handshake so `izo token create` takes effect at once.
//!
//! Each token has a stable id, kept when its secret is rotated: replicas
//! are registered under the id, so a rotated token keeps its replicas.
//! Entries written before ids existed get one derived from their hash
//! ([`legacy_id`]), which is also how replicas registered under such a
//! token's hash are recognised.

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
    /// Stable id (empty in files written before ids existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    id: String,
    blake3: String,
    volume: String,
    rights: Rights,
    #[serde(default)]
    label: String,
}

impl TokenEntry {
    fn id(&self) -> String {
        if self.id.is_empty() {
            legacy_id(&self.blake3)
        } else {
            self.id.clone()
        }
    }
}

/// The stored form of a token's secret.
pub fn hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

/// The id of a token stored without one: derived from its hash, so it is
/// the same at every read and after a rotation (which writes it down).
pub fn legacy_id(hash: &str) -> String {
    format!("tok_{}", hash.get(..16).unwrap_or(hash))
}

/// Whether `owner`, as stored for a replica, names the token with id `id`:
/// the id itself, or (replicas registered before token ids) the hash the
/// id was derived from.
pub fn owns(owner: &[u8], id: &str) -> bool {
    if owner == id.as_bytes() {
        return true;
    }
    let legacy = owner.len() == 64 && owner.iter().all(u8::is_ascii_hexdigit);
    legacy && std::str::from_utf8(owner).is_ok_and(|h| legacy_id(h) == id)
}

/// What a valid token grants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Rights on the volume.
    pub rights: Rights,
    /// The token's stable id (replicas are registered under it).
    pub id: String,
}

/// One token as `izo token list` shows it (never its secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// Stable id.
    pub id: String,
    /// Volume.
    pub volume: String,
    /// Rights.
    pub rights: Rights,
    /// Label.
    pub label: String,
}

/// Why a token could not be rotated.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading or writing `tokens.toml` failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// No token has that id or label.
    #[error("no token with id or label {0:?} (izo token list shows them)")]
    NotFound(String),
    /// Several tokens have that label.
    #[error("{n} tokens are labelled {label:?}; name one by its id ({ids})")]
    Ambiguous {
        /// The label given.
        label: String,
        /// How many match.
        n: usize,
        /// Their ids.
        ids: String,
    },
}

fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut raw = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
        .map_err(|_| std::io::Error::other("no randomness"))?;
    Ok(raw.iter().map(|b| format!("{b:02x}")).collect())
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

    /// What `token` grants on `volume`, if anything.
    pub fn check(&self, token: &str, volume: &str) -> Option<Grant> {
        let file = match self.load() {
            Ok(f) => f,
            Err(e) => {
                tracing::error!("reading tokens: {e}");
                return None;
            }
        };
        let h = hash(token);
        file.token.iter().find(|t| t.blake3 == h && t.volume == volume).map(|t| Grant { rights: t.rights, id: t.id() })
    }

    /// Every token, without secrets.
    pub fn list(&self) -> std::io::Result<Vec<TokenInfo>> {
        Ok(self
            .load()?
            .token
            .iter()
            .map(|t| TokenInfo { id: t.id(), volume: t.volume.clone(), rights: t.rights, label: t.label.clone() })
            .collect())
    }

    /// Give the token with id (or else label) `which` a new secret, keeping
    /// its id, volume, rights and label; the old secret stops working at
    /// once. Returns the id and the new token.
    pub fn rotate(&self, which: &str) -> Result<(String, String), TokenError> {
        let mut file = self.load()?;
        let mut at: Vec<usize> =
            file.token.iter().enumerate().filter(|(_, t)| t.id() == which).map(|(i, _)| i).collect();
        if at.is_empty() {
            at = file.token.iter().enumerate().filter(|(_, t)| t.label == which).map(|(i, _)| i).collect();
        }
        let i = match at.as_slice() {
            [] => return Err(TokenError::NotFound(which.to_string())),
            [i] => *i,
            more => {
                let ids: Vec<String> = more.iter().map(|i| file.token[*i].id()).collect();
                return Err(TokenError::Ambiguous { label: which.to_string(), n: more.len(), ids: ids.join(", ") });
            }
        };
        let token = format!("izo_{}", random_hex(24)?);
        let entry = &mut file.token[i];
        entry.id = entry.id();
        entry.blake3 = hash(&token);
        let id = entry.id.clone();
        self.save(&file)?;
        Ok((id, token))
    }

    fn save(&self, file: &TokenFile) -> std::io::Result<()> {
        let text = toml::to_string(file).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }

    /// Create a new token and return it (shown once; only its hash is kept).
    pub fn create(&self, volume: &str, rights: Rights, label: &str) -> std::io::Result<String> {
        self.create_with_id(volume, rights, label).map(|(_, t)| t)
    }

    /// Create a new token; returns its id and the token.
    pub fn create_with_id(&self, volume: &str, rights: Rights, label: &str) -> std::io::Result<(String, String)> {
        let mut file = self.load()?;
        let token = format!("izo_{}", random_hex(24)?);
        let id = format!("tok_{}", random_hex(8)?);
        file.token.push(TokenEntry {
            id: id.clone(),
            blake3: hash(&token),
            volume: volume.to_string(),
            rights,
            label: label.to_string(),
        });
        self.save(&file)?;
        Ok((id, token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_token_keeps_its_id_and_the_old_secret_stops_working() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tokens::new(dir.path());
        let (id, old) = t.create_with_id("vol", Rights::Rw, "laptop").unwrap();
        assert_eq!(t.check(&old, "vol"), Some(Grant { rights: Rights::Rw, id: id.clone() }));
        let (same, new) = t.rotate("laptop").unwrap();
        assert_eq!(same, id);
        assert_eq!(t.check(&old, "vol"), None);
        assert_eq!(t.check(&new, "vol"), Some(Grant { rights: Rights::Rw, id: id.clone() }));
        let (again, _) = t.rotate(&id).unwrap();
        assert_eq!(again, id, "by id too");
        assert!(matches!(t.rotate("nobody"), Err(TokenError::NotFound(_))));
        t.create("vol", Rights::Ro, "laptop").unwrap();
        assert!(matches!(t.rotate("laptop"), Err(TokenError::Ambiguous { n: 2, .. })));
    }

    /// tokens.toml as servers before token ids wrote it, and a replica
    /// registered under the token's hash.
    #[test]
    fn a_token_stored_without_an_id_gets_a_stable_one_that_owns_its_old_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let token = "izo_0123";
        let h = hash(token);
        let text = format!("[[token]]\nblake3 = \"{h}\"\nvolume = \"vol\"\nrights = \"rw\"\nlabel = \"old\"\n");
        std::fs::write(dir.path().join("tokens.toml"), text).unwrap();
        let t = Tokens::new(dir.path());
        let id = t.check(token, "vol").unwrap().id;
        assert_eq!(id, legacy_id(&h));
        assert_eq!(t.check(token, "vol").unwrap().id, id, "the same at every read");
        assert!(owns(h.as_bytes(), &id), "a replica registered under the hash belongs to the id");
        assert!(owns(id.as_bytes(), &id));
        assert!(!owns(hash("other").as_bytes(), &id));
        let (kept, new) = t.rotate("old").unwrap();
        assert_eq!(kept, id, "rotation writes the derived id down");
        assert_eq!(t.check(&new, "vol").unwrap().id, id);
        assert!(owns(h.as_bytes(), &id), "replicas registered under the old hash stay its own");
    }
}
