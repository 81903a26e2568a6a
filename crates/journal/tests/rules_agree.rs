//! The journal's validation and the testkit model, an independent oracle,
//! accept and refuse the same random namespace ops.

use izo_journal::Store;
use izo_proto::{Expect, FileKind, ObjectId, Op, Origin, RenameMode, ReplicaId, SetAttrs, Timestamp, Versions};
use izo_testkit::Model;
use proptest::prelude::*;

const T: Timestamp = Timestamp { secs: 1_700_000_000, nsec: 0 };

/// An op with its objects given as indexes into the ids seen so far.
#[derive(Clone, Debug)]
enum Step {
    Create { parent: usize, name: usize },
    Mkdir { parent: usize, name: usize },
    Symlink { parent: usize, name: usize, target: usize },
    Mknod { parent: usize, name: usize, kind: usize },
    Link { id: usize, parent: usize, name: usize },
    Remove { parent: usize, name: usize, dir: bool },
    Rename { parent: usize, name: usize, new_parent: usize, new_name: usize, mode: usize },
    SetAttr { id: usize, mode: Option<u32>, uid: Option<u32>, time: Option<usize> },
    Write { id: usize, offset: u64 },
    Truncate { id: usize, size: u64 },
}

/// Names, most of them valid, a few of each kind of invalid one.
fn name(i: usize) -> Vec<u8> {
    match i {
        0..=3 => vec![b"abcd"[i]],
        4 => b"..".to_vec(),
        5 => Vec::new(),
        6 => b"x/y".to_vec(),
        _ => vec![b'n'; 256],
    }
}

fn target(i: usize) -> Vec<u8> {
    match i {
        0 => b"a".to_vec(),
        1 => b"../b/c".to_vec(),
        2 => Vec::new(),
        3 => vec![b't'; 4096],
        _ => b"a\0b".to_vec(),
    }
}

fn time(i: usize) -> Timestamp {
    match i {
        0 => Timestamp { secs: 1_000, nsec: 5 },
        1 => Timestamp { secs: -1_000_000, nsec: 0 },
        2 => Timestamp { secs: 1 << 40, nsec: 0 },
        _ => Timestamp { secs: 5, nsec: 1_000_000_000 },
    }
}

fn step() -> impl Strategy<Value = Step> {
    let ix = 0usize..12;
    let nm = 0usize..9;
    prop_oneof![
        3 => (ix.clone(), nm.clone()).prop_map(|(parent, name)| Step::Create { parent, name }),
        3 => (ix.clone(), nm.clone()).prop_map(|(parent, name)| Step::Mkdir { parent, name }),
        1 => (ix.clone(), nm.clone(), 0usize..5).prop_map(|(parent, name, target)| Step::Symlink { parent, name, target }),
        1 => (ix.clone(), nm.clone(), 0usize..4).prop_map(|(parent, name, kind)| Step::Mknod { parent, name, kind }),
        2 => (ix.clone(), ix.clone(), nm.clone()).prop_map(|(id, parent, name)| Step::Link { id, parent, name }),
        3 => (ix.clone(), nm.clone(), any::<bool>()).prop_map(|(parent, name, dir)| Step::Remove { parent, name, dir }),
        4 => (ix.clone(), nm.clone(), ix.clone(), nm.clone(), 0usize..3).prop_map(
            |(parent, name, new_parent, new_name, mode)| Step::Rename { parent, name, new_parent, new_name, mode }
        ),
        2 => (ix.clone(), proptest::option::of(0u32..0o10000), proptest::option::of(0u32..3), proptest::option::of(0usize..4))
            .prop_map(|(id, mode, uid, time)| Step::SetAttr { id, mode, uid, time }),
        1 => (ix.clone(), 0u64..100).prop_map(|(id, offset)| Step::Write { id, offset }),
        1 => (ix, 0u64..100).prop_map(|(id, size)| Step::Truncate { id, size }),
    ]
}

/// The journal and the model side by side.
struct Both {
    store: Store,
    model: Model,
    /// Every id named so far (the root first, removed ones stay).
    ids: Vec<ObjectId>,
    cseq: u64,
    _dir: tempfile::TempDir,
}

impl Both {
    fn new() -> Both {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("volume.redb"), (0, 0, 0o755, T)).expect("open the store");
        Both { store, model: Model::new(0o755, 0, 0, T), ids: vec![ObjectId::ROOT], cseq: 0, _dir: dir }
    }

    fn id(&self, i: usize) -> ObjectId {
        self.ids[i % self.ids.len()]
    }

    /// A fresh id, or now and then one already used.
    fn new_id(&mut self, i: usize) -> ObjectId {
        if i == 11 && self.ids.len() > 1 {
            return self.id(i);
        }
        let id = ObjectId(1000 + self.ids.len() as u128);
        self.ids.push(id);
        id
    }

    /// Versions of an object as the journal has them now (what a client
    /// that saw the latest state would send as its base).
    fn versions(&self, id: ObjectId) -> Versions {
        let b = self.store.batch().expect("batch");
        b.object(id).map(|r| r.versions).unwrap_or_default()
    }

    fn expect(&self, parent: ObjectId, name: &[u8]) -> Option<Expect> {
        let id = self.model.lookup(parent, name)?;
        Some(Expect { id, base: self.versions(id) })
    }

    fn op(&mut self, s: &Step) -> Op {
        let (uid, gid) = (0, 0);
        match *s {
            Step::Create { parent, name: n } => {
                let (parent, id) = (self.id(parent), self.new_id(parent));
                Op::Create { parent, name: name(n), id, mode: 0o644, uid, gid }
            }
            Step::Mkdir { parent, name: n } => {
                let (parent, id) = (self.id(parent), self.new_id(parent));
                Op::Mkdir { parent, name: name(n), id, mode: 0o755, uid, gid }
            }
            Step::Symlink { parent, name: n, target: t } => {
                let (parent, id) = (self.id(parent), self.new_id(parent));
                Op::Symlink { parent, name: name(n), id, target: target(t), uid, gid }
            }
            Step::Mknod { parent, name: n, kind } => {
                let (parent, id) = (self.id(parent), self.new_id(parent));
                let kind = [FileKind::Fifo, FileKind::Socket, FileKind::CharDev, FileKind::File][kind];
                Op::Mknod { parent, name: name(n), id, kind, mode: 0o600, uid, gid, rdev: 0 }
            }
            Step::Link { id, parent, name: n } => Op::Link { id: self.id(id), parent: self.id(parent), name: name(n) },
            Step::Remove { parent, name: n, dir } => {
                let (parent, name) = (self.id(parent), name(n));
                let expect =
                    self.expect(parent, &name).unwrap_or(Expect { id: ObjectId(7), base: Versions::default() });
                if dir {
                    Op::Rmdir { parent, name, expect }
                } else {
                    Op::Unlink { parent, name, expect }
                }
            }
            Step::Rename { parent, name: n, new_parent, new_name, mode } => {
                let (parent, name, new_parent, new_name) =
                    (self.id(parent), name(n), self.id(new_parent), name(new_name));
                let expect =
                    self.expect(parent, &name).unwrap_or(Expect { id: ObjectId(7), base: Versions::default() });
                let target = self.expect(new_parent, &new_name);
                let mode = [RenameMode::Replace, RenameMode::NoReplace, RenameMode::Exchange][mode];
                Op::Rename { parent, name, expect, new_parent, new_name, target, mode }
            }
            Step::SetAttr { id, mode, uid, time: t } => {
                let id = self.id(id);
                let attrs = SetAttrs { mode, uid, gid: uid, mtime: t.map(time), atime: t.map(time) };
                Op::SetAttr { id, base: self.versions(id).meta, attrs }
            }
            Step::Write { id, offset } => {
                let id = self.id(id);
                Op::Write { id, base: self.versions(id).data, offset, data: b"bytes".to_vec() }
            }
            Step::Truncate { id, size } => {
                let id = self.id(id);
                Op::Truncate { id, base: self.versions(id).data, size }
            }
        }
    }

    /// Run one op on both; their decisions must agree.
    fn run(&mut self, s: &Step) -> Result<(), TestCaseError> {
        let op = self.op(s);
        self.cseq += 1;
        let mut b = self.store.batch().expect("batch");
        let journal = b.execute(Origin::Replica(ReplicaId(1), self.cseq), &op, T);
        b.commit(false).expect("commit");
        let model = self.model.apply(&op, T);
        prop_assert_eq!(
            journal.is_ok(),
            model.is_ok(),
            "journal and model disagree on {:?}: journal {:?}, model {:?}",
            op,
            journal,
            model
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn journal_and_model_accept_and_refuse_the_same_namespace_ops(steps in proptest::collection::vec(step(), 1..60)) {
        let mut both = Both::new();
        for s in &steps {
            both.run(s)?;
        }
    }
}

/// The decision this crate took for `mode` on a symlink, seen on both.
#[test]
fn a_mode_change_on_a_symlink_is_refused_by_journal_and_model() {
    let mut both = Both::new();
    both.run(&Step::Symlink { parent: 0, name: 0, target: 0 }).expect("symlink");
    let id = both.ids[1];
    let base = both.versions(id).meta;
    let op = Op::SetAttr { id, base, attrs: SetAttrs { mode: Some(0o600), ..Default::default() } };
    let chown = Op::SetAttr { id, base, attrs: SetAttrs { uid: Some(5), ..Default::default() } };
    let mut b = both.store.batch().expect("batch");
    let journal = b.execute(Origin::Local, &op, T);
    assert!(matches!(journal, Err(izo_proto::OpError::Unsupported(_))), "journal: {journal:?}");
    assert!(both.model.apply(&op, T).is_err(), "the model refuses it too");
    b.execute(Origin::Local, &chown, T).expect("lchown works on a symlink");
    both.model.apply(&chown, T).expect("in the model too");
}
