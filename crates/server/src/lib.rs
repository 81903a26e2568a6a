//! The volume server: validate → journal → apply, the record stream, TLS
//! and tokens. It must never know about FUSE; every access to the exported
//! tree goes through [`tree::Tree`], every metadata change through the
//! journal crate.

pub mod auth;
mod background;
pub mod capture;
pub mod config;
pub mod counters;
pub mod hash;
mod hint;
mod lock;
mod net;
pub mod policy;
mod query;
mod replay;
mod server;
pub mod sys;
pub mod testhooks;
pub mod tls;
pub mod tree;
mod volume;

pub use config::ServerConfig;
pub use lock::Locks;
pub use server::Server;
pub use volume::Tuning;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A file-system or socket operation failed.
    #[error("{what}: {err}")]
    Io {
        /// What was being done, naming the path.
        what: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// The metadata store failed.
    #[error(transparent)]
    Store(#[from] izo_journal::StoreError),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// Another server holds the state dir or the export (the message names it).
    #[error("{0}")]
    Busy(String),
}

impl ServerError {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, err: std::io::Error) -> Self {
        ServerError::Io { what: what.into(), err }
    }
}
