//! Owners and privilege: what a volume lets clients set (DESIGN "Server").
//! Applied to every mutation as it arrives, before validation, so what is
//! recorded, applied and streamed is what the volume allows.

use izo_proto::Op;
use serde::{Deserialize, Serialize};

/// How owners in client ops are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Owners {
    /// Numeric ids as sent (as NFS does).
    #[default]
    Preserve,
    /// Everything owned by one user and group.
    Squash,
}

/// The volume's owner and privilege settings.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Owner handling.
    pub owners: Owners,
    /// Owner used by `Squash`.
    pub squash: (u32, u32),
    /// A trusted volume keeps setuid/setgid bits.
    pub trusted: bool,
}

impl Policy {
    fn owner(&self, uid: &mut u32, gid: &mut u32) {
        if self.owners == Owners::Squash {
            (*uid, *gid) = self.squash;
        }
    }

    fn mode(&self, mode: &mut u32) {
        if !self.trusted {
            *mode &= !0o6000;
        }
    }

    /// Rewrite `op` to what the volume allows. (Device nodes are refused by
    /// validation, which records the refusal like any other answer.)
    pub fn apply(&self, op: &mut Op) {
        match op {
            Op::Create { mode, uid, gid, .. } | Op::Mkdir { mode, uid, gid, .. } | Op::Mknod { mode, uid, gid, .. } => {
                self.owner(uid, gid);
                self.mode(mode);
            }
            Op::Symlink { uid, gid, .. } => self.owner(uid, gid),
            Op::SetAttr { attrs, .. } => {
                if self.owners == Owners::Squash && (attrs.uid.is_some() || attrs.gid.is_some()) {
                    attrs.uid = Some(self.squash.0);
                    attrs.gid = Some(self.squash.1);
                }
                if let Some(m) = attrs.mode.as_mut() {
                    self.mode(m);
                }
            }
            _ => {}
        }
    }
}
