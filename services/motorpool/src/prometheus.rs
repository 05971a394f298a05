//! Where each service of a `motorpool up` stack serves `/metrics`, written where Prometheus
//! reads it: `<data dir>/prometheus/targets.json` (file service discovery), a
//! `prometheus.yml` that scrapes them, and the platform's alert rules beside it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The platform's alert rules (deploy/prometheus/motorpool.rules.yml).
pub const RULES: &str = include_str!("../../../deploy/prometheus/motorpool.rules.yml");

/// One service's `/metrics`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub service: String,
    pub addr: SocketAddr,
    /// Served over TLS (the gateway of a `--tls` stack).
    pub https: bool,
}

/// Hands out metrics addresses: `base`, then the ports above it, skipping any another program
/// holds; any free port when its port is 0.
pub struct Ports {
    base: SocketAddr,
    next: u16,
    /// Ports handed out: with port 0, the system may offer a port again once its probe is closed,
    /// and two services given one address would leave one unscraped and the other scraped under
    /// both names.
    given: std::collections::HashSet<u16>,
}

impl Ports {
    pub fn new(base: SocketAddr) -> Ports {
        Ports {
            base,
            next: 0,
            given: Default::default(),
        }
    }

    pub fn next(&mut self) -> anyhow::Result<SocketAddr> {
        if self.base.port() == 0 {
            for _ in 0..1000 {
                let addr = std::net::TcpListener::bind(SocketAddr::new(self.base.ip(), 0))?
                    .local_addr()?;
                if self.given.insert(addr.port()) {
                    return Ok(addr);
                }
            }
            anyhow::bail!("no free metrics port that was not handed out already");
        }
        loop {
            let port = self
                .base
                .port()
                .checked_add(self.next)
                .ok_or_else(|| anyhow::anyhow!("no free metrics port above {}", self.base))?;
            self.next += 1;
            let addr = SocketAddr::new(self.base.ip(), port);
            if std::net::TcpListener::bind(addr).is_ok() {
                return Ok(addr);
            }
        }
    }
}

/// Writes `targets.json`, `targets-https.json`, `prometheus.yml` and `motorpool.rules.yml`
/// under `dir` (made if missing); returns the configuration's path.
pub fn write(dir: &Path, targets: &[Target], tls_ca: Option<&Path>) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let groups = |https: bool| {
        let list: Vec<serde_json::Value> = targets
            .iter()
            .filter(|t| t.https == https)
            .map(|t| {
                serde_json::json!({"targets": [t.addr.to_string()], "labels": {"service": t.service}})
            })
            .collect();
        serde_json::to_string_pretty(&list)
    };
    std::fs::write(dir.join("targets.json"), groups(false)?)?;
    std::fs::write(dir.join("targets-https.json"), groups(true)?)?;
    std::fs::write(dir.join("motorpool.rules.yml"), RULES)?;
    let mut config = format!(
        "# Written by `motorpool up` at each start: Prometheus scraping this stack.\n\
         #   prometheus --config.file={} --storage.tsdb.path={}\n\
         global:\n  scrape_interval: 5s\n  evaluation_interval: 5s\n\
         rule_files:\n  - motorpool.rules.yml\n\
         scrape_configs:\n  - job_name: motorpool\n    file_sd_configs:\n      - files: [targets.json]\n",
        dir.join("prometheus.yml").display(),
        dir.join("data").display()
    );
    if let Some(ca) = tls_ca {
        config.push_str(&format!(
            "  - job_name: motorpool-https\n    scheme: https\n    tls_config:\n      ca_file: {}\n    file_sd_configs:\n      - files: [targets-https.json]\n",
            ca.display()
        ));
    }
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_count_up_from_the_base_skipping_taken_ones_or_are_any_free_ones() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = taken.local_addr().unwrap();
        let mut p = Ports::new(base);
        let got: Vec<u16> = (0..3).map(|_| p.next().unwrap().port()).collect();
        assert!(got[0] > base.port(), "the taken base is skipped: {got:?}");
        assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
        let mut any = Ports::new("127.0.0.1:0".parse().unwrap());
        assert_ne!(any.next().unwrap().port(), 0);
        // Any free ports, but never one twice (the system may offer a closed probe's port again).
        let many: std::collections::HashSet<u16> =
            (0..1000).map(|_| any.next().unwrap().port()).collect();
        assert_eq!(many.len(), 1000);
        let mut top = Ports::new("127.0.0.1:65535".parse().unwrap());
        top.next().unwrap();
        assert!(top.next().is_err(), "no port above 65535");
    }

    #[test]
    fn targets_are_grouped_by_scheme_with_their_service() {
        let dir = tempfile::tempdir().unwrap();
        let t = |service: &str, port, https| Target {
            service: service.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            https,
        };
        let config = write(
            dir.path(),
            &[t("scheduler", 9400, false), t("gateway", 8080, true)],
            Some(Path::new("/ca.pem")),
        )
        .unwrap();
        let plain: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("targets.json")).unwrap())
                .unwrap();
        assert_eq!(
            plain,
            serde_json::json!([{"targets": ["127.0.0.1:9400"], "labels": {"service": "scheduler"}}])
        );
        let text = std::fs::read_to_string(config).unwrap();
        assert!(text.contains("ca_file: /ca.pem") && text.contains("targets-https.json"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("motorpool.rules.yml")).unwrap(),
            RULES
        );
    }
}
