//! Rename: replace, NOREPLACE and EXCHANGE, with the precondition on the
//! source and the target, the cycle check, and link counts.

use super::*;

impl Batch<'_> {
    pub(super) fn rename(
        &mut self,
        cx: &Cx,
        (p, n): (ObjectId, &[u8]),
        expect: &Expect,
        (np, nn): (ObjectId, &[u8]),
        target: Option<&Expect>,
        mode: RenameMode,
    ) -> R<Out> {
        rules::name(n)?;
        rules::name(nn)?;
        rules::parent_dir(self, p)?;
        rules::parent_dir(self, np)?;
        let Some(src) = self.dentry(p, n)? else {
            return Err(conflict(ConflictKind::NameGone, None));
        };
        let srow = self.row(src)?;
        if src != expect.id {
            return Err(conflict(ConflictKind::NameMoved, Some(srow.attr(src))));
        }
        let existing = self.dentry(np, nn)?;
        rules::rename_target(self, mode, existing)?;
        let trow = match (existing, target) {
            (None, None) => None,
            (None, Some(_)) => return Err(conflict(ConflictKind::TargetGone, None)),
            (Some(t), None) => {
                let cur = self.row(t).ok().map(|r| r.attr(t));
                return Err(conflict(ConflictKind::TargetAppeared, cur));
            }
            (Some(_), Some(e)) => Some(self.check_expect(cx, np, nn, e)?),
        };
        let src_dir = srow.kind == FileKind::Dir;
        rules::rename_cycle(self, src, (p, np), existing, mode)?;
        let case = rules::rename_case(self, src, existing, mode, nn)?;
        let mut handles = vec![(p, self.row(p)?.handle), (np, self.row(np)?.handle), (src, srow.handle.clone())];
        let same = case == rules::RenameCase::Same;
        if let (Some(t), Some(trow)) = (existing, &trow) {
            handles.push((t, trow.handle.clone()));
        }
        let mut dl_src = 0i32;
        let mut dl_dst = 0i32;
        if same {
            // rename(2) between two names of one inode does nothing.
        } else if mode == RenameMode::Exchange {
            let (t, trow) = (existing.unwrap_or(src), trow.as_ref().unwrap_or(&srow));
            self.drop_name(p, n, src)?;
            self.drop_name(np, nn, t)?;
            self.add_name(p, n, t)?;
            self.add_name(np, nn, src)?;
            let t_dir = trow.kind == FileKind::Dir;
            if p != np {
                dl_src += t_dir as i32 - src_dir as i32;
                dl_dst += src_dir as i32 - t_dir as i32;
            }
        } else {
            if let (Some(t), Some(trow)) = (existing, trow.as_ref()) {
                self.drop_name(np, nn, t)?;
                if trow.kind == FileKind::Dir {
                    dl_dst -= 1;
                    self.remove_object(t)?;
                } else if trow.nlink <= 1 {
                    self.remove_object(t)?;
                } else {
                    let mut tr = trow.clone();
                    tr.nlink -= 1;
                    self.put_row(t, &tr)?;
                }
            }
            self.drop_name(p, n, src)?;
            self.add_name(np, nn, src)?;
            if src_dir {
                dl_src -= 1;
                dl_dst += 1;
            }
        }
        if p == np {
            self.touch_dir(cx, p, dl_src + dl_dst)?;
        } else {
            self.touch_dir(cx, p, dl_src)?;
            self.touch_dir(cx, np, dl_dst)?;
        }
        Ok((Some(self.row(src)?.attr(src)), handles))
    }
}
