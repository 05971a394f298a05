//! Commit statuses on the forge a job came from: GitLab's
//! `POST /projects/:id/statuses/:sha` and GitHub's `POST /repos/:owner/:repo/statuses/:sha`,
//! one status per job kind (`motorpool/build`, `motorpool/test`, ...). A status that cannot be
//! set is logged and counted; it never fails the job.

use motorpool_config::{ForgeConfig, ForgesConfig};
use motorpool_messages::ci::{CiJob, Forge};
use std::time::Duration;

/// Where a job is, as forges show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
}

impl Status {
    /// GitLab's states: pending, running, success, failed, canceled.
    fn gitlab(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Success => "success",
            Status::Failed => "failed",
            Status::Canceled => "canceled",
        }
    }

    /// GitHub's states: pending, success, failure, error (running is pending there).
    fn github(self) -> &'static str {
        match self {
            Status::Pending | Status::Running => "pending",
            Status::Success => "success",
            Status::Failed => "failure",
            Status::Canceled => "error",
        }
    }
}

/// The forges' APIs with their tokens read.
#[derive(Clone, Default)]
pub struct Forges {
    gitlab: Option<(ForgeConfig, String)>,
    github: Option<(ForgeConfig, String)>,
}

impl Forges {
    pub fn open(config: &ForgesConfig) -> anyhow::Result<Forges> {
        let read = |c: &Option<ForgeConfig>| -> anyhow::Result<Option<(ForgeConfig, String)>> {
            let Some(c) = c else { return Ok(None) };
            let token = std::fs::read_to_string(&c.token_file)
                .map_err(|e| anyhow::anyhow!("forge token {}: {e}", c.token_file.display()))?;
            Ok(Some((c.clone(), token.trim().to_string())))
        };
        Ok(Forges {
            gitlab: read(&config.gitlab)?,
            github: read(&config.github)?,
        })
    }

    /// Sets `job`'s status on its commit. Blocking: call it off the async runtime.
    pub fn report(&self, job: &CiJob, status: Status, description: &str) {
        let Some((config, token)) = (match job.forge {
            Forge::Gitlab => &self.gitlab,
            Forge::Github => &self.github,
        }) else {
            return;
        };
        let context = format!("motorpool/{}", job.kind.name());
        let target = config
            .target_url
            .as_ref()
            .map(|t| t.replace("{job}", &job.job_id));
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        let base = config.api_url.trim_end_matches('/');
        let result = match job.forge {
            Forge::Gitlab => {
                let url = format!(
                    "{base}/projects/{}/statuses/{}",
                    encode(&job.project),
                    job.commit
                );
                let mut body = serde_json::json!({
                    "state": status.gitlab(), "name": context, "description": description,
                });
                if let Some(t) = &target {
                    body["target_url"] = t.clone().into();
                }
                agent
                    .post(&url)
                    .header("PRIVATE-TOKEN", token)
                    .header("Content-Type", "application/json")
                    .send(body.to_string())
            }
            Forge::Github => {
                let url = format!("{base}/repos/{}/statuses/{}", job.project, job.commit);
                let mut body = serde_json::json!({
                    "state": status.github(), "context": context, "description": description,
                });
                if let Some(t) = &target {
                    body["target_url"] = t.clone().into();
                }
                agent
                    .post(&url)
                    .header("Authorization", &format!("Bearer {token}"))
                    .header("Accept", "application/vnd.github+json")
                    .header("Content-Type", "application/json")
                    .send(body.to_string())
            }
        };
        let outcome = match result {
            Ok(r) if r.status().is_success() => "set",
            Ok(r) => {
                tracing::warn!(forge = %job.forge, job = %job.job_id, status = %r.status(), "The forge refused a commit status");
                "refused"
            }
            Err(error) => {
                tracing::warn!(forge = %job.forge, job = %job.job_id, %error, "Could not reach the forge for a commit status");
                "unreachable"
            }
        };
        metrics::counter!(crate::metric_names::RUNNER_FORGE_STATUSES_TOTAL, "forge" => job.forge.name(), "outcome" => outcome)
            .increment(1);
    }
}

/// A project path as one URL path segment (GitLab takes `group%2Fproject` as its id).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn project_paths_are_one_segment() {
        assert_eq!(super::encode("av/mono-repo_1.x"), "av%2Fmono-repo_1.x");
    }
}
