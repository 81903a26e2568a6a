//! Every rule against a small namespace built in memory.

use super::*;
use std::collections::BTreeMap;

/// A tree in memory: objects with kinds and names.
#[derive(Default)]
struct Tree {
    nodes: BTreeMap<ObjectId, Node>,
    names: BTreeMap<(ObjectId, Vec<u8>), ObjectId>,
}

impl Namespace for Tree {
    type Error = OpError;
    fn lookup(&self, parent: ObjectId, name: &[u8]) -> Result<Option<ObjectId>, OpError> {
        Ok(self.names.get(&(parent, name.to_vec())).copied())
    }
    fn node(&self, id: ObjectId) -> Result<Option<Node>, OpError> {
        Ok(self.nodes.get(&id).copied())
    }
    fn is_empty(&self, dir: ObjectId) -> Result<bool, OpError> {
        Ok(!self.names.keys().any(|(p, _)| *p == dir))
    }
    fn parent_of(&self, dir: ObjectId) -> Result<Option<ObjectId>, OpError> {
        Ok(self.names.iter().find(|(_, c)| **c == dir).map(|((p, _), _)| *p))
    }
}

const ROOT: ObjectId = ObjectId::ROOT;
const A: ObjectId = ObjectId(10); // dir /a
const B: ObjectId = ObjectId(11); // dir /a/b
const F: ObjectId = ObjectId(12); // file /f, also /a/f2
const E: ObjectId = ObjectId(13); // empty dir /e
const S: ObjectId = ObjectId(14); // symlink /s
const Z: ObjectId = ObjectId(15); // file open but removed (no name)
const G: ObjectId = ObjectId(16); // file /a/b/g

fn tree() -> Tree {
    let mut t = Tree::default();
    let node = |kind, nlink| Node { kind, nlink };
    t.nodes.insert(ROOT, node(FileKind::Dir, 4));
    for (id, kind, nlink) in [
        (A, FileKind::Dir, 3),
        (B, FileKind::Dir, 2),
        (F, FileKind::File, 2),
        (E, FileKind::Dir, 2),
        (S, FileKind::Symlink, 1),
        (Z, FileKind::File, 0),
        (G, FileKind::File, 1),
    ] {
        t.nodes.insert(id, node(kind, nlink));
    }
    for (p, n, c) in
        [(ROOT, "a", A), (A, "b", B), (ROOT, "f", F), (A, "f2", F), (ROOT, "e", E), (ROOT, "s", S), (B, "g", G)]
    {
        t.names.insert((p, n.as_bytes().to_vec()), c);
    }
    t
}

/// The variant of a result, for tables: "ok", an error or a conflict kind.
fn outcome<T>(r: Result<T, OpError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(OpError::Conflict { kind, .. }) => format!("{kind:?}"),
        Err(e) => format!("{e:?}").split('(').next().unwrap_or_default().to_string(),
    }
}

#[test]
fn names_are_one_component_of_1_to_255_bytes() {
    let long = vec![b'a'; 256];
    let max = vec![b'a'; 255];
    let cases: &[(&[u8], &str)] = &[
        (b"a", "ok"),
        (&max, "ok"),
        (b"...", "ok"),
        (b".hidden", "ok"),
        (&long, "NameTooLong"),
        (b"", "BadName"),
        (b".", "BadName"),
        (b"..", "BadName"),
        (b"a/b", "BadName"),
        (b"a\0b", "BadName"),
    ];
    for (n, want) in cases {
        assert_eq!(outcome(name(n)), *want, "{:?}", String::from_utf8_lossy(n));
        assert_eq!(name(n).is_ok(), crate::valid_name(n), "valid_name agrees on {n:?}");
    }
}

#[test]
fn symlink_targets_are_1_to_4095_bytes_without_nul() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"x".to_vec(), "ok"),
        (vec![b'a'; 4095], "ok"),
        (b"../a/b".to_vec(), "ok"),
        (Vec::new(), "Invalid"),
        (vec![b'a'; 4096], "Invalid"),
        (b"a\0".to_vec(), "Invalid"),
    ];
    for (t, want) in cases {
        assert_eq!(outcome(symlink_target(&t)), want, "{} bytes", t.len());
    }
}

#[test]
fn mknod_makes_device_nodes_only_on_a_trusted_volume() {
    use FileKind::*;
    let cases = [
        (Fifo, false, "ok"),
        (Socket, false, "ok"),
        (BlockDev, false, "NotPermitted"),
        (CharDev, false, "NotPermitted"),
        (BlockDev, true, "ok"),
        (CharDev, true, "ok"),
        (File, true, "Invalid"),
        (Dir, true, "Invalid"),
        (Symlink, true, "Invalid"),
    ];
    for (kind, trusted, want) in cases {
        assert_eq!(outcome(mknod_kind(kind, trusted)), want, "{kind:?} trusted={trusted}");
    }
}

#[test]
fn a_create_needs_a_directory_and_a_free_valid_name() {
    let t = tree();
    let gone = ObjectId(99);
    let cases: &[(ObjectId, &[u8], &str)] = &[
        (ROOT, b"new", "ok"),
        (A, b"f", "ok"),
        (ROOT, b"f", "NameExists"),
        (A, b"b", "NameExists"),
        (F, b"x", "NotDir"),
        (S, b"x", "NotDir"),
        (gone, b"x", "ParentGone"),
        (ROOT, b"..", "BadName"),
        (gone, b"", "BadName"),
    ];
    for (p, n, want) in cases {
        assert_eq!(outcome(create(&t, *p, n)), *want, "{p} {:?}", String::from_utf8_lossy(n));
    }
}

#[test]
fn hard_links_are_for_named_non_directories() {
    let t = tree();
    let cases: &[(ObjectId, ObjectId, &[u8], &str)] = &[
        (F, ROOT, b"f3", "ok"),
        (S, A, b"s2", "ok"),
        (A, ROOT, b"a2", "NotPermitted"),
        (E, ROOT, b"e2", "NotPermitted"),
        (Z, ROOT, b"z", "NotFound"),
        (ObjectId(99), ROOT, b"x", "ObjectGone"),
        (F, ROOT, b"s", "NameExists"),
        (F, F, b"x", "NotDir"),
        (F, ROOT, b"a/b", "BadName"),
    ];
    for (id, p, n, want) in cases {
        assert_eq!(outcome(link(&t, *id, *p, n)), *want, "link {id} as {p}/{:?}", String::from_utf8_lossy(n));
    }
}

#[test]
fn unlink_takes_non_directories_and_rmdir_empty_directories() {
    let t = tree();
    let cases = [
        (F, false, "ok"),
        (S, false, "ok"),
        (A, false, "IsDir"),
        (E, true, "ok"),
        (A, true, "NotEmpty"),
        (F, true, "NotDir"),
        (ObjectId(99), false, "ObjectGone"),
    ];
    for (id, dir, want) in cases {
        assert_eq!(outcome(removable(&t, id, dir, b"x")), want, "{id} dir={dir}");
    }
}

#[test]
fn rename_cases_follow_linux() {
    use RenameMode::*;
    let t = tree();
    type Case = ((ObjectId, &'static str), (ObjectId, &'static str), RenameMode, &'static str);
    let cases: &[Case] = &[
        // a free target: a move, whatever the mode but exchange
        ((ROOT, "f"), (ROOT, "new"), Replace, "ok"),
        ((ROOT, "f"), (ROOT, "new"), NoReplace, "ok"),
        ((ROOT, "f"), (ROOT, "new"), Exchange, "TargetGone"),
        ((ROOT, "a"), (ROOT, "a2"), Replace, "ok"),
        // replace: kinds must match and a replaced directory be empty
        ((ROOT, "s"), (ROOT, "f"), Replace, "ok"),
        ((ROOT, "s"), (ROOT, "e"), Replace, "IsDir"),
        ((ROOT, "e"), (ROOT, "f"), Replace, "NotDir"),
        ((B, "g"), (ROOT, "a"), Replace, "IsDir"),
        ((ROOT, "e"), (ROOT, "a"), Replace, "NotEmpty"),
        ((A, "b"), (ROOT, "e"), Replace, "ok"),
        // no-replace refuses any existing target, even the same object
        ((ROOT, "s"), (ROOT, "f"), NoReplace, "NameExists"),
        ((ROOT, "f"), (A, "f2"), NoReplace, "NameExists"),
        // exchange swaps any two kinds
        ((ROOT, "e"), (ROOT, "f"), Exchange, "ok"),
        ((ROOT, "a"), (ROOT, "e"), Exchange, "ok"),
        // two names of one object: nothing to do
        ((ROOT, "f"), (A, "f2"), Replace, "ok"),
        ((ROOT, "f"), (ROOT, "f"), Replace, "ok"),
        ((ROOT, "f"), (A, "f2"), Exchange, "ok"),
        // a directory never moves below itself
        ((ROOT, "a"), (A, "x"), Replace, "Cycle"),
        ((ROOT, "a"), (B, "x"), NoReplace, "Cycle"),
        ((ROOT, "a"), (B, "g"), Exchange, "Cycle"),
        ((B, "g"), (ROOT, "a"), Exchange, "Cycle"),
        ((ROOT, "e"), (B, "x"), Replace, "ok"),
        // the cycle rule comes before the kinds rule (Linux's order)
        ((ROOT, "a"), (B, "g"), Replace, "Cycle"),
        // names and parents
        ((ROOT, "nope"), (ROOT, "x"), Replace, "NotFound"),
        ((ROOT, "f"), (ROOT, ".."), Replace, "BadName"),
        ((ROOT, "f"), (F, "x"), Replace, "NotDir"),
        ((ROOT, "f"), (ObjectId(99), "x"), Replace, "ParentGone"),
    ];
    for ((p, n), (np, nn), mode, want) in cases {
        let r = rename(&t, (*p, n.as_bytes()), (*np, nn.as_bytes()), *mode);
        assert_eq!(outcome(r), *want, "rename {p}/{n} → {np}/{nn} {mode:?}");
    }
}

#[test]
fn rename_reports_what_it_does() {
    let t = tree();
    let r = |p, n: &str, np, nn: &str, m| rename(&t, (p, n.as_bytes()), (np, nn.as_bytes()), m).map(|r| r.case);
    assert_eq!(r(ROOT, "f", ROOT, "new", RenameMode::Replace), Ok(RenameCase::Move));
    assert_eq!(r(ROOT, "s", ROOT, "f", RenameMode::Replace), Ok(RenameCase::Replace(F)));
    assert_eq!(r(ROOT, "e", ROOT, "f", RenameMode::Exchange), Ok(RenameCase::Exchange(F)));
    assert_eq!(r(ROOT, "f", A, "f2", RenameMode::Replace), Ok(RenameCase::Same));
}

#[test]
fn the_cycle_walk_is_bounded() {
    // a view whose parents loop without reaching the moved directory
    struct Loop;
    impl Namespace for Loop {
        type Error = OpError;
        fn lookup(&self, _: ObjectId, _: &[u8]) -> Result<Option<ObjectId>, OpError> {
            Ok(None)
        }
        fn node(&self, _: ObjectId) -> Result<Option<Node>, OpError> {
            Ok(Some(Node { kind: FileKind::Dir, nlink: 2 }))
        }
        fn is_empty(&self, _: ObjectId) -> Result<bool, OpError> {
            Ok(true)
        }
        fn parent_of(&self, d: ObjectId) -> Result<Option<ObjectId>, OpError> {
            Ok(Some(ObjectId(if d.0 == 20 { 21 } else { 20 })))
        }
    }
    assert_eq!(within(&Loop, ObjectId(20), ObjectId(5)), Ok(true), "a loop is taken as a cycle");
    assert_eq!(within(&tree(), E, A), Ok(false));
    assert_eq!(within(&tree(), B, A), Ok(true));
    assert_eq!(within(&tree(), ROOT, A), Ok(false));
}

#[test]
fn data_ops_are_for_regular_files() {
    use FileKind::*;
    let cases = [
        (File, "ok"),
        (Dir, "IsDir"),
        (Symlink, "Invalid"),
        (Fifo, "Invalid"),
        (Socket, "Invalid"),
        (CharDev, "Invalid"),
    ];
    for (kind, want) in cases {
        assert_eq!(outcome(data_target(ObjectId(3), kind)), want, "{kind:?}");
    }
}

#[test]
fn setattr_rules_per_kind() {
    use FileKind::*;
    let t = |secs| Some(Timestamp { secs, nsec: 0 });
    let mode = |m| SetAttrs { mode: Some(m), ..Default::default() };
    let owner = SetAttrs { uid: Some(1), gid: Some(2), ..Default::default() };
    let times = SetAttrs { mtime: t(1), atime: t(2), ..Default::default() };
    let cases: Vec<(FileKind, SetAttrs, bool, &str)> = vec![
        (File, mode(0o644), false, "ok"),
        (Dir, mode(0o755), false, "ok"),
        (CharDev, mode(0o600), true, "ok"),
        (Fifo, mode(0o600), false, "ok"),
        (Symlink, mode(0o644), true, "Unsupported"),
        (Symlink, owner.clone(), false, "ok"),
        (Symlink, times.clone(), false, "ok"),
        (Dir, owner.clone(), false, "ok"),
        (BlockDev, times.clone(), true, "ok"),
        (File, SetAttrs { mtime: t(1 << 40), ..Default::default() }, true, "Invalid"),
        (File, SetAttrs { atime: t(-(1 << 40)), ..Default::default() }, true, "Invalid"),
        (
            File,
            SetAttrs { mtime: Some(Timestamp { secs: 0, nsec: 1_000_000_000 }), ..Default::default() },
            true,
            "Invalid",
        ),
    ];
    for (kind, attrs, trusted, want) in cases {
        assert_eq!(outcome(setattr(kind, &attrs, trusted)), want, "{kind:?} {attrs:?}");
    }
}

#[test]
fn an_untrusted_volume_keeps_only_a_directorys_setgid() {
    let m =
        |kind, trusted| setattr(kind, &SetAttrs { mode: Some(0o17777), ..Default::default() }, trusted).map(|a| a.mode);
    assert_eq!(m(FileKind::File, false), Ok(Some(0o1777)));
    assert_eq!(m(FileKind::Dir, false), Ok(Some(0o3777)));
    assert_eq!(m(FileKind::File, true), Ok(Some(0o7777)));
    assert_eq!(m(FileKind::CharDev, false), Ok(Some(0o1777)));
}
