//! What a job does in its workspace: make it fit to use (reset, clean when too big), check the
//! commit out with its Git LFS objects, run Bazel. Blocking code: callers run it off the async
//! runtime. Every command's output goes to the job's log.

use motorpool_config::RunnerConfig;
use motorpool_messages::ci::{CiJob, Trigger};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a step failed, and whether running the job again could help.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The platform's fault (git unreachable, Bazel's server died, the remote executor failed):
    /// another attempt may succeed.
    #[error("{0}")]
    Infrastructure(String),
    /// The job's own outcome (a build error, a failing test, a bad flag): final.
    #[error("{0}")]
    Result(String),
}

/// A job's log file, appended to by every step.
pub struct Log {
    pub path: PathBuf,
    file: File,
}

impl Log {
    pub fn open(path: PathBuf) -> std::io::Result<Log> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(Log { path, file })
    }

    pub fn line(&mut self, text: &str) {
        let _ = writeln!(self.file, "{text}");
    }

    fn stdio(&self) -> std::io::Result<(Stdio, Stdio)> {
        Ok((self.file.try_clone()?.into(), self.file.try_clone()?.into()))
    }
}

/// Runs `cmd` with its output in the log; `Err` says what failed.
fn run(log: &mut Log, cmd: &mut Command, what: &str) -> Result<(), String> {
    log.line(&format!("$ {what}"));
    let (out, err) = log.stdio().map_err(|e| e.to_string())?;
    let started = std::time::Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .env("GIT_TERMINAL_PROMPT", "0")
        .status()
        .map_err(|e| format!("{what}: {e}"))?;
    log.line(&format!("  ({:.2} s)", started.elapsed().as_secs_f64()));
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what}: {status}"))
    }
}

fn git(src: &Path) -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(src);
    c
}

/// Bytes a directory takes on disk (allocated blocks; links not followed).
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// Brings the checkout's index up to date once the job is over. Files written in the same
/// second as the index (the checkout, its LFS files) are "racily clean" to git: the next
/// checkout would hash them again, every large LFS file, before it could change anything. A
/// refresh now, seconds later, hashes them once while the job's result is already known, so the
/// next job in this workspace checks out in milliseconds.
pub fn settle(ws: &Path, log: &mut Log) {
    let src = src(ws);
    if src.join(".git").exists() {
        let _ = run(
            log,
            git(&src).args(["update-index", "-q", "--refresh"]),
            "git update-index --refresh",
        );
    }
}

/// The job's platform flags, beside the checkout (outside it: `git clean` keeps it).
const RC: &str = "motorpool.bazelrc";

/// The workspace's checkout and output base.
pub fn src(ws: &Path) -> PathBuf {
    ws.join("src")
}
fn output_base(ws: &Path) -> PathBuf {
    ws.join("output_base")
}

/// Bazel in the workspace, with the same startup options every time (other ones would make
/// Bazel replace the warm server).
///
/// The client runs under `setpriv --pdeathsig KILL`: if this runner dies (even by SIGKILL), its
/// Bazel client dies with it, and the server abandons the command, so a dead runner's build
/// never goes on in a workspace someone else takes next.
fn bazel(config: &RunnerConfig, ws: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--pdeathsig", "KILL", "--"])
        .arg(&config.bazel)
        .current_dir(src(ws))
        .args(&config.bazel_startup_flags)
        .arg(format!("--output_base={}", output_base(ws).display()))
        .arg(format!("--bazelrc={}", ws.join(RC).display()));
    if config.warm_server_idle_secs == 0 {
        c.arg("--batch");
    } else {
        c.arg(format!("--max_idle_secs={}", config.warm_server_idle_secs));
    }
    c
}

/// `bazel shutdown` for the workspace, if its Bazel server may be running.
fn shutdown(config: &RunnerConfig, ws: &Path) -> Option<Command> {
    let running = output_base(ws).join("server").exists() && src(ws).join(".git").exists();
    running.then(|| {
        let mut c = bazel(config, ws);
        c.arg("shutdown");
        c
    })
}

/// Stops the workspace's Bazel server, if one runs, without a job log.
pub fn stop_server(config: &RunnerConfig, ws: &Path) {
    if let Some(mut c) = shutdown(config, ws) {
        let _ = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Stops the workspace's Bazel server, if one runs.
fn shutdown_server(config: &RunnerConfig, ws: &Path, log: &mut Log) {
    if let Some(mut c) = shutdown(config, ws) {
        let _ = run(log, &mut c, "bazel shutdown");
    }
}

/// Removes the workspace whole (its server stopped first) and leaves it empty: cold.
fn afresh(config: &RunnerConfig, ws: &Path, log: &mut Log) -> (bool, u64) {
    shutdown_server(config, ws, log);
    let _ = std::fs::remove_dir_all(ws);
    std::fs::create_dir_all(ws).ok();
    (true, 0)
}

/// Makes a workspace fit to use: a dirty one (its last job did not end cleanly) is reset, one
/// over `max_workspace_bytes` is cleaned, step by step, until it fits. Returns whether the
/// workspace was removed whole (it is cold now) and its size.
pub fn prepare(
    config: &RunnerConfig,
    ws: &Path,
    dirty: bool,
    wipe: bool,
    log: &mut Log,
) -> (bool, u64) {
    if wipe && ws.exists() {
        log.line("workspace: it ran code nobody reviewed and this job is trusted; wiping it");
        return afresh(config, ws, log);
    }
    std::fs::create_dir_all(ws).ok();
    let src = src(ws);
    if dirty && src.join(".git").exists() {
        log.line("workspace: the last job here did not end cleanly; resetting it");
        shutdown_server(config, ws, log);
        for lock in ["index.lock", "shallow.lock", "HEAD.lock"] {
            let _ = std::fs::remove_file(src.join(".git").join(lock));
        }
        let reset = run(
            log,
            git(&src).args(["reset", "--hard", "--quiet"]),
            "git reset --hard",
        )
        .and_then(|_| run(log, git(&src).args(["clean", "-ffdxq"]), "git clean"));
        if reset.is_err() {
            log.line("workspace: reset failed; starting it afresh");
            return afresh(config, ws, log);
        }
    }
    let mut bytes = disk_bytes(ws);
    if bytes <= config.max_workspace_bytes {
        return (false, bytes);
    }
    log.line(&format!(
        "workspace: {bytes} bytes, over the {} allowed; cleaning",
        config.max_workspace_bytes
    ));
    metrics::counter!(crate::metric_names::RUNNER_WORKSPACE_CLEANINGS_TOTAL).increment(1);
    if src.join(".git").exists() {
        let _ = run(log, bazel(config, ws).arg("clean"), "bazel clean");
        bytes = disk_bytes(ws);
        if bytes > config.max_workspace_bytes {
            let _ = run(
                log,
                git(&src).args(["gc", "--prune=now", "--quiet"]),
                "git gc",
            );
            let _ = run(log, git(&src).args(["lfs", "prune"]), "git lfs prune");
            bytes = disk_bytes(ws);
        }
    }
    if bytes > config.max_workspace_bytes {
        log.line("workspace: still too big; removing it");
        return afresh(config, ws, log);
    }
    (false, bytes)
}

/// Fetches `job`'s ref into the workspace's checkout (cloning on first use, fetching only
/// what is new after) and checks its commit out, with its Git LFS files; discards anything
/// else in the checkout.
pub fn checkout(ws: &Path, job: &CiJob, log: &mut Log) -> Result<(), StepError> {
    let src = src(ws);
    let infra = StepError::Infrastructure;
    if !src.join(".git").exists() {
        std::fs::create_dir_all(&src).map_err(|e| infra(e.to_string()))?;
        run(log, git(&src).args(["init", "--quiet"]), "git init").map_err(infra)?;
        run(
            log,
            git(&src).args(["remote", "add", "origin", &job.clone_url]),
            "git remote add",
        )
        .map_err(infra)?;
        // LFS objects are fetched in one batch after checkout, not file by file while it runs.
        run(
            log,
            git(&src).args(["lfs", "install", "--local", "--skip-smudge"]),
            "git lfs install",
        )
        .map_err(infra)?;
    } else {
        run(
            log,
            git(&src).args(["remote", "set-url", "origin", &job.clone_url]),
            "git remote set-url",
        )
        .map_err(infra)?;
    }
    let refspec = format!("+{}:refs/motorpool/job", job.git_ref);
    run(
        log,
        git(&src).args(["fetch", "--quiet", "--no-tags", "origin", &refspec]),
        &format!("git fetch origin {}", job.git_ref),
    )
    .map_err(infra)?;
    // The ref may have moved on since the event: build the commit the event named.
    if run(
        log,
        git(&src).args(["cat-file", "-e", &format!("{}^{{commit}}", job.commit)]),
        "git cat-file",
    )
    .is_err()
    {
        run(
            log,
            git(&src).args(["fetch", "--quiet", "--no-tags", "origin", &job.commit]),
            &format!("git fetch origin {}", job.commit),
        )
        .map_err(|e| {
            StepError::Result(format!(
                "commit {} is not in the repository: {e}",
                job.commit
            ))
        })?;
    }
    run(
        log,
        git(&src).args(["checkout", "--quiet", "--force", "--detach", &job.commit]),
        "git checkout",
    )
    .map_err(infra)?;
    run(log, git(&src).args(["clean", "-ffdxq"]), "git clean").map_err(infra)?;
    run(log, git(&src).args(["lfs", "pull"]), "git lfs pull").map_err(infra)?;
    Ok(())
}

/// The job's Bazel flags for the platform: where to execute, with which key, in which lane.
/// They go into a bazelrc readable only by this runner, so the key is in no command line.
pub fn rc_file(
    config: &RunnerConfig,
    ws: &Path,
    job: &CiJob,
    key: Option<&str>,
) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut lines = vec![format!(
        "build --remote_executor={}",
        config.remote_executor
    )];
    if !config.remote_instance_name.is_empty() {
        lines.push(format!(
            "build --remote_instance_name={}",
            config.remote_instance_name
        ));
    }
    if let Some(ca) = &config.tls_certificate {
        lines.push(format!("build --tls_certificate={}", ca.display()));
    }
    if let Some(key) = key {
        // Quoted: a bazelrc splits on spaces otherwise.
        lines.push(format!(
            "build \"--remote_header=authorization=Bearer {key}\""
        ));
    }
    lines.push(format!(
        "build --remote_header=x-motorpool-lane={}",
        job.lane.name()
    ));
    if config.build_events {
        lines.push(format!("build --bes_backend={}", config.remote_executor));
        if let Some(url) = &config.bes_results_url {
            lines.push(format!("build --bes_results_url={url}"));
        }
        // What the build's page says of the job: its id, commit, branch and merge request.
        let branch = match &job.trigger {
            Trigger::MergeRequest { source_branch, .. } => source_branch.clone(),
            _ => job
                .git_ref
                .strip_prefix("refs/heads/")
                .unwrap_or(&job.git_ref)
                .to_string(),
        };
        let mut metadata = vec![
            ("CI_JOB", job.job_id.clone()),
            ("COMMIT_SHA", job.commit.clone()),
            ("BRANCH_NAME", branch),
            ("USER", job.requested_by.clone()),
        ];
        if let Trigger::MergeRequest { number, .. } = &job.trigger {
            metadata.push(("CI_MERGE_REQUEST", number.to_string()));
        }
        for (k, v) in metadata {
            // Only characters a bazelrc line and the page take as they are.
            let v: String = v
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || "-_./:@+".contains(*c))
                .collect();
            if !v.is_empty() {
                lines.push(format!("build --build_metadata={k}={v}"));
            }
        }
    }
    if !job.trusted {
        // An untrusted job's local results never reach the shared cache (its key cannot write
        // them anyway); what the platform's workers execute is written by them.
        lines.push("build --noremote_upload_local_results".into());
    }
    let path = ws.join(RC);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    writeln!(f, "{}", lines.join("\n"))?;
    Ok(path)
}

/// Runs the job's Bazel command. Bazel's exit code says whose failure it was: 1 (build
/// failed), 2 (bad command line), 3 (tests failed) and 4 (no tests) are the job's results;
/// the rest (an interrupted or crashed Bazel, remote and environment errors) are the
/// infrastructure's, worth another attempt.
pub fn build(
    config: &RunnerConfig,
    ws: &Path,
    job: &CiJob,
    key: Option<&str>,
    log: &mut Log,
) -> Result<(), StepError> {
    rc_file(config, ws, job, key).map_err(|e| StepError::Infrastructure(e.to_string()))?;
    let mut cmd = bazel(config, ws);
    cmd.arg(&job.command)
        .args(&job.flags)
        .args(&config.bazel_flags)
        .args(["--color=no", "--curses=no", "--show_progress_rate_limit=5"])
        .arg("--")
        .args(&job.targets);
    let what = format!(
        "bazel {} {} -- {}",
        job.command,
        job.flags.join(" "),
        job.targets.join(" ")
    );
    log.line(&format!("$ {what}"));
    let (out, err) = log
        .stdio()
        .map_err(|e| StepError::Infrastructure(e.to_string()))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| {
            StepError::Infrastructure(format!("cannot run {}: {e}", config.bazel.display()))
        })?;
    match status.code() {
        Some(0) => Ok(()),
        Some(1) => Err(StepError::Result("the build failed (bazel exit 1)".into())),
        Some(2) => Err(StepError::Result(
            "bazel refused the command line (exit 2)".into(),
        )),
        Some(3) => Err(StepError::Result("tests failed (bazel exit 3)".into())),
        Some(4) => Err(StepError::Result("no tests found (bazel exit 4)".into())),
        Some(code) => Err(StepError::Infrastructure(format!("bazel exit {code}"))),
        None => Err(StepError::Infrastructure(format!(
            "bazel ended by {status}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git_in(dir: &Path, args: &[&str]) {
        let ok = Command::new("git")
            .current_dir(dir)
            .args(["-c", "user.email=t@t", "-c", "user.name=t"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "git {args:?}");
    }

    #[test]
    fn a_dirty_workspace_is_reset_and_one_over_its_size_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("ws-0");
        let src = src(&ws);
        std::fs::create_dir_all(&src).unwrap();
        git_in(&src, &["init", "--quiet"]);
        std::fs::write(src.join("BUILD"), "# the commit's\n").unwrap();
        git_in(&src, &["add", "."]);
        git_in(&src, &["commit", "--quiet", "-m", "x"]);
        // What a killed job leaves: a changed file, a new one, a stale lock.
        std::fs::write(src.join("BUILD"), "# half-written by a killed job\n").unwrap();
        std::fs::write(src.join("stale.o"), vec![0u8; 10_000]).unwrap();
        std::fs::write(src.join(".git/index.lock"), "").unwrap();
        let config = RunnerConfig {
            bazel: "/bin/false".into(),
            ..RunnerConfig::default()
        };
        let mut log = Log::open(dir.path().join("job.log")).unwrap();
        let (removed, bytes) = prepare(&config, &ws, true, false, &mut log);
        assert!(!removed);
        assert!(bytes > 0);
        assert_eq!(
            std::fs::read_to_string(src.join("BUILD")).unwrap(),
            "# the commit's\n"
        );
        assert!(!src.join("stale.o").exists());
        // A clean one is left as it is.
        std::fs::write(src.join("kept"), "x").unwrap();
        assert!(!prepare(&config, &ws, false, false, &mut log).0);
        assert!(src.join("kept").exists());
        // A trusted job in a workspace unreviewed code ran in: removed whole.
        std::fs::write(src.join("planted"), "x").unwrap();
        assert_eq!(prepare(&config, &ws, false, true, &mut log), (true, 0));
        assert!(!src.exists());
        std::fs::create_dir_all(&src).unwrap();
        git_in(&src, &["init", "--quiet"]);
        // Over the size allowed even after cleaning: removed, to start cold.
        let tiny = RunnerConfig {
            max_workspace_bytes: 1,
            ..config
        };
        assert_eq!(prepare(&tiny, &ws, false, false, &mut log), (true, 0));
        assert!(!src.exists());
        let text = std::fs::read_to_string(dir.path().join("job.log")).unwrap();
        assert!(
            text.contains("resetting") && text.contains("removing it"),
            "{text}"
        );
    }
}
