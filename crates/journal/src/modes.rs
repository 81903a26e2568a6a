//! Which mode bits an untrusted volume keeps.

/// `mode` without the set-id bits an untrusted volume does not keep: both
/// for files, only setuid for a directory (its setgid just passes a group
/// on). A trusted volume keeps them all.
pub fn set_id_stripped(mode: u32, dir: bool, trusted: bool) -> u32 {
    match (trusted, dir) {
        (true, _) => mode,
        (false, true) => mode & !0o4000,
        (false, false) => mode & !0o6000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untrusted_volume_keeps_only_a_directorys_setgid() {
        assert_eq!(set_id_stripped(0o6755, false, false), 0o755);
        assert_eq!(set_id_stripped(0o6755, true, false), 0o2755);
        assert_eq!(set_id_stripped(0o6755, false, true), 0o6755);
    }
}
