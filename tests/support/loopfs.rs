#![allow(clippy::unwrap_used)]
//! A small ext4 file system on a loop device per test, which the test can
//! freeze (`fsfreeze -f`) to stall every write and fsync on it: the spool's
//! slow-disk paths. tmpfs cannot be frozen, and the machine's own disk must
//! never be.
//!
//! Mounting needs root (CI runs as root); without it [`LoopFs::mount`]
//! panics rather than skipping. Dropping it thaws and unmounts; a reaper
//! outside the test's process group does the same if the test process dies
//! without unwinding (a frozen file system left behind would hang whoever
//! touches it next).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::rabbit_node::Reaper;

pub struct LoopFs {
    dir: PathBuf,
    image: PathBuf,
    reaper: Option<Reaper>,
}

fn run(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed (LoopFs needs root, mkfs.ext4 and loop devices): {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl LoopFs {
    /// Makes an ext4 image of `size_mib` MiB and mounts it on a fresh
    /// temporary directory.
    pub fn mount(size_mib: u64) -> LoopFs {
        let base = std::env::temp_dir().join(super::unique("st-loopfs"));
        let dir = base.with_extension("mnt");
        let image = base.with_extension("img");
        std::fs::create_dir(&dir).unwrap();
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(size_mib * 1024 * 1024).unwrap();
        drop(file);
        run(
            "mkfs.ext4",
            Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image),
        );
        run(
            "mount -o loop",
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&dir),
        );
        let reaper = Reaper::spawn(&format!(
            // A test process stuck exiting shows as a zombie, which
            // `kill -0` still finds: look at its state instead.
            "while [ -d /proc/{test} ] && ! grep -q '^State:.*Z' /proc/{test}/status; do sleep 1; done\n\
             fsfreeze -u '{dir}' 2>/dev/null\n\
             umount '{dir}' 2>/dev/null || umount -l '{dir}'\n\
             rmdir '{dir}'; rm -f '{image}'\n",
            test = std::process::id(),
            dir = dir.display(),
            image = image.display(),
        ));
        LoopFs {
            dir,
            image,
            reaper: Some(reaper),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Stalls every write and fsync on the file system until the guard is
    /// thawed or dropped. Declared after the app, the guard is dropped
    /// first when an assertion fails: a process cannot exit while one of its
    /// threads waits on a frozen file system.
    pub fn freeze(&self) -> Frozen<'_> {
        run(
            "fsfreeze -f",
            Command::new("fsfreeze").arg("-f").arg(&self.dir),
        );
        Frozen(Some(self))
    }
}

/// A frozen [`LoopFs`]; thaws on drop.
pub struct Frozen<'a>(Option<&'a LoopFs>);

impl Frozen<'_> {
    pub fn thaw(mut self) {
        if let Some(fs) = self.0.take() {
            run(
                "fsfreeze -u",
                Command::new("fsfreeze").arg("-u").arg(&fs.dir),
            );
        }
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Some(fs) = self.0.take() {
            let _ = Command::new("fsfreeze").arg("-u").arg(&fs.dir).output();
        }
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze").arg("-u").arg(&self.dir).output();
        super::tmpfs::unmount(&self.dir);
        let _ = std::fs::remove_file(&self.image);
        self.reaper.take();
    }
}
