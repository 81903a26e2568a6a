//! Owners and privilege: preserve and squash, setuid/setgid stripped unless
//! the volume is trusted, device nodes only on trusted volumes, only user.* and POSIX ACL
//! extended attributes replicate.

use crate::harness::*;
use izo_client::ClientError;
use izo_proto::*;
use izo_server::policy::Owners;
use std::os::unix::fs::{FileTypeExt, MetadataExt};

fn create(id: ObjectId, n: &str, mode: u32, uid: u32, gid: u32) -> Op {
    Op::Create { parent: ObjectId::ROOT, name: name(n), id, mode, uid, gid }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserve_keeps_numeric_owners_and_strips_setuid_and_setgid() {
    let s = InProc::start().await;
    let c = s.client().await;
    let f = ObjectId::new();
    c.mutate(create(f, "f", 0o6755, 1234, 5678)).await.expect("create");
    let m = std::fs::metadata(s.dirs.export.join("f")).expect("stat");
    assert_eq!((m.uid(), m.gid()), (1234, 5678));
    assert_eq!(m.mode() & 0o7777, 0o755, "setuid/setgid stripped on an untrusted volume");
    let attrs = SetAttrs { mode: Some(0o4755), uid: Some(0), gid: Some(0), mtime: None, atime: None };
    let a =
        c.mutate(Op::SetAttr { id: f, base: 0, attrs }).await.expect("chown to root is a numeric id like any other");
    assert_eq!(a.attr.expect("attr").mode, 0o755, "setuid stripped on setattr too");
    let m = std::fs::metadata(s.dirs.export.join("f")).expect("stat");
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o755));
    let d = ObjectId::new();
    c.mutate(Op::Mkdir { parent: ObjectId::ROOT, name: name("d"), id: d, mode: 0o2775, uid: 0, gid: 0 })
        .await
        .expect("mkdir");
    // (a directory's setgid bit only passes a group on: it stays)
    assert_eq!(std::fs::metadata(s.dirs.export.join("d")).expect("stat").mode() & 0o7777, 0o2775);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squash_gives_everything_one_owner_even_a_chown_to_root() {
    let s = InProc::start_with(Dirs::new(), |c| {
        c.owners = Owners::Squash;
        c.squash_uid = Some(4242);
        c.squash_gid = Some(4343);
    })
    .await;
    let c = s.client().await;
    let f = ObjectId::new();
    let a = c.mutate(create(f, "f", 0o644, 0, 0)).await.expect("create");
    assert_eq!(a.attr.as_ref().map(|a| (a.uid, a.gid)), Some((4242, 4343)));
    let attrs = SetAttrs { uid: Some(0), gid: Some(0), ..Default::default() };
    c.mutate(Op::SetAttr { id: f, base: 0, attrs }).await.expect("chown");
    let m = std::fs::metadata(s.dirs.export.join("f")).expect("stat");
    assert_eq!((m.uid(), m.gid()), (4242, 4343), "a chown to root lands on the squash owner");
    let l = ObjectId::new();
    let op = Op::Symlink { parent: ObjectId::ROOT, name: name("l"), id: l, target: name("f"), uid: 0, gid: 0 };
    c.mutate(op).await.expect("symlink");
    let m = std::fs::symlink_metadata(s.dirs.export.join("l")).expect("lstat");
    assert_eq!((m.uid(), m.gid()), (4242, 4343));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_volume_keeps_setuid() {
    let s = InProc::start_with(Dirs::new(), |c| c.trusted = true).await;
    let c = s.client().await;
    c.mutate(create(ObjectId::new(), "suid", 0o4755, 0, 0)).await.expect("create");
    assert_eq!(std::fs::metadata(s.dirs.export.join("suid")).expect("stat").mode() & 0o7777, 0o4755);
}

/// A device number as `stat` shows it (the kernel's 32-bit encoding).
fn makedev(major: u32, minor: u32) -> u32 {
    u32::try_from(libc::makedev(major, minor)).expect("a small device number fits in 32 bits")
}

fn device(n: &str, kind: FileKind, rdev: u32) -> Op {
    Op::Mknod { parent: ObjectId::ROOT, name: name(n), id: ObjectId::new(), kind, mode: 0o620, uid: 0, gid: 5, rdev }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_nodes_are_refused_with_not_permitted_unless_the_volume_is_trusted() {
    let s = InProc::start().await;
    let c = s.client().await;
    for kind in [FileKind::BlockDev, FileKind::CharDev] {
        let r = c.mutate(device("dev", kind, makedev(1, 3))).await;
        assert!(matches!(r, Err(ClientError::Op(OpError::NotPermitted(_)))), "{kind:?}: {r:?}");
    }
    assert!(s.dirs.export.join("dev").symlink_metadata().is_err(), "nothing made in the export");
    assert!(!c.welcome().expect("welcome").trusted, "the handshake says the volume is not trusted");

    let s = InProc::start_with(Dirs::new(), |c| c.trusted = true).await;
    let c = s.client().await;
    assert!(c.welcome().expect("welcome").trusted, "the handshake says the volume is trusted");
    let a = c.mutate(device("loop", FileKind::BlockDev, makedev(7, 0))).await.expect("block device");
    let a = a.attr.expect("attr");
    assert_eq!((a.kind, a.rdev, a.mode, a.gid), (FileKind::BlockDev, makedev(7, 0), 0o620, 5));
    c.mutate(device("null", FileKind::CharDev, makedev(1, 3))).await.expect("char device");
    let m = s.dirs.export.join("loop").symlink_metadata().expect("stat loop");
    assert!(m.file_type().is_block_device());
    assert_eq!((m.rdev(), m.mode() & 0o7777, m.gid()), (makedev(7, 0).into(), 0o620, 5));
    let m = s.dirs.export.join("null").symlink_metadata().expect("stat null");
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), makedev(1, 3).into());
    let (entries, _) = c.snapshot().await.expect("snapshot");
    let dev = |n: &str| entries.iter().find(|e| e.links.iter().any(|(_, l)| l == n.as_bytes())).map(|e| e.attr.rdev);
    assert_eq!((dev("loop"), dev("null")), (Some(makedev(7, 0)), Some(makedev(1, 3))), "snapshot rdev");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_fifos_and_sockets_are_special_files_and_only_user_and_acl_xattrs_replicate() {
    let s = InProc::start().await;
    let c = s.client().await;
    for kind in [FileKind::File, FileKind::Dir, FileKind::Symlink] {
        let op = Op::Mknod {
            parent: ObjectId::ROOT,
            name: name("dev"),
            id: ObjectId::new(),
            kind,
            mode: 0o600,
            uid: 0,
            gid: 0,
            rdev: 0,
        };
        assert!(matches!(c.mutate(op).await, Err(ClientError::Op(OpError::Invalid(_)))), "{kind:?}");
    }
    let f = ObjectId::new();
    c.mutate(create(f, "f", 0o644, 0, 0)).await.expect("create");
    for ns in ["security.selinux", "trusted.overlay.opaque", "system.foo"] {
        let op = Op::SetXattr { id: f, base: 0, name: name(ns), value: b"y".to_vec() };
        assert!(matches!(c.mutate(op).await, Err(ClientError::Op(OpError::Unsupported(_)))), "{ns} is not replicated");
    }
    let op = Op::SetXattr { id: f, base: 0, name: name("user."), value: b"y".to_vec() };
    assert!(matches!(c.mutate(op).await, Err(ClientError::Op(OpError::Invalid(_)))), "an empty user. name");
    // a POSIX ACL (u::rw-, u:1000:rw-, g::r--, m::rw-, o::r--) replicates as is
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in
        [(1u16, 6u16, u32::MAX), (2, 6, 1000), (4, 4, u32::MAX), (0x10, 6, u32::MAX), (0x20, 4, u32::MAX)]
    {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    let op = Op::SetXattr { id: f, base: 0, name: name("system.posix_acl_access"), value: acl.clone() };
    let a = c.mutate(op).await.expect("ACL set");
    let server_mode = a.attr.expect("attr").mode;
    assert_eq!(server_mode, 0o664, "the ACL's mask becomes the group bits");
    assert_eq!(std::fs::metadata(s.dirs.export.join("f")).expect("stat").mode() & 0o7777, server_mode);
    // a chmod rewrites the ACL's entries, on the server as in the tree
    let attrs = SetAttrs { mode: Some(0o640), ..Default::default() };
    c.mutate(Op::SetAttr { id: f, base: 0, attrs }).await.expect("chmod");
    let stored = c.xattrs(f).await.expect("xattrs");
    let stored =
        stored.iter().find(|(n, _)| n == b"system.posix_acl_access").map(|(_, v)| v.clone()).expect("ACL kept");
    c.mutate(Op::SetXattr { id: f, base: 0, name: name("user.tag"), value: b"v".to_vec() }).await.expect("user xattr");
    let digest = izo_testkit::tree_digest(&s.dirs.export).expect("digest");
    let node = digest.nodes.get(&name("f")).expect("f in digest");
    assert_eq!(node.xattrs.get(&name("user.tag")), Some(&b"v".to_vec()));
    assert_eq!(node.xattrs.get(&name("system.posix_acl_access")), Some(&stored), "the tree's ACL is the server's");
    assert_eq!(node.mode, 0o640);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_translates_owners_by_name_both_ways() {
    let s = InProc::start_with(Dirs::new(), |c| {
        c.owners = Owners::Map;
        c.squash_uid = Some(4242);
        c.squash_gid = Some(4343);
    })
    .await;
    // this client calls daemon 5001 and bin 5002; the server knows them as 1 and 2
    let mut cfg = s.client_config(&s.rw);
    cfg.users = vec![
        (5001, "daemon".into()),
        (5002, "bin".into()),
        (6000, "no-such-user-izo".into()),
        (65534, "nobody".into()),
    ];
    cfg.groups = vec![(7001, "daemon".into()), (65534, "nogroup".into())];
    let c = izo_client::Client::connect(cfg).await.expect("client");
    let f = ObjectId::new();
    let a = c.mutate(create(f, "f", 0o644, 5001, 7001)).await.expect("create");
    let m = std::fs::metadata(s.dirs.export.join("f")).expect("stat");
    assert_eq!((m.uid(), m.gid()), (1, 1), "stored under the server's ids for the names");
    assert_eq!(a.attr.as_ref().map(|a| (a.uid, a.gid)), Some((5001, 7001)), "shown in the client's ids");
    // a name the server does not know lands on the squash owner, shown as the client's nobody
    let g = ObjectId::new();
    let a = c.mutate(create(g, "g", 0o644, 6000, 7001)).await.expect("create");
    assert_eq!(std::fs::metadata(s.dirs.export.join("g")).expect("stat").uid(), 4242);
    assert_eq!(a.attr.map(|a| a.uid), Some(65534));
    // chown by name, then every view agrees
    let attrs = SetAttrs { uid: Some(5002), ..Default::default() };
    c.mutate(Op::SetAttr { id: f, base: 0, attrs }).await.expect("chown");
    assert_eq!(std::fs::metadata(s.dirs.export.join("f")).expect("stat").uid(), 2);
    assert_eq!(c.getattr(f).await.expect("getattr").uid, 5002);
    let listed = c.readdir(ObjectId::ROOT).await.expect("ls");
    assert!(listed.iter().any(|e| e.name == b"f" && e.attr.uid == 5002 && e.attr.gid == 7001));
    // a client without tables sees no names it knows
    let other = s.client().await;
    assert_eq!(other.getattr(f).await.expect("getattr").uid, 65534);
}

fn lgetxattr(path: &std::path::Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let n = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0u8; 256];
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (r >= 0).then(|| {
        buf.truncate(r as usize);
        buf
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_volume_replicates_trusted_xattrs_and_file_capabilities() {
    let s = InProc::start_with(Dirs::new(), |c| c.trusted = true).await;
    let c = s.client().await;
    let f = ObjectId::new();
    c.mutate(create(f, "f", 0o755, 0, 0)).await.expect("create");
    c.mutate(Op::SetXattr { id: f, base: 0, name: name("trusted.t"), value: b"v".to_vec() }).await.expect("trusted.*");
    // CAP_NET_BIND_SERVICE permitted, revision 2
    let mut cap = 0x0200_0000u32.to_le_bytes().to_vec();
    cap.extend_from_slice(&(1u32 << 10).to_le_bytes());
    cap.resize(20, 0);
    c.mutate(Op::SetXattr { id: f, base: 0, name: name("security.capability"), value: cap.clone() })
        .await
        .expect("capability");
    let path = s.dirs.export.join("f");
    assert_eq!(lgetxattr(&path, "trusted.t").as_deref(), Some(&b"v"[..]));
    assert_eq!(lgetxattr(&path, "security.capability"), Some(cap));
    let other = Op::SetXattr { id: f, base: 0, name: name("security.selinux"), value: b"x".to_vec() };
    assert!(
        matches!(c.mutate(other).await, Err(ClientError::Op(OpError::Unsupported(_)))),
        "other LSM attributes stay local"
    );
    // a chown drops the capability, on the server as in the tree
    c.mutate(Op::SetAttr { id: f, base: 0, attrs: SetAttrs { uid: Some(7), ..Default::default() } })
        .await
        .expect("chown");
    assert_eq!(lgetxattr(&path, "security.capability"), None);
    let names: Vec<Vec<u8>> = c.xattrs(f).await.expect("xattrs").into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec![name("trusted.t")]);
}
