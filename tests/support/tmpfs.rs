#![allow(clippy::unwrap_used)]
//! A small tmpfs per test that really runs out of space (ENOSPC), for the
//! spool's disk-full paths. A full temp directory on the machine's disk
//! would need gigabytes and would fill it for everyone else too.
//!
//! Mounting needs root (or CAP_SYS_ADMIN); without it [`SmallFs::mount`]
//! panics rather than skipping. The mount goes away on drop, and a reaper
//! outside the test's process group unmounts it if the test process dies
//! without unwinding.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::rabbit_node::Reaper;

const FILLER: &str = ".filler";

pub struct SmallFs {
    dir: PathBuf,
    reaper: Option<Reaper>,
}

impl SmallFs {
    /// Mounts a tmpfs of `size_kib` KiB on a fresh temporary directory.
    pub fn mount(size_kib: u64) -> SmallFs {
        let dir = std::env::temp_dir().join(super::unique("st-smallfs"));
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_kib}k"),
                "st-smallfs",
            ])
            .arg(&dir)
            .output()
            .expect("mount runs");
        if !out.status.success() {
            let _ = std::fs::remove_dir(&dir);
            panic!(
                "cannot mount a {size_kib} KiB tmpfs on {}: {} \
                 (SmallFs needs root or CAP_SYS_ADMIN; running as uid {})",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim(),
                current_uid()
            );
        }
        let reaper = Reaper::spawn(&format!(
            "while kill -0 {test} 2>/dev/null; do sleep 1; done\n\
             umount '{dir}' 2>/dev/null || umount -l '{dir}'\n\
             rmdir '{dir}'\n",
            test = std::process::id(),
            dir = dir.display(),
        ));
        SmallFs {
            dir,
            reaper: Some(reaper),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes a filler file until the file system answers ENOSPC, and
    /// returns its path. Afterwards a write of even one byte to a new file
    /// fails: tmpfs hands out whole pages and none is left.
    pub fn fill(&self) -> PathBuf {
        let path = self.dir.join(FILLER);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let chunk = vec![0xa5_u8; 64 * 1024];
        loop {
            // `write`, not `write_all`: the last write is short, the next
            // one fails, and that failure must be ENOSPC.
            match file.write(&chunk) {
                Ok(0) => panic!("{} accepted no bytes without ENOSPC", path.display()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
        path
    }

    /// Deletes the filler, giving the space back.
    pub fn free(&self) {
        match std::fs::remove_file(self.dir.join(FILLER)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("removing the filler in {}: {e}", self.dir.display()),
        }
    }
}

/// Unmounts `dir` and removes it (shared with [`super::loopfs`]).
pub(super) fn unmount(dir: &Path) {
    let unmounted = Command::new("umount")
        .arg(dir)
        .output()
        .is_ok_and(|o| o.status.success());
    if !unmounted {
        // Busy (a file still open somewhere): detach it now, the
        // kernel frees it when the last user goes.
        let _ = Command::new("umount").arg("-l").arg(dir).status();
    }
    let _ = std::fs::remove_dir(dir);
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        unmount(&self.dir);
        // Nothing is left for the reaper to do.
        self.reaper.take();
    }
}

fn current_uid() -> String {
    Command::new("id").arg("-u").output().map_or_else(
        |_| "?".into(),
        |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
    )
}
