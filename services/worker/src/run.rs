//! Execute: run a Command in its exec dir, in its own process group, under its timeout.

use crate::JobError;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_messages::ErrorCode;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub exit_code: i32,
    pub timed_out: bool,
    pub cancelled: bool,
    pub elapsed: Duration,
}

/// A path an action names (working directory, output): relative, without `..`, `.` only as a
/// whole. Returns it as a relative `PathBuf`.
pub fn relative_path(p: &str, what: &str) -> Result<PathBuf, JobError> {
    let path = Path::new(p);
    let bad = |why: &str| {
        JobError::action(
            ErrorCode::InvalidArgument,
            format!("{what} {p:?} {why}; it must stay inside the exec root"),
        )
    };
    if path.is_absolute() {
        return Err(bad("is absolute"));
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => return Err(bad("contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(bad("is absolute")),
        }
    }
    Ok(out)
}

/// `nice(1)`, through which actions run at a lower CPU priority.
fn nice_program() -> Option<&'static Path> {
    ["/usr/bin/nice", "/bin/nice"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
}

/// Runs `command` with `exec_root` as the root, writing stdout and stderr to the given files.
/// With `nice > 0` the action runs that much below the worker's CPU priority (through
/// `nice(1)`, so every process it forks inherits it): a busy worker keeps serving its CAS shard
/// and the platform's requests promptly instead of queueing them behind compilers.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    command: &re::Command,
    nice: i32,
    exec_root: &Path,
    stdout: &Path,
    stderr: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<RunOutcome, JobError> {
    let Some(program) = command.arguments.first() else {
        return Err(JobError::action(
            ErrorCode::InvalidArgument,
            "the command has no arguments",
        ));
    };
    let workdir = exec_root.join(relative_path(
        &command.working_directory,
        "working directory",
    )?);
    // A program named by a relative path with a slash is relative to the working directory.
    let program = if program.contains('/') && !program.starts_with('/') {
        workdir.join(program).into_os_string()
    } else {
        program.into()
    };
    let out = std::fs::File::create(stdout)
        .map_err(|e| JobError::infra(format!("create stdout file: {e}")))?;
    let err = std::fs::File::create(stderr)
        .map_err(|e| JobError::infra(format!("create stderr file: {e}")))?;
    let mut cmd = match nice_program().filter(|_| nice > 0) {
        Some(n) => {
            let mut c = tokio::process::Command::new(n);
            c.arg("-n").arg(nice.to_string()).arg("--").arg(&program);
            c
        }
        None => tokio::process::Command::new(&program),
    };
    cmd.args(&command.arguments[1..])
        .env_clear()
        .envs(
            command
                .environment_variables
                .iter()
                .map(|v| (&v.name, &v.value)),
        )
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            // The action's own fault (a missing or non-executable program): report it as a
            // failed run, the way a shell would, with the reason on stderr.
            let msg = format!("motorpool: cannot run {program:?}: {e}\n");
            let _ = std::fs::write(stderr, msg);
            return Ok(RunOutcome {
                exit_code: 127,
                timed_out: false,
                cancelled: false,
                elapsed: start.elapsed(),
            });
        }
    };
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let kill_group = || {
        if let Some(pg) = pgid {
            let _ = killpg(pg, Signal::SIGKILL);
        }
    };
    let (status, timed_out, cancelled) = tokio::select! {
        s = child.wait() => (s, false, false),
        _ = tokio::time::sleep(timeout) => {
            kill_group();
            (child.wait().await, true, false)
        }
        _ = cancel.cancelled() => {
            kill_group();
            (child.wait().await, false, true)
        }
    };
    // Whatever the action left running in the background goes too.
    kill_group();
    let status = status.map_err(|e| JobError::infra(format!("wait for the action: {e}")))?;
    let exit_code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    Ok(RunOutcome {
        exit_code,
        timed_out,
        cancelled,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(args: &[&str]) -> re::Command {
        re::Command {
            arguments: args.iter().map(|s| s.to_string()).collect(),
            environment_variables: vec![re::command::EnvironmentVariable {
                name: "GREETING".into(),
                value: "hi".into(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn paths_must_stay_inside() {
        assert_eq!(relative_path("a/./b", "x").unwrap(), PathBuf::from("a/b"));
        assert_eq!(relative_path("", "x").unwrap(), PathBuf::new());
        for bad in ["/etc/passwd", "../x", "a/../../b"] {
            let e = relative_path(bad, "output").unwrap_err();
            assert!(e.to_string().contains("exec root"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn runs_with_its_environment_and_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let (o, e) = (dir.path().join("out"), dir.path().join("err"));
        let c = command(&["/bin/sh", "-c", "echo $GREETING; echo oops >&2; exit 3"]);
        let r = run(
            &c,
            0,
            &root,
            &o,
            &e,
            Duration::from_secs(10),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(r.exit_code, 3);
        assert!(!r.timed_out);
        assert_eq!(std::fs::read_to_string(o).unwrap(), "hi\n");
        assert_eq!(std::fs::read_to_string(e).unwrap(), "oops\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let marker = dir.path().join("survivor");
        let (o, e) = (dir.path().join("out"), dir.path().join("err"));
        // A background grandchild that would write the marker after the timeout.
        let script = format!("(sleep 1; touch {}) & sleep 30", marker.display());
        let c = command(&["/bin/sh", "-c", &script]);
        let r = run(
            &c,
            0,
            &root,
            &o,
            &e,
            Duration::from_millis(200),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert!(r.timed_out);
        assert!(r.elapsed < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            !marker.exists(),
            "a process of the group survived the timeout"
        );
    }

    #[tokio::test]
    async fn a_missing_program_is_a_failed_run() {
        let dir = tempfile::tempdir().unwrap();
        let (o, e) = (dir.path().join("out"), dir.path().join("err"));
        // Run directly and through nice(1) alike: exit 127, the program named on stderr.
        for nice in [0, 7] {
            let c = command(&["bin/nope"]);
            let r = run(
                &c,
                nice,
                dir.path(),
                &o,
                &e,
                Duration::from_secs(5),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
            assert_eq!(r.exit_code, 127, "nice {nice}");
            assert!(std::fs::read_to_string(&e).unwrap().contains("bin/nope"));
        }
    }

    #[tokio::test]
    async fn actions_run_below_the_workers_priority_and_keep_their_exit_codes() {
        let dir = tempfile::tempdir().unwrap();
        let (o, e) = (dir.path().join("out"), dir.path().join("err"));
        let own: i32 =
            String::from_utf8(std::process::Command::new("nice").output().unwrap().stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
        let c = command(&["/bin/sh", "-c", "nice; exit 4"]);
        let r = run(
            &c,
            7,
            dir.path(),
            &o,
            &e,
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(r.exit_code, 4);
        let got: i32 = std::fs::read_to_string(&o).unwrap().trim().parse().unwrap();
        assert_eq!(got, (own + 7).min(19));
    }
}
