//! Which extended attributes replicate, and what a valid value is. Every
//! check the kernel would make at apply time is made here first (an acked
//! record that fails to apply would stop the volume), by the server before
//! it records a change and by the client before it makes one locally.

use crate::op::{FileKind, OpError};

/// POSIX ACL xattrs (validated binary values).
const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

/// Check an xattr name and value for an object of `kind`.
/// `trusted` (a volume marked trusted) also admits `trusted.*` and a valid
/// `security.capability`; other `security.*` belong to the local LSM.
pub fn check(name: &[u8], value: Option<&[u8]>, kind: FileKind, trusted: bool) -> Result<(), OpError> {
    let bad = |why: &str| Err(OpError::Invalid(format!("xattr {:?}: {why}", String::from_utf8_lossy(name))));
    if name.len() > 255 || name.contains(&0) {
        return bad("names are 1–255 bytes without NUL");
    }
    if value.is_some_and(|v| v.len() > 65536) {
        return bad("values are at most 64 KiB");
    }
    if !matches!(kind, FileKind::File | FileKind::Dir) {
        return bad("only files and directories carry extended attributes");
    }
    if let Some(rest) = name.strip_prefix(b"user.") {
        return if rest.is_empty() { bad("empty name after user.") } else { Ok(()) };
    }
    if name == ACL_ACCESS || name == ACL_DEFAULT {
        if name == ACL_DEFAULT && kind != FileKind::Dir {
            return bad("default ACLs exist only on directories");
        }
        return match value {
            Some(v) if !acl_valid(v) => bad("not a valid POSIX ACL"),
            _ => Ok(()),
        };
    }
    if trusted {
        if let Some(rest) = name.strip_prefix(b"trusted.") {
            return if rest.is_empty() { bad("empty name after trusted.") } else { Ok(()) };
        }
        if name == b"security.capability" {
            return match value {
                Some(v) if !capability_valid(v) => bad("not a valid file capability"),
                _ if kind != FileKind::File => bad("capabilities exist only on regular files"),
                _ => Ok(()),
            };
        }
    }
    Err(OpError::Unsupported(format!(
        "xattr {:?}: only user.* and POSIX ACL attributes replicate (and trusted.*, security.capability on \
         trusted volumes)",
        String::from_utf8_lossy(name)
    )))
}

/// Bytes the extended attributes of one inode take with `name` set to a
/// value of `len` bytes: `others` are the (name, value length) of every
/// name it has (`name` itself, if among them, is counted once, new).
pub fn room_taken<'a>(others: impl IntoIterator<Item = (&'a [u8], usize)>, name: &[u8], len: usize) -> u64 {
    let one = |n: usize, v: usize| (n + v + 24) as u64;
    others.into_iter().filter(|(n, _)| *n != name).map(|(n, v)| one(n.len(), v)).sum::<u64>() + one(name.len(), len)
}

/// Do attributes taking `taken` bytes fit in the `room` one inode of the
/// export has (`of`: the object, for the message)? The kernel would refuse
/// at apply otherwise.
pub fn fits(taken: u64, room: u64, of: impl std::fmt::Display) -> Result<(), OpError> {
    if taken > room {
        return Err(OpError::XattrRoom(format!(
            "extended attributes of {of} would take {taken} bytes; the export holds {room} per file"
        )));
    }
    Ok(())
}

/// A `vfs_cap_data` the kernel takes: revision 2 (20 bytes) or 3 (24 bytes,
/// with a root id), magic in the high byte of the first word.
fn capability_valid(v: &[u8]) -> bool {
    let Some(word) = v.get(0..4) else { return false };
    let magic = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) & 0xFF00_0000;
    matches!((magic, v.len()), (0x0200_0000, 20) | (0x0300_0000, 24))
}

/// Is `name` the access ACL (which mirrors the mode bits)?
pub fn is_access_acl(name: &[u8]) -> bool {
    name == ACL_ACCESS
}

/// The mode bits an access ACL implies (as the kernel sets them when the
/// ACL is written): owner from USER_OBJ, group from MASK or else GROUP_OBJ,
/// other from OTHER.
pub fn acl_mode(v: &[u8]) -> u32 {
    let mut perms = [0u32; 4]; // user_obj, group_obj, mask, other
    let mut has_mask = false;
    for e in v.get(4..).unwrap_or(&[]).chunks_exact(8) {
        let perm = u16::from_le_bytes([e[2], e[3]]) as u32 & 7;
        match u16::from_le_bytes([e[0], e[1]]) {
            0x01 => perms[0] = perm,
            0x04 => perms[1] = perm,
            0x10 => {
                perms[2] = perm;
                has_mask = true;
            }
            0x20 => perms[3] = perm,
            _ => {}
        }
    }
    let group = if has_mask { perms[2] } else { perms[1] };
    (perms[0] << 6) | (group << 3) | perms[3]
}

/// The access ACL after a chmod to `mode` (the kernel's `posix_acl_chmod`).
pub fn acl_chmod(v: &[u8], mode: u32) -> Vec<u8> {
    let mut out = v.to_vec();
    let has_mask = v.get(4..).unwrap_or(&[]).chunks_exact(8).any(|e| u16::from_le_bytes([e[0], e[1]]) == 0x10);
    for e in out.get_mut(4..).map(|s| s.chunks_exact_mut(8)).into_iter().flatten() {
        let perm = match u16::from_le_bytes([e[0], e[1]]) {
            0x01 => (mode >> 6) & 7,
            0x04 if !has_mask => (mode >> 3) & 7,
            0x10 => (mode >> 3) & 7,
            0x20 => mode & 7,
            _ => continue,
        };
        e[2..4].copy_from_slice(&(perm as u16).to_le_bytes());
    }
    out
}

/// The kernel's `posix_acl_valid` on the xattr encoding: version 2, then
/// (tag u16, perm u16, id u32) little-endian entries, sorted by tag (and id
/// within USER and GROUP), USER_OBJ, GROUP_OBJ and OTHER once each, and a
/// MASK exactly when named USER or GROUP entries exist.
pub fn acl_valid(v: &[u8]) -> bool {
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) || v[0..4] != 2u32.to_le_bytes() {
        return false;
    }
    let (mut prev_tag, mut prev_id) = (0u16, None::<u32>);
    let mut counts = [0u32; 6];
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let slot = match tag {
            USER_OBJ => 0,
            USER => 1,
            GROUP_OBJ => 2,
            GROUP => 3,
            MASK => 4,
            OTHER => 5,
            _ => return false,
        };
        if perm & !7 != 0 || tag < prev_tag {
            return false;
        }
        if matches!(tag, USER | GROUP) {
            if tag == prev_tag && prev_id.is_some_and(|p| id <= p) {
                return false;
            }
            prev_id = Some(id);
        } else {
            prev_id = None;
        }
        prev_tag = tag;
        counts[slot] += 1;
    }
    let named = counts[1] + counts[3] > 0;
    counts[0] == 1 && counts[2] == 1 && counts[5] == 1 && counts[4] <= 1 && (!named || counts[4] == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (t, p, i) in entries {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&i.to_le_bytes());
        }
        v
    }

    #[test]
    fn acls_are_checked_like_the_kernel_does() {
        let minimal = acl(&[(1, 6, u32::MAX), (4, 4, u32::MAX), (0x20, 4, u32::MAX)]);
        assert!(acl_valid(&minimal));
        let named = acl(&[(1, 6, 0), (2, 6, 1000), (4, 4, 0), (0x10, 6, 0), (0x20, 4, 0)]);
        assert!(acl_valid(&named));
        let no_mask = acl(&[(1, 6, 0), (2, 6, 1000), (4, 4, 0), (0x20, 4, 0)]);
        assert!(!acl_valid(&no_mask));
        let unsorted = acl(&[(4, 4, 0), (1, 6, 0), (0x20, 4, 0)]);
        assert!(!acl_valid(&unsorted));
        assert!(!acl_valid(b"garbage"));
        assert!(check(b"user.", Some(b"x"), FileKind::File, false).is_err());
        assert!(check(b"user.k", Some(b"x"), FileKind::Symlink, false).is_err());
        assert!(check(b"security.selinux", Some(b"x"), FileKind::File, true).is_err());
        assert!(check(b"trusted.x", Some(b"x"), FileKind::File, false).is_err());
        assert!(check(b"trusted.x", Some(b"x"), FileKind::File, true).is_ok());
        assert!(check(b"security.capability", Some(b"x"), FileKind::File, true).is_err());
        let mut cap = 0x0200_0000u32.to_le_bytes().to_vec();
        cap.resize(20, 0);
        assert!(check(b"security.capability", Some(&cap), FileKind::File, true).is_ok());
        assert!(check(b"security.capability", Some(&cap), FileKind::File, false).is_err());
        assert!(check(b"system.posix_acl_default", Some(&minimal), FileKind::File, false).is_err());
        assert!(check(b"system.posix_acl_access", Some(&minimal), FileKind::File, false).is_ok());
        assert_eq!(acl_mode(&named), 0o664, "the mask gives the group bits");
        assert_eq!(acl_mode(&acl_chmod(&named, 0o750)), 0o750);
        assert_eq!(acl_mode(&acl_chmod(&minimal, 0o741)), 0o741);
    }
}
