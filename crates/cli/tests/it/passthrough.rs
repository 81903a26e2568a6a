//! FUSE passthrough: a read-only open of a cached file is served by the
//! kernel from the cache file (no READ request reaches the daemon). The
//! kernel (6.9+) requires every open of an inode that has a passthrough
//! open to be passthrough too, so a writer beside passthrough readers
//! writes the cache file directly (its shared-writable mmap maps the cache
//! file) and the daemon takes the whole file as written at its release
//! (DESIGN planned direct I/O and ENODEV for its mmap: the kernel refuses
//! that open with EIO). Without passthrough readers a writer goes through
//! the daemon and the page cache, and maps normally (linkers rely on it).

use crate::harness::*;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;

fn hash_file(p: &Path) -> blake3::Hash {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return h.finalize();
        }
        h.update(&buf[..n]);
    }
}

/// The export, with a 1 GiB file of 16 random 1 MiB extents and holes
/// between (cheap to replicate, a full gigabyte to read).
fn export_with_big_file(dirs: &Dirs) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(dirs.export.join("big")).expect("create");
    f.set_len(1 << 30).expect("size");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..16u64 {
        let block: Vec<u8> = (0..1 << 20)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        f.write_all_at(&block, i * (64 << 20) + 4096).expect("write");
    }
    for n in ["m1", "m2"] {
        std::fs::write(dirs.export.join(n), vec![b'.'; 8192]).expect("write");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_read_of_a_1_gib_file_makes_no_daemon_read_request() {
    sweep_mounts();
    let dirs = Dirs::new();
    export_with_big_file(&dirs);
    let s = InProc::start_with(dirs, |_| {}).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let want = hash_file(&ex.join("big"));
        let (reads, opens) = (served(&a.mnt, "read"), served(&a.mnt, "passthrough_opens"));
        assert_eq!(hash_file(&a.mnt.join("big")), want, "1 GiB read through the mount");
        assert_eq!(served(&a.mnt, "read"), reads, "READ requests for a cached read");
        assert_eq!(served(&a.mnt, "passthrough_opens"), opens + 1, "the open went through");
        // the counter does count: with a writable open there, a read-only
        // open is served by the daemon
        let w = std::fs::OpenOptions::new().write(true).open(a.mnt.join("big")).expect("writable open");
        let mut r = std::fs::File::open(a.mnt.join("big")).expect("open");
        let mut buf = vec![0u8; 1 << 20];
        r.read_exact(&mut buf).expect("read");
        assert!(served(&a.mnt, "read") > reads, "reads beside a writable open reach the daemon");
        drop((r, w));
    })
    .await
    .expect("passthrough read test");
}

fn map_shared(f: &std::fs::File, len: usize) -> Result<*mut u8, i32> {
    // SAFETY: a fresh mapping of an open file; unmapped by the caller.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, f.as_raw_fd(), 0)
    };
    if p == libc::MAP_FAILED {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(p.cast())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writers_and_shared_mmap_work_beside_passthrough_readers_and_reach_the_server() {
    sweep_mounts();
    let dirs = Dirs::new();
    for n in ["m1", "m2"] {
        std::fs::write(dirs.export.join(n), vec![b'.'; 8192]).expect("write");
    }
    let s = InProc::start_with(dirs, |_| {}).await;
    let fp = s.server.fingerprint.clone();
    let (addr, tok) = (s.addr.clone(), s.rw.clone());
    let ex = s.dirs.export.clone();
    tokio::task::spawn_blocking(move || {
        let a = MountProc::start(&addr, &fp, &tok);
        let rw = |n: &str| std::fs::OpenOptions::new().read(true).write(true).open(a.mnt.join(n)).expect("open rw");
        // no passthrough reader: the mapping works and its bytes reach the server
        let f = rw("m1");
        let p = map_shared(&f, 8192).expect("shared writable mmap");
        // SAFETY: p maps 8192 bytes of f.
        unsafe {
            std::ptr::copy_nonoverlapping(b"mapped".as_ptr(), p, 6);
            libc::msync(p.cast(), 8192, libc::MS_SYNC);
            libc::munmap(p.cast(), 8192);
        }
        drop(f);
        izo_out(&["sync".as_ref(), a.mnt.as_os_str()]);
        let got = std::fs::read(ex.join("m1")).expect("server copy");
        assert_eq!(&got[..8], b"mapped..", "the mapped write on the server");
        // a passthrough reader is open: the writer is passthrough too, its
        // mapping is the cache file's, the reader sees its bytes at once, and
        // the server gets them once the writer closes
        let opens = served(&a.mnt, "passthrough_opens");
        let reader = std::fs::File::open(a.mnt.join("m2")).expect("open ro");
        assert_eq!(served(&a.mnt, "passthrough_opens"), opens + 1, "the reader is a passthrough open");
        let f = rw("m2");
        assert_eq!(served(&a.mnt, "passthrough_opens"), opens + 2, "the writer too");
        let p = map_shared(&f, 8192).expect("shared writable mmap beside a passthrough reader");
        // SAFETY: p maps 8192 bytes of f.
        unsafe {
            std::ptr::copy_nonoverlapping(b"shared".as_ptr(), p.add(100), 6);
            libc::msync(p.cast(), 8192, libc::MS_SYNC);
            libc::munmap(p.cast(), 8192);
        }
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"direct", 0).expect("write");
        f.write_all_at(b"grown", 8192).expect("write past the end");
        let mut buf = [0u8; 6];
        reader.read_exact_at(&mut buf, 0).expect("read");
        assert_eq!(&buf, b"direct", "the reader sees the writer's bytes");
        assert_eq!(std::fs::metadata(a.mnt.join("m2")).expect("stat").len(), 8197, "stat sees the new size");
        drop(f);
        drop(reader);
        izo_out(&["sync".as_ref(), a.mnt.as_os_str()]);
        let got = std::fs::read(ex.join("m2")).expect("server copy");
        assert_eq!(got.len(), 8197);
        assert_eq!((&got[..6], &got[100..106], &got[8192..]), (&b"direct"[..], &b"shared"[..], &b"grown"[..]));
        // readers gone: a new writable open goes through the daemon again
        let w = served(&a.mnt, "write");
        let f = rw("m2");
        f.write_all_at(b"again", 0).expect("write");
        assert!(served(&a.mnt, "write") > w, "a writer without passthrough readers goes through the daemon");
        let p = map_shared(&f, 8192).expect("mmap after the readers closed");
        // SAFETY: p maps 8192 bytes of f.
        unsafe { libc::munmap(p.cast(), 8192) };
    })
    .await
    .expect("mmap test");
}
