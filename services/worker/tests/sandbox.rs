//! The action sandbox against the attacks it exists for, each run for real: bubblewrap, the
//! sandbox user and a cgroup (these tests need root, as the worker does; CI runs as root).

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_config::SandboxConfig;
use motorpool_worker::run::{RunOutcome, RunSpec, run};
use motorpool_worker::sandbox::{Limits, Sandbox};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// An exec root the sandbox user owns, below a directory it can search (as the worker's are).
struct Root {
    _dir: tempfile::TempDir,
    job: PathBuf,
    root: PathBuf,
}

fn root() -> Root {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let job = dir.path().join("job");
    let root = job.join("root");
    std::fs::create_dir_all(&root).unwrap();
    nix::unistd::chown(
        &root,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .unwrap();
    Root {
        _dir: dir,
        job,
        root,
    }
}

fn sandbox(name: &str) -> Sandbox {
    Sandbox::open(&SandboxConfig::default(), name)
        .expect("the sandbox opens (run as root, with bubblewrap installed)")
        .expect("strict is the default")
}

fn sh(script: &str) -> re::Command {
    re::Command {
        arguments: vec!["/bin/sh".into(), "-c".into(), script.into()],
        environment_variables: vec![re::command::EnvironmentVariable {
            name: "PATH".into(),
            value: "/usr/bin:/bin".into(),
        }],
        ..Default::default()
    }
}

struct Ran {
    outcome: RunOutcome,
    stdout: String,
    stderr: String,
}

async fn run_in(
    sb: &Sandbox,
    r: &Root,
    command: &re::Command,
    limits: &Limits,
    timeout: Duration,
    max_stream_bytes: u64,
) -> Ran {
    let (o, e) = (r.job.join("stdout"), r.job.join("stderr"));
    let spec = RunSpec {
        command,
        exec_root: &r.root,
        stdout: &o,
        stderr: &e,
        timeout,
        nice: 0,
        max_stream_bytes,
        sandbox: Some((sb, limits, "t")),
        max_file_bytes: 1 << 30,
    };
    let outcome = run(&spec, &CancellationToken::new()).await.unwrap();
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
    Ran {
        outcome,
        stdout: read(&o),
        stderr: read(&e),
    }
}

async fn run_default(sb: &Sandbox, r: &Root, script: &str) -> Ran {
    let limits = sb.limits(&[]).unwrap();
    run_in(
        sb,
        r,
        &sh(script),
        &limits,
        Duration::from_secs(30),
        1 << 20,
    )
    .await
}

#[tokio::test]
async fn an_action_is_not_root_and_cannot_read_secrets_or_reach_the_hosts_ports() {
    let sb = sandbox("t-identity");
    let r = root();
    // A port on the host's loopback, as NATS and the shards' data streams listen.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!(
        "id -u; id -g; cat /etc/shadow >/dev/null 2>&1 && echo READ-SHADOW; \
         bash -c 'echo > /dev/tcp/127.0.0.1/{port}' 2>/dev/null && echo REACHED-PORT; \
         ls /proc | grep -c '^[0-9]'; echo done"
    );
    let ran = run_default(&sb, &r, &script).await;
    assert_eq!(ran.outcome.exit_code, 0, "{}", ran.stderr);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(&lines[..2], ["65534", "65534"], "{}", ran.stdout);
    assert!(!ran.stdout.contains("READ-SHADOW"), "{}", ran.stdout);
    assert!(!ran.stdout.contains("REACHED-PORT"), "{}", ran.stdout);
    // Its own pid namespace: only its own few processes.
    let procs: u32 = lines[2].parse().unwrap();
    assert!(procs < 10, "{procs} processes visible");
    assert_eq!(lines.last(), Some(&"done"));
    // The same connection from outside the sandbox works: the test is not vacuous.
    std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
}

#[tokio::test]
async fn inputs_and_the_workers_files_cannot_be_written() {
    let sb = sandbox("t-files");
    let r = root();
    // An input as the worker links it: a read-only file of root's in the input cache.
    let cache = r.job.join("cache");
    std::fs::create_dir(&cache).unwrap();
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(cache.join("blob"), b"good input").unwrap();
    std::fs::set_permissions(cache.join("blob"), std::fs::Permissions::from_mode(0o444)).unwrap();
    std::fs::hard_link(cache.join("blob"), r.root.join("input.h")).unwrap();
    let script = format!(
        "echo evil > input.h 2>/dev/null && echo WROTE; chmod 666 input.h 2>/dev/null && echo CHMOD; \
         ls {cache} >/dev/null 2>&1 && echo SAW-CACHE; cat input.h; \
         rm input.h && echo mine > input.h && echo out > out.o && echo ok",
        cache = cache.display()
    );
    let ran = run_default(&sb, &r, &script).await;
    assert_eq!(ran.outcome.exit_code, 0, "{}", ran.stderr);
    assert_eq!(ran.stdout, "good inputok\n", "{}", ran.stderr);
    // Removing its own link and writing a new file touched neither the cache nor its mode.
    assert_eq!(std::fs::read(cache.join("blob")).unwrap(), b"good input");
    let mode = std::fs::metadata(cache.join("blob"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444);
    assert_eq!(std::fs::read(r.root.join("out.o")).unwrap(), b"out\n");
}

#[tokio::test]
async fn nothing_outlives_the_action_not_even_through_setsid() {
    let sb = sandbox("t-setsid");
    let r = root();
    let limits = sb.limits(&[]).unwrap();
    // Timed out, with a setsid grandchild that would write a marker later.
    let script = "setsid sh -c 'sleep 1; touch late' & sleep 30";
    let t = Instant::now();
    let ran = run_in(
        &sb,
        &r,
        &sh(script),
        &limits,
        Duration::from_millis(300),
        1 << 20,
    )
    .await;
    assert!(ran.outcome.timed_out);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Ended normally, with a setsid child left behind.
    let ran = run_default(&sb, &r, "setsid sh -c 'sleep 1; touch later' & echo bye").await;
    assert_eq!(ran.outcome.exit_code, 0);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(
        !r.root.join("late").exists(),
        "a setsid process survived the timeout"
    );
    assert!(
        !r.root.join("later").exists(),
        "a setsid process survived its action"
    );
}

#[tokio::test]
async fn going_over_the_memory_limit_fails_the_action_with_a_note() {
    let sb = sandbox("t-memory");
    let r = root();
    let limits = Limits {
        memory_bytes: 64 << 20,
        ..sb.limits(&[]).unwrap()
    };
    // 200 MB held in a shell variable.
    let script = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo ${#x}";
    let ran = run_in(
        &sb,
        &r,
        &sh(script),
        &limits,
        Duration::from_secs(60),
        1 << 20,
    )
    .await;
    assert!(ran.outcome.oom_killed, "{ran:?}", ran = ran.stderr);
    assert_ne!(ran.outcome.exit_code, 0);
    assert!(
        ran.stderr.contains("memory limit of 64 MiB"),
        "{}",
        ran.stderr
    );
    // The same action with room to spare succeeds: the limit, not the script, failed it.
    let roomy = Limits {
        memory_bytes: 2 << 30,
        ..limits
    };
    let ran = run_in(
        &sb,
        &r,
        &sh(script),
        &roomy,
        Duration::from_secs(60),
        1 << 20,
    )
    .await;
    assert_eq!(ran.stdout.trim(), "200000000", "{}", ran.stderr);
    assert!(!ran.outcome.oom_killed);
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_gib_of_stdout_is_capped_on_disk_and_never_held_in_memory() {
    let sb = sandbox("t-stdout");
    let r = root();
    let limits = sb.limits(&[]).unwrap();
    let before = peak_rss_kib();
    let ran = run_in(
        &sb,
        &r,
        &sh("head -c 1073741824 /dev/zero; echo fine >&2"),
        &limits,
        Duration::from_secs(120),
        1 << 20,
    )
    .await;
    let grew = peak_rss_kib().saturating_sub(before);
    assert_eq!(ran.outcome.exit_code, 0);
    assert_eq!(ran.stdout.len(), 1 << 20);
    let dropped = (1u64 << 30) - (1 << 20);
    assert!(
        ran.stderr.starts_with("fine\n")
            && ran
                .stderr
                .contains(&format!("{dropped} more bytes of stdout were dropped")),
        "{}",
        ran.stderr
    );
    assert!(
        grew < 8 * 1024,
        "the test process's peak RSS grew by {grew} KiB"
    );
}

#[tokio::test]
async fn the_network_is_kept_only_where_the_pool_allows_and_the_action_asks() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!("bash -c 'echo > /dev/tcp/127.0.0.1/{port}' && echo reached");
    let strict = sandbox("t-net");
    assert!(strict.limits(&[("network".into(), "on".into())]).is_err());
    let open = Sandbox::open(
        &SandboxConfig {
            allow_network: true,
            ..SandboxConfig::default()
        },
        "t-net-open",
    )
    .unwrap()
    .unwrap();
    let r = root();
    let asked = open.limits(&[("network".into(), "on".into())]).unwrap();
    let ran = run_in(
        &open,
        &r,
        &sh(&script),
        &asked,
        Duration::from_secs(30),
        1 << 20,
    )
    .await;
    assert_eq!(ran.stdout, "reached\n", "{}", ran.stderr);
    let ran = run_default(&open, &r, &script).await;
    assert_eq!(ran.stdout, "", "an action that did not ask has no network");
}
