//! `docker compose up` for real, on a machine that cannot pull an image: `scripts/images` makes
//! the images from Debian's packages, compose.yaml (unchanged) runs them, every container's
//! health check passes, a Bazel remote-execution build runs on the containers' workers with one
//! worker container killed in the middle, a clip is labeled by the stages' containers, and
//! `docker compose down -v` removes it all.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::workspace::{Bazel, Workspace};
use support::{free_addr, require_bazel, succeed, which};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A compose project in a directory of its own (so `./clips`, `./bays` are not the repository's),
/// on free host ports; `down -v` when dropped.
struct Project {
    dir: tempfile::TempDir,
    name: String,
    env: Vec<(&'static str, String)>,
    /// Compose files on top of compose.yaml.
    overrides: Vec<PathBuf>,
    /// `docker compose` (the plugin) is installed; else docker-compose (1.29 here).
    plugin: bool,
}

impl Project {
    fn compose(&self) -> Command {
        let mut cmd = if self.plugin {
            let mut c = Command::new("docker");
            c.arg("compose");
            c
        } else {
            Command::new(which("docker-compose").expect("docker compose or docker-compose"))
        };
        cmd.arg("-f").arg(repo().join("compose.yaml"));
        for f in &self.overrides {
            cmd.arg("-f").arg(f);
        }
        cmd.arg("--project-directory")
            .arg(self.dir.path())
            .args(["-p", &self.name])
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd
    }

    fn port(&self, var: &str) -> u16 {
        self.env
            .iter()
            .find(|(k, _)| *k == var)
            .unwrap()
            .1
            .parse()
            .unwrap()
    }

    /// Container ids of the project's services, with their service names.
    fn containers(&self) -> Vec<(String, String)> {
        let out = succeed(Command::new("docker").args([
            "ps",
            "-a",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--format",
            "{{.ID}} {{.Label \"com.docker.compose.service\"}}",
        ]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(id, s)| (id.to_string(), s.to_string()))
            .collect()
    }

    fn container(&self, service: &str) -> String {
        self.containers()
            .into_iter()
            .find(|(_, s)| s == service)
            .unwrap_or_else(|| panic!("no container for {service}"))
            .0
    }

    /// `(health, running)` of a container.
    fn state(id: &str) -> (String, bool) {
        let out = succeed(Command::new("docker").args([
            "inspect",
            "-f",
            "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}} {{.State.Running}}",
            id,
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        let (health, running) = text.trim().split_once(' ').unwrap();
        (health.to_string(), running == "true")
    }

    fn logs(&self) -> String {
        let out = self
            .compose()
            .args(["logs", "--no-color", "--tail", "40"])
            .output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// `wget` inside a service's container (its own ports are not published).
    fn fetch_inside(&self, service: &str, url: &str) -> String {
        let out = succeed(Command::new("docker").args([
            "exec",
            &self.container(service),
            "wget",
            "-q",
            "-O",
            "-",
            url,
        ]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("compose logs:\n{}", self.logs());
        }
        let _ = self
            .compose()
            .args(["down", "-v", "--remove-orphans", "-t", "5"])
            .output();
    }
}

/// The sum of a Prometheus counter's series in `text`.
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn the_compose_stack_runs_from_local_images_builds_through_a_lost_worker_and_labels_a_clip() {
    require_bazel();
    // The images, from Debian's packages only (the base is made once per machine).
    let t = Instant::now();
    succeed(
        Command::new(repo().join("scripts/images"))
            .args(["--binary", env!("CARGO_BIN_EXE_motorpool")])
            .current_dir(repo()),
    );
    eprintln!("images ready in {:.0} s", t.elapsed().as_secs_f64());

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("deploy/ci")).unwrap();
    std::fs::copy(
        repo().join("deploy/nats.conf"),
        dir.path().join("deploy/nats.conf"),
    )
    .unwrap();
    std::fs::write(dir.path().join("deploy/ci/projects.toml"), "").unwrap();
    for d in ["clips", "bays"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    // The workers' sandbox needs a privileged container. Some engines cannot grant one: this
    // kind of machine runs Docker inside a sandbox of its own whose bounding set lacks
    // CAP_SYS_RESOURCE ("unable to apply caps"), and without `privileged` Docker's masked /proc
    // paths stop bubblewrap mounting a /proc in its user namespace (docker-compose 1.29 cannot
    // pass `systempaths=unconfined`). There the workers run with the sandbox off, as compose.yaml
    // says to, and the test says so.
    let mut overrides = Vec::new();
    let privileged = Command::new("docker")
        .args(["run", "--rm", "--privileged", "--user", "root"])
        .args(["--entrypoint", "true", "motorpool:dev"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !privileged {
        eprintln!("this engine cannot run privileged containers: workers without the sandbox");
        let f = dir.path().join("compose.unprivileged.yaml");
        std::fs::write(
            &f,
            "services:\n  worker-0:\n    privileged: false\n    environment:\n      MOTORPOOL_WORKER_SANDBOX__MODE: \"off\"\n  worker-1:\n    privileged: false\n    environment:\n      MOTORPOOL_WORKER_SANDBOX__MODE: \"off\"\n",
        )
        .unwrap();
        overrides.push(f);
    }
    let project = Project {
        overrides,
        plugin: Command::new("docker")
            .args(["compose", "version"])
            .output()
            .is_ok_and(|o| o.status.success()),
        name: format!("mptest{}", std::process::id()),
        env: [
            "MOTORPOOL_NATS_PORT",
            "MOTORPOOL_GRPC_PORT",
            "MOTORPOOL_HTTP_PORT",
            "MOTORPOOL_WEBHOOK_PORT",
            "MOTORPOOL_RUNNER_PORT",
        ]
        .into_iter()
        .map(|k| (k, free_addr().port().to_string()))
        .collect(),
        dir,
    };
    succeed(project.compose().args(["up", "-d"]));

    // Every container reports healthy.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let states: Vec<(String, String, bool)> = project
            .containers()
            .into_iter()
            .map(|(id, s)| {
                let (h, r) = Project::state(&id);
                (s, h, r)
            })
            .collect();
        assert!(states.len() >= 15, "{states:?}");
        if states.iter().all(|(_, h, r)| h == "healthy" && *r) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all healthy within 180 s: {states:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "all containers healthy after {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let http = format!("127.0.0.1:{}", project.port("MOTORPOOL_HTTP_PORT"));
    let get = |path: &str| -> String {
        ureq::get(&format!("http://{http}{path}"))
            .call()
            .map(|mut r| r.body_mut().read_to_string().unwrap())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !get("/api/v1/workers").contains("worker-1")
        || !get("/api/v1/workers").contains("worker-0")
    {
        assert!(Instant::now() < deadline, "workers never registered");
        std::thread::sleep(Duration::from_millis(500));
    }

    // A Bazel build on the containers' workers; worker-0's container is killed mid-build.
    let ws_dir = tempfile::tempdir().unwrap();
    let ws = Workspace::generate(ws_dir.path(), 24);
    let bazel = Bazel::new(&ws, &ws_dir.path().join("root"));
    let flags: Vec<String> = vec![
        "//...".into(),
        format!(
            "--remote_executor=grpc://127.0.0.1:{}",
            project.port("MOTORPOOL_GRPC_PORT")
        ),
        "--remote_instance_name=compose".into(),
        "--spawn_strategy=remote".into(),
        "--jobs=8".into(),
    ];
    let build = std::thread::spawn(move || bazel.run("test", &flags));
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter(&get("/metrics"), "motorpool_gateway_executions_total") < 10.0 {
        assert!(Instant::now() < deadline, "the build never got going");
        std::thread::sleep(Duration::from_millis(200));
    }
    let worker0 = project.container("worker-0");
    succeed(Command::new("docker").args(["kill", &worker0]));
    assert!(
        !build.is_finished(),
        "worker-0 was killed after the build ended"
    );
    let run = build.join().expect("the build passes without worker-0");
    let out = String::from_utf8_lossy(&run.output.stdout);
    assert!(
        out.contains("Executed 24 out of 24 tests: 24 tests pass"),
        "{out}\n{}",
        run.stderr()
    );
    let jobs = counter(
        &project.fetch_inside("worker-1", "http://127.0.0.1:9090/metrics"),
        "motorpool_worker_jobs_total",
    );
    assert!(jobs > 0.0, "worker-1 ran no job");
    eprintln!(
        "remote build done at {:.0} s; worker-1 ran {jobs} jobs",
        t.elapsed().as_secs_f64()
    );

    // A clip labeled through the stages' containers: the host names it under ./clips, the
    // stages read it at /clips.
    let clip = project.dir.path().join("clips/lot-1/c-1");
    succeed(
        Command::new(env!("CARGO_BIN_EXE_motorpool"))
            .args(["label", "synth", "--frames", "40", "--out"])
            .arg(&clip),
    );
    let summary = project.dir.path().join("summary.json");
    // `label run` against the stack, clips named relative to ./clips.
    let label_run = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_motorpool"));
        cmd.args(["label", "run", "--nats-url"])
            .arg(format!(
                "nats://127.0.0.1:{}",
                project.port("MOTORPOOL_NATS_PORT")
            ))
            .arg("--clips-root")
            .arg(project.dir.path().join("clips"));
        cmd
    };
    succeed(label_run().arg("--summary").arg(&summary).arg(&clip));
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(summary[0]["status"], "labeled", "{summary}");
    // Named as the stage container sees it: the label store volume.
    let output = summary[0]["output"].as_str().unwrap();
    assert!(
        output.starts_with("/var/lib/motorpool/labels/"),
        "{summary}"
    );
    let labels = get("/api/v1/labels");
    assert!(labels.contains("\"annotate\""), "{labels}");
    // The annotate output is in the label store volume, as the stage container sees it.
    succeed(Command::new("docker").args([
        "exec",
        &project.container("annotate"),
        "test",
        "-s",
        &format!("{output}/stats.json"),
    ]));
    // A clip outside the root the stages see is refused before anything is queued.
    let outside = tempfile::tempdir().unwrap();
    succeed(
        Command::new(env!("CARGO_BIN_EXE_motorpool"))
            .args(["label", "synth", "--frames", "10", "--out"])
            .arg(outside.path().join("c-2")),
    );
    let refused = label_run()
        .arg(outside.path().join("c-2"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("is not inside the clips root"), "{why}");
    eprintln!("labeled at {:.0} s", t.elapsed().as_secs_f64());

    // down -v: no container or volume of the project is left.
    succeed(
        project
            .compose()
            .args(["down", "-v", "--remove-orphans", "-t", "5"]),
    );
    assert!(project.containers().is_empty());
    let volumes = succeed(Command::new("docker").args([
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={}", project.name),
    ]));
    assert!(
        volumes.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&volumes.stdout)
    );
}
