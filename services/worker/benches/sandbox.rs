//! What the action sandbox costs per action: `/bin/true` run N times unsandboxed and sandboxed
//! (bubblewrap, the sandbox user, a cgroup made and removed), alternating, on this machine.
//! Needs root. `cargo bench -p motorpool-worker --bench sandbox` (MOTORPOOL_BENCH_N, default 200).

use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_config::SandboxConfig;
use motorpool_worker::run::{RunSpec, run};
use motorpool_worker::sandbox::Sandbox;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("MOTORPOOL_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let sb = Sandbox::open(&SandboxConfig::default(), "bench")
        .expect("the sandbox opens (run as root, with bubblewrap installed)")
        .expect("strict");
    let limits = sb.limits(&[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    nix::unistd::chown(
        &root,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .unwrap();
    let command = re::Command {
        arguments: vec!["/bin/true".into()],
        ..Default::default()
    };
    let (o, e) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for i in 0..2 * n {
        let sandboxed = i % 2 == 1;
        let name = format!("b{i}");
        let spec = RunSpec {
            command: &command,
            exec_root: &root,
            stdout: &o,
            stderr: &e,
            timeout: Duration::from_secs(30),
            nice: 0,
            max_stream_bytes: 1 << 20,
            sandbox: sandboxed.then_some((&sb, &limits, name.as_str())),
            max_file_bytes: 1 << 30,
        };
        let t = Instant::now();
        let r = run(&spec, &CancellationToken::new()).await.unwrap();
        times[sandboxed as usize].push(t.elapsed());
        assert_eq!(r.exit_code, 0);
    }
    for t in &mut times {
        t.sort();
    }
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    println!(
        "\n/bin/true as an action, {n} runs each, alternating (cgroup v{})\n",
        sb.cgroup_version()
    );
    println!("| | p50 | p99 |");
    println!("|---|---|---|");
    for (name, t) in [("unsandboxed", &times[0]), ("sandboxed", &times[1])] {
        println!(
            "| {name} | {} | {} |",
            ms(percentile(t, 0.5)),
            ms(percentile(t, 0.99))
        );
    }
    let over = |p| percentile(&times[1], p).saturating_sub(percentile(&times[0], p));
    println!(
        "| sandbox overhead (goal: p50 < 5 ms) | {} | {} |",
        ms(over(0.5)),
        ms(over(0.99))
    );
}
