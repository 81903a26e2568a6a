//! Wire types and framing of the intermezzo protocol: pure data and codec.
//!
//! This crate must never touch sockets or disks: everything here is testable
//! with byte buffers alone. Every frame starts with the protocol version so a
//! peer speaking another version gets a clear error instead of garbage; the
//! handshake picks the highest version both peers speak.

pub mod codec;
pub mod ids;
pub mod msg;
pub mod op;
pub mod rules;
pub mod v1;

pub use codec::{decode_frame, encode_frame, FrameError, MAX_FRAME};
pub use ids::{parse_id_table, ObjectId, ReplicaId, Seq, Timestamp};
pub use msg::*;
pub use op::*;

/// Highest protocol version spoken by this build; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u16 = 6;

/// Lowest protocol version this build still speaks. Peers use the highest
/// version both ranges hold (see [`codec::negotiate`]). Version 4 changed
/// the encoding of `OpError`, version 5 that of `Attr`, `Op::Mknod` and
/// `Welcome` (device numbers), so version 5 is the oldest spoken. Version
/// 6 only adds: `Op::Append`, `Query::Rules` and `QueryReply::Rules`, which
/// a client sends only on a connection that settled on 6 or later (see
/// [`APPEND_VERSION`]); everything else is encoded as in 5. A server of 6
/// also answers `ReplyExpired` only for a change it recorded and the
/// replica released (one it never recorded it executes when it comes).
pub const MIN_PROTOCOL_VERSION: u16 = 5;

/// First protocol version with `Op::Append` and `Query::Rules`.
pub const APPEND_VERSION: u16 = 6;

/// Size of one content block; block hashes and stale marks use this unit.
pub const BLOCK_SIZE: u64 = 1 << 20;

/// Largest data payload carried by one write op or one read chunk.
pub const MAX_DATA: usize = 4 << 20;

/// Records carry write bytes inline up to this size; larger writes are staged.
pub const INLINE_WRITE_MAX: usize = 1 << 20;

/// Most unanswered mutations a client may have in flight (bounds the reply cache).
pub const MAX_UNANSWERED: u64 = 4096;
