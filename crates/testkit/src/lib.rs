//! The intermezzo test kit: a digest of real directory trees
//! ([`tree_digest`]) and a reference model of a volume ([`Model`]) that
//! yields the same [`Digest`] for the same state, so tests can compare a
//! served or mounted tree against what the applied ops should produce.
//!
//! Test support only: never used in production code.

pub mod digest;
pub mod model;

#[cfg(test)]
mod harness;

pub use digest::{digest_xattr, tree_digest, Digest, Kind, Node, MAX_DIFF_LINES, STAGE_DIR};
pub use model::{Model, MAX_MODEL_FILE};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::Harness;
    use izo_proto::{Expect, FileKind, ObjectId, Op, RenameMode, SetAttrs, Timestamp, Versions};
    use std::fs;

    const NON_UTF8: &[u8] = b"caf\xe9-\xff\xfe";

    /// A tree exercising every op kind and node kind.
    fn build_rich(h: &mut Harness) {
        h.mkdir(b"a", 0o755);
        h.mkdir(b"a/b", 0o1750);
        h.mkdir(b"c", 0o700);
        h.create(b"a/f", 0o644, b"hello world");
        h.create(b"a/b/empty", 0o600, b"");
        h.create(b"big", 0o640, &vec![7u8; 300_000]);
        h.symlink(b"a/ln", b"../big");
        h.symlink(b"dangling", b"/nonexistent/target");
        h.mknod(b"c/fifo", FileKind::Fifo, 0o620);
        h.mknod(b"c/sock", FileKind::Socket, 0o755);
        // Hard links: a group of three across directories, then one removed.
        h.create(b"h1", 0o644, b"linked");
        h.link(b"h1", b"a/h2");
        h.link(b"h1", b"c/h3");
        h.link(b"h1", b"c/h4");
        h.remove(b"c/h4");
        // Content ops.
        h.write(b"a/f", 20, b"gap before me");
        h.truncate(b"a/f", 25);
        h.truncate(b"big", 310_000);
        h.fallocate(b"big", 320_000, 4096, false);
        h.fallocate(b"big", 4096, 8192, true);
        h.fallocate(b"big", 323_000, 100_000, true);
        // Attributes and xattrs.
        h.setattr(b"a/f", SetAttrs { mode: Some(0o4755), ..Default::default() });
        let pre_epoch = Timestamp { secs: -1_000_000, nsec: 123 };
        h.setattr(b"big", SetAttrs { mtime: Some(pre_epoch), ..Default::default() });
        let old = Timestamp { secs: 1_000_000_000, nsec: 999_999_999 };
        h.setattr(b"a", SetAttrs { mtime: Some(old), ..Default::default() });
        h.setxattr(b"a/f", b"user.x", b"value", true);
        h.setxattr(b"a/f", b"user.gone", b"", true);
        h.setxattr(b"c", b"user.dir", b"\x00\x01binary", true);
        h.setxattr(b"a/f", b"trusted.hidden", b"not replicated", false);
        h.removexattr(b"a/f", b"user.gone");
        if h.uid == 0 {
            let attrs = SetAttrs { uid: Some(1234), gid: Some(5678), ..Default::default() };
            h.setattr(b"c/h3", attrs);
        }
    }

    /// Renames of every flavour on top of [`build_rich`].
    fn rename_rich(h: &mut Harness) {
        h.rename(b"a/f", b"c/f2", RenameMode::Replace);
        h.mkdir(b"a/b/d", 0o755);
        h.create(b"a/b/d/deep", 0o644, b"deep");
        h.rename(b"a/b", b"c/moved", RenameMode::NoReplace);
        h.create(b"victim", 0o644, b"replaced");
        h.rename(b"c/f2", b"victim", RenameMode::Replace);
        h.mkdir(b"emptydir", 0o755);
        h.mkdir(b"srcdir", 0o755);
        h.create(b"srcdir/x", 0o644, b"x");
        h.rename(b"srcdir", b"emptydir", RenameMode::Replace);
        h.rename(b"emptydir", b"c/fifo", RenameMode::Exchange);
        h.rename(b"a/h2", b"h1", RenameMode::Replace); // same object: no-op
        h.rename(b"dangling", b"dangling", RenameMode::Replace);
    }

    #[test]
    fn model_matches_real_tree() {
        let mut h = Harness::new();
        h.assert_agree();
        build_rich(&mut h);
        h.assert_agree();
        rename_rich(&mut h);
        // Server internals under the root are skipped.
        fs::create_dir(h.path(STAGE_DIR)).unwrap();
        fs::write(h.path(b".izo-stage/junk"), b"x").unwrap();
        h.restamp(b""); // creating it touched the root
        let d = h.assert_agree();
        assert!(d.nodes.contains_key(&b"c/moved/d/deep"[..]));
        assert_eq!(d.nodes[&b"h1"[..]].link_group, Some(b"a/h2".to_vec()));
        assert_eq!(d.nodes[&b"c/h3"[..]].link_group, Some(b"a/h2".to_vec()));
        assert_eq!(d.nodes[&b"a/ln"[..]].mode, 0o777);
        assert_eq!(d.nodes[&b"c"[..]].kind, Kind::Dir);
        assert_eq!(d.nodes[&b"c"[..]].size, 0);
        assert_eq!(d.nodes[&b"c/sock"[..]].kind, Kind::Socket);
        assert_eq!(d.nodes[&b"emptydir"[..]].kind, Kind::Fifo);
        assert!(!d.nodes[&b"victim"[..]].xattrs.contains_key(&b"trusted.hidden"[..]));
        // Removing the last extra link dissolves the group.
        h.remove(b"h1");
        h.remove(b"c/h3");
        assert_eq!(h.assert_agree().nodes[&b"a/h2"[..]].link_group, None);
    }

    #[test]
    fn non_utf8_names() {
        let mut h = Harness::new();
        let dir = [b"d-".as_slice(), NON_UTF8].concat();
        let file = [dir.as_slice(), b"/", NON_UTF8].concat();
        h.mkdir(&dir, 0o755);
        h.create(&file, 0o644, b"\xff\x00data");
        h.link(&file, b"plain");
        h.symlink(NON_UTF8, &file);
        h.setxattr(&file, b"user.\xffname", b"\xfe", true);
        let d = h.assert_agree();
        assert_eq!(d.nodes[&file].link_group, Some(file.clone()));
        h.write(&file, 0, b"Z");
        let real = tree_digest(h.dir.path()).unwrap();
        let mut model = h.model.clone();
        let t = Timestamp { secs: 5, nsec: 0 };
        let id = h.id(&file);
        let op = Op::Write { id, base: 0, offset: 1, data: b"Q".to_vec() };
        model.apply(&op, t).unwrap();
        let diff = model.digest().diff(&real);
        assert!(diff.iter().any(|l| l.contains('\u{fffd}') && l.contains("content")), "{diff:?}");
    }

    #[test]
    fn one_byte_change_differs() {
        let h = Harness::small();
        let mut bytes = fs::read(h.path(b"d/f")).unwrap();
        bytes[3] ^= 1;
        fs::write(h.path(b"d/f"), bytes).unwrap();
        h.restamp(b"d/f");
        h.assert_differs("content");
    }

    #[test]
    fn mode_change_differs() {
        let h = Harness::small();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(h.path(b"d/f"), fs::Permissions::from_mode(0o600)).unwrap();
        h.assert_differs("mode");
    }

    #[test]
    fn mtime_change_differs_unless_ignored() {
        let h = Harness::small();
        h.stamp(b"d", Timestamp { secs: 42, nsec: 1 });
        h.assert_differs("mtime");
        let real = tree_digest(h.dir.path()).unwrap();
        let model = h.model.digest();
        assert_eq!(real.without_dir_mtimes(), model.without_dir_mtimes());
        assert_eq!(real.without_mtimes(), model.without_mtimes());
        h.stamp(b"d/f", Timestamp { secs: 42, nsec: 1 });
        let real = tree_digest(h.dir.path()).unwrap();
        assert!(real.without_dir_mtimes() != model.without_dir_mtimes());
        assert_eq!(real.without_mtimes(), model.without_mtimes());
        assert_eq!(real.without_mtimes().nodes[&b"d/f"[..]].mtime, (0, 0));
    }

    #[test]
    fn broken_link_group_differs() {
        let h = Harness::small();
        // Replace d/g2 by an identical copy: same bytes, mode and mtime.
        fs::remove_file(h.path(b"d/g2")).unwrap();
        fs::copy(h.path(b"g"), h.path(b"d/g2")).unwrap();
        h.restamp(b"d/g2");
        h.restamp(b"d");
        h.assert_differs("link_group");
    }

    #[test]
    fn diff_is_capped() {
        let mut h = Harness::new();
        for i in 0..60 {
            h.create(format!("f{i}").as_bytes(), 0o644, b"");
        }
        let full = h.model.digest();
        let empty = Digest::default();
        let diff = full.diff(&empty);
        assert_eq!(diff.len(), MAX_DIFF_LINES);
        assert!(diff[MAX_DIFF_LINES - 1].starts_with("... and 12 more"));
        assert!(full.diff(&full).is_empty());
    }

    #[test]
    fn model_rejects_bad_ops_and_stays_unchanged() {
        let mut h = Harness::small();
        h.mkdir(b"d/sub", 0o755);
        let before = h.model.digest();
        let t = Timestamp { secs: 9, nsec: 9 };
        let e = |id| Expect { id, base: Versions::default() };
        let (d, f, sub, g) = (h.id(b"d"), h.id(b"d/f"), h.id(b"d/sub"), h.id(b"g"));
        let (uid, gid) = (0, 0);
        let bad = [
            Op::Create { parent: d, name: b"f".to_vec(), id: ObjectId(999), mode: 0o644, uid, gid },
            Op::Create { parent: f, name: b"x".to_vec(), id: ObjectId(999), mode: 0o644, uid, gid },
            Op::Mkdir { parent: d, name: b"new".to_vec(), id: f, mode: 0o755, uid, gid },
            Op::Mkdir { parent: d, name: b"a/b".to_vec(), id: ObjectId(999), mode: 0, uid, gid },
            Op::Link { id: d, parent: ObjectId::ROOT, name: b"dl".to_vec() },
            Op::Unlink { parent: d, name: b"f".to_vec(), expect: e(g) },
            Op::Unlink { parent: ObjectId::ROOT, name: b"d".to_vec(), expect: e(d) },
            Op::Rmdir { parent: ObjectId::ROOT, name: b"d".to_vec(), expect: e(d) },
            Op::Rmdir { parent: d, name: b"f".to_vec(), expect: e(f) },
            Op::Write { id: d, base: 0, offset: 0, data: b"x".to_vec() },
            Op::Truncate { id: f, base: 0, size: MAX_MODEL_FILE + 1 },
            Op::RemoveXattr { id: f, base: 0, name: b"user.none".to_vec() },
        ];
        let rename = |name: &[u8], src, new_parent, new_name: &[u8], mode| Op::Rename {
            parent: if src == sub { d } else { ObjectId::ROOT },
            name: name.to_vec(),
            expect: e(src),
            new_parent,
            new_name: new_name.to_vec(),
            target: None,
            mode,
        };
        let bad_renames = [
            rename(b"d", d, sub, b"loop", RenameMode::Replace),
            rename(b"d", d, d, b"loop", RenameMode::Replace),
            rename(b"g", g, ObjectId::ROOT, b"d", RenameMode::Replace),
            rename(b"sub", sub, ObjectId::ROOT, b"g", RenameMode::Replace),
            rename(b"d", d, ObjectId::ROOT, b"g", RenameMode::NoReplace),
            rename(b"g", g, ObjectId::ROOT, b"absent", RenameMode::Exchange),
            rename(b"sub", sub, ObjectId::ROOT, b"d", RenameMode::Exchange),
            rename(b"missing", g, d, b"x", RenameMode::Replace),
        ];
        for op in bad.iter().chain(&bad_renames) {
            assert!(h.model.apply(op, t).is_err(), "accepted {op:?}");
            assert_eq!(h.model.digest(), before, "changed by {op:?}");
        }
        // Replacing a non-empty directory fails; an empty one succeeds.
        let op = rename(b"sub", sub, ObjectId::ROOT, b"d", RenameMode::Replace);
        assert!(h.model.apply(&op, t).is_err());
        h.mkdir(b"e", 0o755);
        h.rename(b"d/sub", b"e", RenameMode::Replace);
        h.assert_agree();
    }
}
