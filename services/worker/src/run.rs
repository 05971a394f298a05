//! Execute: run a Command in its exec dir, in the sandbox (or, where it is off, in its own
//! process group), under its timeout, with stdout and stderr kept up to their limit.

use crate::JobError;
use crate::sandbox::{Limits, Sandbox, append_note};
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_messages::ErrorCode;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub exit_code: i32,
    pub timed_out: bool,
    pub cancelled: bool,
    /// The kernel killed a process of the action for going over its memory limit.
    pub oom_killed: bool,
    pub elapsed: Duration,
}

/// One action to run.
pub struct RunSpec<'a> {
    pub command: &'a re::Command,
    pub exec_root: &'a Path,
    /// Where the worker writes the action's stdout and stderr (outside the exec root).
    pub stdout: &'a Path,
    pub stderr: &'a Path,
    pub timeout: Duration,
    /// How far below the worker's CPU priority the action runs.
    pub nice: i32,
    /// Bytes kept of each of stdout and stderr.
    pub max_stream_bytes: u64,
    /// The sandbox, the action's limits and a name for its cgroup; `None` runs it unsandboxed.
    pub sandbox: Option<(&'a Sandbox, &'a Limits, &'a str)>,
    /// The largest file a sandboxed action may write.
    pub max_file_bytes: u64,
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

/// `nice(1)`, through which unsandboxed actions run at a lower CPU priority.
fn nice_program() -> Option<&'static Path> {
    ["/usr/bin/nice", "/bin/nice"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
}

/// Copies an action's stream into its file, keeping at most `cap` bytes and reading (and
/// dropping) the rest, so that neither memory nor the disk holds more than the cap. Returns the
/// bytes dropped.
async fn keep_stream(
    mut from: impl AsyncRead + Unpin,
    to: std::fs::File,
    cap: u64,
) -> std::io::Result<u64> {
    let mut to = tokio::fs::File::from_std(to);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut kept, mut dropped) = (0u64, 0u64);
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        let keep = (cap - kept).min(n as u64) as usize;
        if keep > 0 {
            to.write_all(&buf[..keep]).await?;
            kept += keep as u64;
        }
        dropped += (n - keep) as u64;
    }
    to.flush().await?;
    Ok(dropped)
}

/// Runs the action: in the sandbox when one is given (its own namespaces, user and cgroup; see
/// [`crate::sandbox`]), else as the worker's user in a process group of its own, `nice`d by
/// `spec.nice` through `nice(1)` so that every process it forks inherits it. Either way a busy
/// worker keeps serving its CAS shard and the platform's requests promptly instead of queueing
/// them behind compilers, and nothing the action started outlives it.
pub async fn run(spec: &RunSpec<'_>, cancel: &CancellationToken) -> Result<RunOutcome, JobError> {
    let command = spec.command;
    let Some(program) = command.arguments.first() else {
        return Err(JobError::action(
            ErrorCode::InvalidArgument,
            "the command has no arguments",
        ));
    };
    let workdir = spec.exec_root.join(relative_path(
        &command.working_directory,
        "working directory",
    )?);
    // A program named by a relative path with a slash is relative to the working directory.
    let program: OsString = if program.contains('/') && !program.starts_with('/') {
        workdir.join(program).into_os_string()
    } else {
        program.into()
    };
    let out = std::fs::File::create(spec.stdout)
        .map_err(|e| JobError::infra(format!("create stdout file: {e}")))?;
    let err = std::fs::File::create(spec.stderr)
        .map_err(|e| JobError::infra(format!("create stderr file: {e}")))?;
    let args = &command.arguments[1..];
    let mut cgroup = None;
    let mut cmd = match spec.sandbox {
        Some((sandbox, limits, name)) => {
            let cg = sandbox
                .cgroup(name, limits)
                .map_err(|e| JobError::infra(format!("make the action's cgroup: {e}")))?;
            let prepared = cg
                .prepare(sandbox.owner(), spec.nice, spec.max_file_bytes)
                .map_err(|e| JobError::infra(format!("open the action's cgroup: {e}")))?;
            let mut c = sandbox.command(spec.exec_root, &workdir, &program, args, limits);
            prepared.apply(&mut c);
            cgroup = Some(cg);
            c
        }
        None => match nice_program().filter(|_| spec.nice > 0) {
            Some(n) => {
                let mut c = tokio::process::Command::new(n);
                c.arg("-n")
                    .arg(spec.nice.to_string())
                    .arg("--")
                    .arg(&program)
                    .args(args);
                c
            }
            None => {
                let mut c = tokio::process::Command::new(&program);
                c.args(args);
                c
            }
        },
    };
    cmd.env_clear()
        .envs(
            command
                .environment_variables
                .iter()
                .map(|v| (&v.name, &v.value)),
        )
        .current_dir(&workdir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let start = Instant::now();
    let spawned = cmd.spawn();
    drop(cmd); // closes the worker's copies of the cgroup files
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            if let Some(cg) = cgroup {
                let _ = tokio::task::spawn_blocking(move || cg.remove()).await;
            }
            if spec.sandbox.is_some() {
                return Err(JobError::infra(format!("start the sandbox: {e}")));
            }
            // The action's own fault (a missing or non-executable program): report it as a
            // failed run, the way a shell would, with the reason on stderr.
            let msg = format!("motorpool: cannot run {program:?}: {e}\n");
            let _ = std::fs::write(spec.stderr, msg);
            return Ok(RunOutcome {
                exit_code: 127,
                timed_out: false,
                cancelled: false,
                oom_killed: false,
                elapsed: start.elapsed(),
            });
        }
    };
    let cap = spec.max_stream_bytes;
    let streams = [
        tokio::spawn(keep_stream(child.stdout.take().expect("piped"), out, cap)),
        tokio::spawn(keep_stream(child.stderr.take().expect("piped"), err, cap)),
    ];
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let kill_all = || {
        if let Some(pg) = pgid {
            let _ = killpg(pg, Signal::SIGKILL);
        }
        if let Some(cg) = &cgroup {
            cg.kill();
        }
    };
    let (status, timed_out, cancelled) = tokio::select! {
        s = child.wait() => (s, false, false),
        _ = tokio::time::sleep(spec.timeout) => {
            kill_all();
            (child.wait().await, true, false)
        }
        _ = cancel.cancelled() => {
            kill_all();
            (child.wait().await, false, true)
        }
    };
    // Whatever the action left running in the background goes too.
    kill_all();
    // The cgroup goes now, before anything below can fail: what it said about memory is read
    // first, and whether it could be removed is reported last.
    let (oom, removed) = match cgroup {
        Some(cg) => {
            let oom = cg.oom_killed().then(|| cg.memory_bytes());
            let removed = tokio::task::spawn_blocking(move || cg.remove())
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            (oom, removed)
        }
        None => (None, Ok(())),
    };
    let status = status.map_err(|e| JobError::infra(format!("wait for the action: {e}")))?;
    let mut exit_code = status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        128 + status.signal().unwrap_or(0)
    });
    // The streams end when the last process holding them does; one that escaped the process
    // group (only possible unsandboxed) is not waited for.
    let mut dropped = [0u64; 2];
    for (i, s) in streams.into_iter().enumerate() {
        let abort = s.abort_handle();
        match tokio::time::timeout(Duration::from_secs(2), s).await {
            Ok(Ok(Ok(n))) => dropped[i] = n,
            Ok(Ok(Err(e))) => {
                return Err(JobError::infra(format!("keep the action's output: {e}")));
            }
            Ok(Err(_)) | Err(_) => abort.abort(),
        }
    }
    for (i, name) in ["stdout", "stderr"].into_iter().enumerate() {
        if dropped[i] > 0 {
            append_note(
                spec.stderr,
                &format!(
                    "\nmotorpool: {} more bytes of {name} were dropped: the worker keeps {cap} bytes of each stream\n",
                    dropped[i]
                ),
            );
        }
    }
    if let Some(limit) = oom {
        if exit_code == 0 {
            exit_code = 137;
        }
        append_note(
            spec.stderr,
            &format!(
                "\nmotorpool: the action was killed for using more than its memory limit of {} MiB (ask for more with the platform property memory-mb)\n",
                limit >> 20
            ),
        );
    }
    removed.map_err(|e| JobError::infra(format!("remove the action's cgroup: {e}")))?;
    Ok(RunOutcome {
        exit_code,
        timed_out,
        cancelled,
        oom_killed: oom.is_some(),
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs unsandboxed (the sandbox's own tests are in `tests/sandbox.rs`, which need root).
    async fn run_plain(
        c: &re::Command,
        nice: i32,
        root: &Path,
        o: &Path,
        e: &Path,
        timeout: Duration,
    ) -> RunOutcome {
        let spec = RunSpec {
            command: c,
            exec_root: root,
            stdout: o,
            stderr: e,
            timeout,
            nice,
            max_stream_bytes: 1 << 20,
            sandbox: None,
            max_file_bytes: u64::MAX,
        };
        run(&spec, &CancellationToken::new()).await.unwrap()
    }

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
        let r = run_plain(&c, 0, &root, &o, &e, Duration::from_secs(10)).await;
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
        let r = run_plain(&c, 0, &root, &o, &e, Duration::from_millis(200)).await;
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
            let r = run_plain(&c, nice, dir.path(), &o, &e, Duration::from_secs(5)).await;
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
        let r = run_plain(&c, 7, dir.path(), &o, &e, Duration::from_secs(5)).await;
        assert_eq!(r.exit_code, 4);
        let got: i32 = std::fs::read_to_string(&o).unwrap().trim().parse().unwrap();
        assert_eq!(got, (own + 7).min(19));
    }
}
