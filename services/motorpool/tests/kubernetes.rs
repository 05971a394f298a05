//! The Kubernetes manifests (`deploy/kubernetes`), checked as far as a machine without a cluster
//! can: rendered by `kubectl kustomize`, schema-checked by `kubernetes-validate --strict`, and
//! every part that Motorpool itself reads tried for real: each service's arguments by the
//! `motorpool` binary, NATS's configuration (with the realm the `secrets` script makes) by
//! `nats-server -t`, the runner's configuration by the platform's loader, the scrape
//! configuration by `promtool`. References between objects (Secrets, ConfigMaps, claims,
//! Services' selectors, each pod's nkey seed) must all resolve.

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{succeed, which};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

/// YAML documents as JSON values (PyYAML, which kubernetes-validate brings).
fn documents(yaml: &Path) -> Vec<Value> {
    let out = succeed(Command::new("python3").args([
        "-c",
        "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        yaml.to_str().unwrap(),
    ]));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn validate(file: &Path) -> std::process::Output {
    Command::new(which("kubernetes-validate").expect("kubernetes-validate (scripts/setup --test)"))
        .args(["--strict", "--kubernetes-version", "1.32.0", "--quiet"])
        .arg(file)
        .output()
        .unwrap()
}

fn name(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap(),
        doc["metadata"]["name"].as_str().unwrap()
    )
}

#[test]
fn the_kubernetes_manifests_render_validate_and_every_reference_resolves() {
    let kubectl = which("kubectl").expect("kubectl (scripts/setup --test installs it)");
    let dir = tempfile::tempdir().unwrap();
    let rendered = dir.path().join("motorpool.yaml");
    let out = succeed(Command::new(&kubectl).arg("kustomize").arg(deploy()));
    std::fs::write(&rendered, &out.stdout).unwrap();
    let v = validate(&rendered);
    assert!(
        v.status.success(),
        "kubernetes-validate: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // The validator is strict: a misspelt field fails it.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        String::from_utf8_lossy(&out.stdout).replacen("readinessProbe:", "readynessProbe:", 1),
    )
    .unwrap();
    assert!(
        !validate(&broken).status.success(),
        "a misspelt field passed"
    );

    // The secrets the manifests mount, as the documented script makes them.
    let secrets_dir = dir.path().join("secrets");
    succeed(
        Command::new(deploy().join("secrets"))
            .arg(&secrets_dir)
            .env("MOTORPOOL", env!("CARGO_BIN_EXE_motorpool")),
    );
    let v = validate(&secrets_dir.join("secrets.yaml"));
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    // A second run never overwrites keys.
    let again = Command::new(deploy().join("secrets"))
        .arg(&secrets_dir)
        .env("MOTORPOOL", env!("CARGO_BIN_EXE_motorpool"))
        .output()
        .unwrap();
    assert!(!again.status.success());

    let docs = documents(&rendered);
    let secrets = documents(&secrets_dir.join("secrets.yaml"));
    let by_kind = |kind: &str| -> BTreeMap<String, &Value> {
        docs.iter()
            .filter(|d| d["kind"] == kind)
            .map(|d| (d["metadata"]["name"].as_str().unwrap().to_string(), d))
            .collect()
    };
    for d in docs.iter().filter(|d| d["kind"] != "Namespace") {
        assert_eq!(d["metadata"]["namespace"], "motorpool", "{}", name(d));
    }
    let secret_names: BTreeSet<&str> = secrets
        .iter()
        .map(|s| s["metadata"]["name"].as_str().unwrap())
        .collect();
    let config_maps = by_kind("ConfigMap");
    let claims = by_kind("PersistentVolumeClaim");
    let bus_seeds: BTreeSet<String> = secrets
        .iter()
        .find(|s| s["metadata"]["name"] == "motorpool-bus")
        .unwrap()["data"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();

    let workloads: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
        .collect();
    let mut services_run = BTreeSet::new();
    for w in &workloads {
        let wname = w["metadata"]["name"].as_str().unwrap();
        let spec = &w["spec"]["template"]["spec"];
        let labels = &w["spec"]["template"]["metadata"]["labels"];
        assert_eq!(
            &w["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
            &labels["app.kubernetes.io/name"],
            "{}",
            name(w)
        );
        let claim_templates: BTreeSet<&str> = w["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| t["metadata"]["name"].as_str().unwrap())
            .collect();
        let volumes: BTreeSet<&str> = spec["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        for v in spec["volumes"].as_array().into_iter().flatten() {
            if let Some(s) = v["secret"]["secretName"].as_str() {
                assert!(
                    secret_names.contains(s),
                    "{}: Secret {s} is never made",
                    name(w)
                );
            }
            if let Some(c) = v["configMap"]["name"].as_str() {
                assert!(config_maps.contains_key(c), "{}: no ConfigMap {c}", name(w));
            }
            if let Some(c) = v["persistentVolumeClaim"]["claimName"].as_str() {
                assert!(claims.contains_key(c), "{}: no claim {c}", name(w));
            }
        }
        // Pods of a StatefulSet are <name>-0, -1, ...; a Deployment's have random names.
        let replicas = w["spec"]["replicas"].as_u64().unwrap_or(1);
        let pods: Vec<String> = if w["kind"] == "StatefulSet" {
            (0..replicas.max(1))
                .map(|i| format!("{wname}-{i}"))
                .collect()
        } else {
            vec![format!("{wname}-5d4f8-x7k2p")]
        };
        for c in spec["containers"].as_array().unwrap() {
            let cname = c["name"].as_str().unwrap();
            for probe in ["readinessProbe", "livenessProbe"] {
                assert!(c[probe].is_object(), "{}/{cname}: no {probe}", name(w));
            }
            for r in ["cpu", "memory"] {
                assert!(
                    c["resources"]["requests"][r].is_string(),
                    "{}/{cname}: no {r} request",
                    name(w)
                );
            }
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let m = m["name"].as_str().unwrap();
                assert!(
                    volumes.contains(m) || claim_templates.contains(m),
                    "{}/{cname}: mounts unknown volume {m}",
                    name(w)
                );
            }
            if !c["image"]
                .as_str()
                .unwrap()
                .starts_with("registry.example.com/motorpool:")
            {
                continue;
            }
            let args: Vec<&str> = c["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            services_run.insert(args[0].to_string());
            for pod in &pods {
                let args: Vec<String> =
                    args.iter().map(|a| a.replace("$(POD_NAME)", pod)).collect();
                // Every argument is one the service takes (clap checks each before `--help`).
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_motorpool"));
                cmd.args(&args).arg("--help");
                succeed(&mut cmd);
                // Its bus seed is in the Secret, under the name the pod looks for.
                if let Some(seed) = args
                    .iter()
                    .find_map(|a| a.strip_prefix("--nats-nkey-file=/etc/motorpool/bus/"))
                {
                    assert!(
                        bus_seeds.contains(seed) || replicas == 0,
                        "{}: pod {pod} needs seed {seed}; the Secret has {bus_seeds:?}",
                        name(w)
                    );
                }
            }
            // Every service's HTTP port is where Prometheus is told to scrape.
            let port = w["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no prometheus.io/port", name(w)));
            assert!(
                args.iter()
                    .any(|a| a.starts_with("--http-addr=0.0.0.0:")
                        && a.ends_with(&format!(":{port}"))),
                "{}: scraped on {port}, serves {args:?}",
                name(w)
            );
        }
    }
    for s in [
        "gateway",
        "scheduler",
        "reindexer",
        "cas-shard",
        "worker",
        "runner",
        "webhook",
        "alert-relay",
        "mapping",
        "prelabel",
        "annotate",
    ] {
        assert!(services_run.contains(s), "{s} is not deployed");
    }

    // Each Service selects some workload's pods.
    for (sname, svc) in by_kind("Service") {
        let want = &svc["spec"]["selector"]["app.kubernetes.io/name"];
        assert!(
            workloads.iter().any(
                |w| &w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == want
            ),
            "Service {sname} selects nothing"
        );
    }

    // NATS's configuration, with the realm's users, as each member reads it.
    let nats_dir = dir.path().join("nats");
    std::fs::create_dir_all(nats_dir.join("auth")).unwrap();
    std::fs::write(
        nats_dir.join("nats.conf"),
        config_maps["nats-config"]["data"]["nats.conf"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    std::fs::copy(
        secrets_dir.join("auth.conf"),
        nats_dir.join("auth/auth.conf"),
    )
    .unwrap();
    let nats = which("nats-server").expect("nats-server");
    for member in ["nats-0", "nats-1", "nats-2"] {
        succeed(
            Command::new(&nats)
                .args(["-t", "-c"])
                .arg(nats_dir.join("nats.conf"))
                .env("POD_NAME", member),
        );
    }

    // The runner's configuration loads, and its files are the Secret's.
    let runner_toml = dir.path().join("runner.toml");
    std::fs::write(
        &runner_toml,
        config_maps["runner-config"]["data"]["runner.toml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let runner: motorpool_config::RunnerConfig =
        motorpool_config::load(Some(&runner_toml), &serde_json::json!({})).unwrap();
    for f in [
        runner.trusted_key_file.as_ref().unwrap(),
        runner.untrusted_key_file.as_ref().unwrap(),
        &runner.forges.gitlab.as_ref().unwrap().token_file,
    ] {
        let file = f.strip_prefix("/etc/motorpool/runner").unwrap();
        assert!(
            secrets_dir.join("runner").join(file).exists(),
            "{}",
            f.display()
        );
    }

    // The scrape configuration is one Prometheus takes, beside the platform's rules. Debian's
    // Prometheus is built without Kubernetes discovery, so its promtool is shown the same jobs
    // discovering from a file: everything else (relabelling, its regexes) is checked as written.
    let prom_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let scrape = config_maps["prometheus-scrape"]["data"]["motorpool-scrape.yml"]
        .as_str()
        .unwrap();
    let sd = "    kubernetes_sd_configs:\n      - role: pod\n        namespaces:\n          names: [motorpool]\n";
    assert_eq!(scrape.matches(sd).count(), 2, "{scrape}");
    let scrape = scrape.replace(sd, "    file_sd_configs:\n      - files: [pods.json]\n");
    std::fs::copy(
        deploy().join("../prometheus/motorpool.rules.yml"),
        prom_dir.join("motorpool.rules.yml"),
    )
    .unwrap();
    std::fs::write(
        prom_dir.join("prometheus.yml"),
        format!("rule_files: [motorpool.rules.yml]\n{scrape}"),
    )
    .unwrap();
    succeed(
        Command::new(which("promtool").expect("promtool"))
            .current_dir(&prom_dir)
            .args(["check", "config", "prometheus.yml"]),
    );
}
