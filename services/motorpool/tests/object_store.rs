//! The object-store tier on the stack, against a real S3-compatible server (moto in server mode,
//! from PyPI): a Bazel build through `motorpool up --object-store-url s3://...`, then a stack
//! whose shards and workers start with nothing (their disks lost, as elastic nodes' are) on the
//! same bucket. Its rebuild is all remote cache hits, byte-identical, read back from the bucket.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::workspace::{Bazel, Workspace};
use support::{Stack, free_addr, sha256_file};

/// `moto_server` on a free port, with one bucket; killed on drop.
struct S3 {
    child: Child,
    endpoint: String,
}

impl S3 {
    fn start(bucket: &str) -> S3 {
        assert!(
            support::which("moto_server").is_some(),
            "moto_server is required (pip install 'moto[server]'); scripts/setup --test installs it"
        );
        let addr = free_addr();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                let (status, body) =
                    support::ci::http(addr, "PUT", &format!("/{bucket}"), &[], b"");
                assert_eq!(status, 200, "create bucket {bucket}: {body}");
                break;
            }
            assert!(Instant::now() < deadline, "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        S3 {
            child,
            endpoint: format!("http://{addr}"),
        }
    }

    /// What every service needs to reach it (the AWS SDKs' usual variables).
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "motorpool-test".into()),
            ("AWS_SECRET_ACCESS_KEY", "motorpool-test-secret".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn shards_that_lost_everything_rebuild_from_the_object_store_as_cache_hits() {
    support::require_bazel();
    let s3 = S3::start("motorpool-cache");
    let env = s3.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(dir.path(), 10);
    let tier = [
        "--object-store-url",
        "s3://motorpool-cache/ci-cache",
        "--workers",
        "2",
        "--shards",
        "1",
    ];
    let flags = |stack: &Stack| stack.remote_build_flags("tiered");

    // A cold build: every action runs remotely, and its outputs and results go to the bucket.
    let first = Stack::up_with_env(&tier, &env);
    let bazel = Bazel::new(&ws, &dir.path().join("root"));
    let cold = bazel.run("test", &flags(&first));
    let out = String::from_utf8_lossy(&cold.output.stdout);
    assert!(
        out.contains("Executed 10 out of 10 tests: 10 tests pass"),
        "{out}{}",
        cold.stderr()
    );
    let (_, hits, _) = cold.process_summary();
    assert_eq!(hits, 0, "a cold build has no hits");
    let built: Vec<(String, String)> = ws
        .artifacts()
        .into_iter()
        .map(|a| {
            let sum = sha256_file(&bazel.bazel_bin().join(&a));
            (a, sum)
        })
        .collect();
    let written = first.metric_sum("cas-", "motorpool_cas_tier_writes_total{result=\"ok\"}")
        + first.metric_sum("worker-", "motorpool_cas_tier_writes_total{result=\"ok\"}");
    assert!(written > 0.0, "nothing was written to the bucket");
    // The action results count against the shards' capacity, within the action cache's share.
    let sum = |series: &str| first.metric_sum("cas-", series) + first.metric_sum("worker-", series);
    let entries = sum("motorpool_cas_shard_action_cache_entries");
    let (bytes, share) = (
        sum("motorpool_cas_shard_action_cache_bytes"),
        sum("motorpool_cas_shard_action_cache_capacity_bytes"),
    );
    assert!(
        entries >= 20.0,
        "{entries} action-cache entries for 20 remote actions"
    );
    assert!(
        bytes > 0.0 && bytes <= share,
        "{bytes} bytes of entries, a share of {share}"
    );
    drop(first);

    // Everything local is gone: a new stack (new NATS, shards and workers with empty disks) on
    // the same bucket. Bazel's own outputs are gone too.
    bazel.run("clean", &["--expunge".into()]);
    let second = Stack::up_with_env(&tier, &env);
    let warm = bazel.run("test", &flags(&second));
    let (total, hits, internal) = warm.process_summary();
    assert_eq!(
        hits,
        total - internal,
        "every action is a remote cache hit from the bucket:\n{}",
        warm.stderr()
    );
    let out = String::from_utf8_lossy(&warm.output.stdout);
    assert!(out.contains("10 tests pass"), "{out}");
    for (artifact, sum) in &built {
        assert_eq!(
            &sha256_file(&bazel.bazel_bin().join(artifact)),
            sum,
            "{artifact} differs when read back from the bucket"
        );
    }
    let read_back = second.metric_sum("cas-", "motorpool_cas_tier_reads_total{result=\"hit\"}")
        + second.metric_sum("worker-", "motorpool_cas_tier_reads_total{result=\"hit\"}");
    assert!(read_back > 0.0, "nothing was read back from the bucket");
    // What was read from the bucket is back on the shards: the same rebuild again takes (nearly)
    // nothing more from the bucket.
    bazel.run("clean", &["--expunge".into()]);
    let rewarmed = bazel.run("test", &flags(&second));
    let (total2, hits2, internal2) = rewarmed.process_summary();
    assert_eq!(hits2, total2 - internal2, "{}", rewarmed.stderr());
    let read_again = second.metric_sum("cas-", "motorpool_cas_tier_reads_total{result=\"hit\"}")
        + second.metric_sum("worker-", "motorpool_cas_tier_reads_total{result=\"hit\"}")
        - read_back;
    assert!(
        read_again <= read_back / 10.0,
        "the rebuild read {read_again} blobs from the bucket again, after {read_back} the first time"
    );
    drop(second); // its shards record what the rebuild used as they stop

    // The lifecycle: a dry run keeping 30 days removes nothing; keeping only what was used
    // today removes what the rebuild did not touch (its inputs: an all-hit build uploads and
    // asks for none) and keeps the results and the outputs they reference.
    let sweep = |keep_days: &str, dry_run: bool, textfile: &Path| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_motorpool"));
        cmd.args([
            "sweep-object-store",
            "--object-store-url",
            "s3://motorpool-cache/ci-cache",
        ])
        .args(["--keep-days", keep_days])
        .arg("--textfile")
        .arg(textfile)
        .envs(env.iter().copied());
        if dry_run {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let row: Vec<u64> = text
            .lines()
            .find(|l| l.starts_with("tiered "))
            .unwrap_or_else(|| panic!("no row for the instance:\n{text}"))
            .split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap())
            .collect();
        (row, text)
    };
    let textfile = dir.path().join("object-store.prom");
    let (dry, text) = sweep("30", true, &textfile);
    assert!(dry[0] > 0 && dry[2] == 0 && dry[5] == 0, "{text}");
    let check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&textfile).unwrap())
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let prom = std::fs::read_to_string(&textfile).unwrap();
    assert!(
        prom.contains(&format!(
            "motorpool_object_store_blobs{{instance_name=\"tiered\"}} {}",
            dry[0]
        )),
        "{prom}"
    );
    let (swept, text) = sweep("0", false, &textfile);
    assert!(
        swept[0] > 0 && swept[2] > 0,
        "kept some, removed some: {text}"
    );
    assert_eq!(swept[5], 0, "every result was used today: {text}");

    // A third stack, empty again, on the swept bucket: still every action a cache hit.
    bazel.run("clean", &["--expunge".into()]);
    let third = Stack::up_with_env(&tier, &env);
    let again = bazel.run("test", &flags(&third));
    let (total, hits_after, internal) = again.process_summary();
    assert_eq!(
        hits_after,
        total - internal,
        "the sweep kept every blob a kept result references:\n{}",
        again.stderr()
    );
    eprintln!(
        "object store: {written} blobs written by the first stack, {read_back} read back by the \
         second ({read_again} again on a rebuild), {hits} remote cache hits of {}; the sweep \
         kept {} blobs and removed {} that the rebuild did not use; a third empty stack: \
         {hits_after} hits",
        total - internal,
        swept[0],
        swept[2]
    );
    bazel.run("clean", &["--expunge".into()]);
}
