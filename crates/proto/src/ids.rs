//! Identifiers: objects, replicas, sequence numbers and times.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Journal sequence number; also the unit of object versions.
pub type Seq = u64;

/// Identity of a file, directory, symlink or special file, kept across renames.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectId(pub u128);

impl ObjectId {
    /// The root directory of every volume.
    pub const ROOT: ObjectId = ObjectId(1);

    /// A fresh UUIDv7 id; time-ordered so a disconnected client can mint ids.
    pub fn new() -> Self {
        ObjectId(uuid::Uuid::now_v7().as_u128())
    }

    /// Big-endian bytes, used as database keys so ids sort numerically.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Inverse of [`ObjectId::to_bytes`].
    pub fn from_bytes(b: [u8; 16]) -> Self {
        ObjectId(u128::from_be_bytes(b))
    }
}

impl Default for ObjectId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", uuid::Uuid::from_u128(self.0))
    }
}

/// Identity of one client cache; names the origin of its ops.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReplicaId(pub u128);

impl ReplicaId {
    /// A fresh random replica id.
    pub fn random() -> Self {
        ReplicaId(uuid::Uuid::new_v4().as_u128())
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{:08x}", (self.0 >> 96) as u32)
    }
}

/// Wall-clock time with nanoseconds, as in `struct timespec`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub secs: i64,
    /// Nanoseconds within the second.
    pub nsec: u32,
}

impl Timestamp {
    /// The current time of this machine.
    pub fn now() -> Self {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp { secs: d.as_secs() as i64, nsec: d.subsec_nanos() }
    }
}

/// (id, name) pairs from text in passwd or group format (`name:x:id:...`);
/// malformed lines are skipped.
pub fn parse_id_table(text: &str) -> Vec<(u32, String)> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            Some((id, name.to_string()))
        })
        .collect()
}
