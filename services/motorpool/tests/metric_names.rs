//! Every metric is named once, in its crate's `metric_names` module, by Prometheus's conventions;
//! the code records none by a bare string; the alert rules and the dashboard ask only for
//! metrics that exist.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Metric name -> (kind, the modules naming it), from every crate's `src/metric_names.rs`.
fn defined() -> BTreeMap<String, (String, Vec<String>)> {
    let mut out: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for group in ["services", "shared"] {
        for krate in std::fs::read_dir(root().join(group)).unwrap().flatten() {
            let module = krate.path().join("src/metric_names.rs");
            let Ok(text) = std::fs::read_to_string(&module) else {
                continue;
            };
            // Each `/// Kind[, labels ...]: help` comment, then its `pub const NAME: &str =
            // "name";` (rustfmt may break it after the `=`).
            for item in text.split("\n/// ").skip(1) {
                let kind = item
                    .split([',', ':'])
                    .next()
                    .unwrap_or_default()
                    .to_lowercase();
                let Some(name) = item
                    .split_once("pub const ")
                    .and_then(|(_, rest)| rest.split('"').nth(1))
                else {
                    continue; // the describe() comment
                };
                let entry = out
                    .entry(name.to_string())
                    .or_insert((kind.clone(), vec![]));
                assert_eq!(
                    entry.0,
                    kind,
                    "{name} is a {} in one crate and a {kind} in {}",
                    entry.0,
                    module.display()
                );
                entry.1.push(module.display().to_string());
            }
        }
    }
    out
}

#[test]
fn metrics_are_named_once_per_crate_by_prometheus_conventions() {
    let names = defined();
    assert!(names.len() > 80, "{} metrics found", names.len());
    for (name, (kind, modules)) in &names {
        assert!(
            name.starts_with("motorpool_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{name}: motorpool_<subsystem>_<name> in lower snake case"
        );
        match kind.as_str() {
            "counter" => assert!(name.ends_with("_total"), "counter {name} ends in _total"),
            "gauge" => assert!(
                !name.ends_with("_total"),
                "gauge {name} does not end in _total"
            ),
            "histogram" => assert!(
                name.ends_with("_seconds"),
                "histogram {name} is a time in seconds"
            ),
            other => panic!("{name} in {modules:?} has no kind ({other:?})"),
        }
        for unit in ["_ms", "_millis", "_kb", "_mb"] {
            assert!(!name.contains(unit), "{name}: base units (seconds, bytes)");
        }
    }
    // Shared by two services (each records it in its own process), kinds agree (checked above).
    assert_eq!(names["motorpool_alerts_total"].1.len(), 2);
}

#[test]
fn no_metric_is_recorded_by_a_bare_string() {
    let mut files = Vec::new();
    for group in ["services", "shared"] {
        for krate in std::fs::read_dir(root().join(group)).unwrap().flatten() {
            if krate.path().join("src").is_dir() {
                sources(&krate.path().join("src"), &mut files);
            }
        }
    }
    let mut bare = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            for m in ["counter!(", "gauge!(", "histogram!("] {
                if let Some(at) = line.find(m)
                    && line[at + m.len()..].trim_start().starts_with('"')
                {
                    bare.push(format!("{}:{}: {}", f.display(), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        bare.is_empty(),
        "metrics named outside metric_names:\n{}",
        bare.join("\n")
    );
}

#[test]
fn the_alert_rules_and_the_dashboard_ask_only_for_metrics_that_exist() {
    let names = defined();
    let exists = |m: &str| {
        names.contains_key(m)
            || ["_bucket", "_sum", "_count"]
                .iter()
                .any(|s| m.strip_suffix(s).is_some_and(|b| names.contains_key(b)))
    };
    for file in [
        "deploy/prometheus/motorpool.rules.yml",
        "deploy/grafana/motorpool.json",
    ] {
        let text = std::fs::read_to_string(root().join(file)).unwrap();
        let mut asked = 0;
        for (i, _) in text.match_indices("motorpool_") {
            let m: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // Rule and alert names (MotorpoolXyz) are not metrics; `motorpool_` always starts one.
            assert!(exists(&m), "{file} asks for {m}, which no crate records");
            asked += 1;
        }
        assert!(asked > 5, "{file} names {asked} metrics");
    }
}
