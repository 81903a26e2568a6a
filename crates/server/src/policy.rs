//! Owners and privilege: what a volume lets clients set (DESIGN "Server").
//! Applied to every mutation as it arrives, before validation, so what is
//! recorded, applied and streamed is what the volume allows.

use izo_proto::{parse_id_table, Attr, Op, OpError, QueryReply, ServerMsg};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// How owners in client ops are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Owners {
    /// Numeric ids as sent (as NFS does).
    #[default]
    Preserve,
    /// Everything owned by one user and group.
    Squash,
    /// By user and group name: each client sends its id tables at the
    /// handshake; names unknown here take the squash owner.
    Map,
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

/// One connection's id translation for `Owners::Map`.
#[derive(Debug, Default)]
pub struct IdMap {
    uid_in: HashMap<u32, u32>,
    gid_in: HashMap<u32, u32>,
    uid_out: HashMap<u32, u32>,
    gid_out: HashMap<u32, u32>,
    /// Server owner for client ids whose name is unknown here.
    unknown_in: (u32, u32),
    /// Client ids for server ids the client has no name for.
    unknown_out: (u32, u32),
}

fn by_name(local: &[(u32, String)], remote: &[(u32, String)]) -> (HashMap<u32, u32>, HashMap<u32, u32>) {
    let names: HashMap<&str, u32> = local.iter().map(|(id, n)| (n.as_str(), *id)).collect();
    let (mut inn, mut out) = (HashMap::new(), HashMap::new());
    for (rid, name) in remote {
        if let Some(&lid) = names.get(name.as_str()) {
            inn.insert(*rid, lid);
            out.entry(lid).or_insert(*rid);
        }
    }
    (inn, out)
}

impl IdMap {
    /// Pair the client's tables with this machine's by name.
    pub fn new(users: &[(u32, String)], groups: &[(u32, String)], squash: (u32, u32)) -> IdMap {
        let local_users = parse_id_table(&std::fs::read_to_string("/etc/passwd").unwrap_or_default());
        let local_groups = parse_id_table(&std::fs::read_to_string("/etc/group").unwrap_or_default());
        let (uid_in, uid_out) = by_name(&local_users, users);
        let (gid_in, gid_out) = by_name(&local_groups, groups);
        let nobody = |t: &[(u32, String)], names: &[&str]| {
            t.iter().find(|(_, n)| names.contains(&n.as_str())).map(|(id, _)| *id).unwrap_or(65534)
        };
        let unknown_out = (nobody(users, &["nobody"]), nobody(groups, &["nogroup", "nobody"]));
        IdMap { uid_in, gid_in, uid_out, gid_out, unknown_in: squash, unknown_out }
    }

    fn inn(&self, uid: &mut u32, gid: &mut u32) {
        *uid = self.uid_in.get(uid).copied().unwrap_or(self.unknown_in.0);
        *gid = self.gid_in.get(gid).copied().unwrap_or(self.unknown_in.1);
    }

    fn out_attr(&self, a: &mut Attr) {
        a.uid = self.uid_out.get(&a.uid).copied().unwrap_or(self.unknown_out.0);
        a.gid = self.gid_out.get(&a.gid).copied().unwrap_or(self.unknown_out.1);
    }

    fn out_op(&self, op: &mut Op) {
        let both = |u: &mut u32, g: &mut u32| {
            *u = self.uid_out.get(u).copied().unwrap_or(self.unknown_out.0);
            *g = self.gid_out.get(g).copied().unwrap_or(self.unknown_out.1);
        };
        match op {
            Op::Create { uid, gid, .. }
            | Op::Mkdir { uid, gid, .. }
            | Op::Symlink { uid, gid, .. }
            | Op::Mknod { uid, gid, .. } => both(uid, gid),
            Op::SetAttr { attrs, .. } => {
                if let (Some(u), Some(g)) = (attrs.uid.as_mut(), attrs.gid.as_mut()) {
                    both(u, g);
                } else if let Some(u) = attrs.uid.as_mut() {
                    *u = self.uid_out.get(u).copied().unwrap_or(self.unknown_out.0);
                } else if let Some(g) = attrs.gid.as_mut() {
                    *g = self.gid_out.get(g).copied().unwrap_or(self.unknown_out.1);
                }
            }
            _ => {}
        }
    }

    /// Translate every owner a message shows the client into its ids.
    pub fn out(&self, msg: &mut ServerMsg) {
        let conflict = |e: &mut OpError| {
            if let OpError::Conflict { current: Some(a), .. } = e {
                self.out_attr(a);
            }
        };
        match msg {
            ServerMsg::Reply { result: Ok(a), .. } => {
                if let Some(attr) = a.attr.as_mut() {
                    self.out_attr(attr);
                }
            }
            ServerMsg::Reply { result: Err(e), .. } | ServerMsg::Answer { result: Err(e), .. } => conflict(e),
            ServerMsg::Answer { result: Ok(r), .. } => match r {
                QueryReply::Attr(a) => self.out_attr(a),
                QueryReply::Entries { entries, .. } => entries.iter_mut().for_each(|e| self.out_attr(&mut e.attr)),
                QueryReply::SnapshotEntry(e) => self.out_attr(&mut e.attr),
                _ => {}
            },
            ServerMsg::Record(r) => {
                if let Some(a) = r.attr.as_mut() {
                    self.out_attr(a);
                }
                self.out_op(&mut r.op);
            }
            _ => {}
        }
    }
}

impl Policy {
    fn owner(&self, uid: &mut u32, gid: &mut u32, map: Option<&IdMap>) {
        match (self.owners, map) {
            (Owners::Squash, _) => (*uid, *gid) = self.squash,
            (Owners::Map, Some(m)) => m.inn(uid, gid),
            (Owners::Map, None) => (*uid, *gid) = self.squash,
            (Owners::Preserve, _) => {}
        }
    }

    /// Set-id bits of what an untrusted volume's op makes are stripped, but
    /// for a directory's setgid bit: that one only passes a group on.
    fn mode(&self, mode: &mut u32, dir: bool) {
        *mode = izo_journal::set_id_stripped(*mode, dir, self.trusted);
    }

    /// Rewrite `op` to what the volume allows. (Device nodes are refused by
    /// validation, which records the refusal like any other answer.)
    pub fn apply(&self, op: &mut Op, map: Option<&IdMap>) {
        match op {
            Op::Create { mode, uid, gid, .. } | Op::Mknod { mode, uid, gid, .. } => {
                self.owner(uid, gid, map);
                self.mode(mode, false);
            }
            Op::Mkdir { mode, uid, gid, .. } => {
                self.owner(uid, gid, map);
                self.mode(mode, true);
            }
            Op::Symlink { uid, gid, .. } => self.owner(uid, gid, map),
            Op::SetAttr { attrs, .. } => {
                match (self.owners, map) {
                    (Owners::Preserve, _) => {}
                    (Owners::Map, Some(m)) => {
                        if let Some(u) = attrs.uid.as_mut() {
                            *u = m.uid_in.get(u).copied().unwrap_or(m.unknown_in.0);
                        }
                        if let Some(g) = attrs.gid.as_mut() {
                            *g = m.gid_in.get(g).copied().unwrap_or(m.unknown_in.1);
                        }
                    }
                    _ if attrs.uid.is_some() || attrs.gid.is_some() => {
                        attrs.uid = Some(self.squash.0);
                        attrs.gid = Some(self.squash.1);
                    }
                    _ => {}
                }
                // (set-id bits of a chmod are stripped by validation, which
                // knows whether the object is a directory)
            }
            _ => {}
        }
    }
}
