//! The durable journal and metadata store of a volume, in one redb file.
//!
//! Holds ids, versions, dentries, attributes, xattrs, block hashes, journal
//! records, per-replica progress and the reply cache. A [`Batch`] validates
//! ops against the metadata and records them; committing it is the ack point
//! (group commit: one fsync for the whole batch); a [`ReplyCache`] decides
//! which of its mutations are resends. This crate must never touch
//! the exported tree, FUSE or the network: applying records to the tree is
//! the server's job.

mod exec;
mod modes;
mod query;
mod replies;
mod retention;
mod store;
mod tables;

pub use exec::{storable_time, xattr_replicates, Batch};
pub use modes::set_id_stripped;
pub use replies::{reply_frame, reply_of, Fences, Intake, ReplyCache, Request, Ticket};
pub use store::{Store, StoreError};
pub use tables::{ObjectRow, Payload, StoredRecord};

/// Opaque server file handle (`name_to_handle_at` type + bytes).
pub type Handle = Vec<u8>;
