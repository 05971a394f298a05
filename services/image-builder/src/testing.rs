//! Fixtures for tests of the builder and of what uses it: a base image made locally from
//! Debian's static busybox (no registry), and a git repository with a Dockerfile.

use crate::BuildRequest;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The test base image's tag.
pub const BASE: &str = "motorpool-test-base:busybox";

/// Runs a command to success; its stdout (a failure panics with its stderr).
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when the local Docker engine has the image `tag`.
pub fn have_image(tag: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", tag])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Makes [`BASE`] with `docker import` of a tiny root holding busybox, unless it exists.
pub fn base_image(work: &Path) {
    if have_image(BASE) {
        return;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is required (scripts/setup --test installs it)");
    let root = work.join("base");
    for d in ["bin", "etc", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    let tar = work.join("base.tar");
    sh(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    sh(Command::new("docker").arg("import").arg(&tar).arg(BASE));
}

/// Runs git in `repo` with a fixed author, committer and date.
pub fn git(repo: &Path, args: &[&str]) -> String {
    sh(Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "user.name=ci", "-c", "user.email=ci@example.invalid"])
        .args(args)
        .env("GIT_AUTHOR_DATE", "2026-11-01T12:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-11-01T12:00:00Z"))
}

/// A repository with `images/av/Dockerfile` (a fake kernel and initrd, a release file from the
/// `FLAVOR` build argument, `stack.txt` copied in), committed on `main`.
pub fn sample_repo(work: &Path) -> PathBuf {
    let repo = work.join("repo");
    std::fs::create_dir_all(repo.join("images/av")).unwrap();
    std::fs::write(
        repo.join("images/av/Dockerfile"),
        format!(
            "FROM {BASE}\n\
             RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
             ARG FLAVOR=dev\n\
             RUN mkdir -p /boot /opt/av && echo \"flavor=$FLAVOR\" > /etc/motorpool-release \\\n\
             \x20   && echo kernel > /boot/vmlinuz-6.1.0-av && echo initrd > /boot/initrd.img-6.1.0-av\n\
             COPY stack.txt /opt/av/stack.txt\n"
        ),
    )
    .unwrap();
    std::fs::write(repo.join("images/av/stack.txt"), "planner v1\n").unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "v1"]);
    repo
}

/// A build of [`sample_repo`]'s image, on `main`, into channel `stable`.
pub fn sample_request(repo: &Path) -> BuildRequest {
    BuildRequest {
        repo: repo.display().to_string(),
        git_ref: "main".into(),
        dockerfile: "images/av/Dockerfile".into(),
        context: "images/av".into(),
        build_args: vec![],
        channel: "stable".into(),
        image_id: None,
    }
}
