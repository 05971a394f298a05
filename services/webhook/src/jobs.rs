//! From an event to queued jobs: which jobs a project's rules make ([`plan`]), and queueing
//! them exactly once per delivery ([`Queue::submit`]).
//!
//! Exactly once, across restarts and several webhook replicas:
//! 1. The delivery is claimed in the KV bucket `mp_v1_ci_deliveries` with a create, which only
//!    one writer wins. A redelivery finds the claim and makes nothing.
//! 2. Each job gets its status (`Queued`) and is published under its id, which is derived from
//!    the delivery: JetStream stores a job id once within its duplicate window.
//! 3. The claim is marked queued. A claim left unmarked (the service died between 1 and 3) is
//!    finished by the next delivery of the same event, with the same job ids.
//!
//! A tag also queues the fleet images its project builds from tags ([`plan_images`]): the same
//! claim covers them, their status goes to the image builders' KV bucket and the job to their
//! lane queue, each once, the same way.

use crate::events::Event;
use crate::projects::{ImageTemplate, JobTemplate, On, Project};
use motorpool_bus::{
    Bus, BusError,
    subjects::{ci, fleet},
};
use motorpool_messages::ci::{
    CiJob, DeliveryRecord, JobKind, JobState, JobStatus, MergeRequestJobs, Trigger,
};
use motorpool_messages::exec::Lane;
use motorpool_messages::fleet::{BuildRequest, BuildState, BuildStatus, ImageBuildJob};
use motorpool_messages::{codec, now_ms};
use sha2::{Digest, Sha256};

/// The jobs `event` makes for `project`, with ids derived from `delivery_key`.
pub fn plan(project: &Project, event: &Event, delivery_key: &str, delivery: &str) -> Vec<CiJob> {
    let (on, trusted, release_too, label_lane) = match &event.trigger {
        Trigger::MergeRequest { labels, .. } => {
            let release = labels.iter().any(|l| project.release_labels.contains(l));
            let lane = labels
                .iter()
                .filter_map(|l| project.labels.get(l))
                .max_by_key(|lane| lane.rank())
                .copied();
            (On::MergeRequest, false, release, lane)
        }
        Trigger::Push { branch } => {
            if !project.trusts(branch) {
                return Vec::new();
            }
            (On::Push, true, false, None)
        }
        Trigger::Tag { .. } => (On::Tag, true, false, Some(Lane::Release)),
        // API jobs are made one at a time, by `job`.
        Trigger::Api { .. } => return Vec::new(),
    };
    project
        .jobs
        .iter()
        .filter(|t| t.answers(on) || (release_too && t.kind == JobKind::Release))
        .enumerate()
        .map(|(i, t)| {
            let lane = label_lane.unwrap_or(t.kind.lane());
            job(
                project,
                t,
                event,
                &job_id(delivery_key, i),
                lane,
                trusted,
                delivery,
            )
        })
        .collect()
}

/// One job of template `t` for `event`.
pub fn job(
    project: &Project,
    t: &JobTemplate,
    event: &Event,
    job_id: &str,
    lane: Lane,
    trusted: bool,
    delivery: &str,
) -> CiJob {
    CiJob {
        job_id: job_id.to_string(),
        project: project.name.clone(),
        forge: project.forge,
        clone_url: project
            .clone_url
            .clone()
            .unwrap_or_else(|| event.clone_url.clone()),
        commit: event.commit.clone(),
        git_ref: event.git_ref.clone(),
        kind: t.kind,
        lane,
        command: t.command().to_string(),
        targets: t.targets.clone(),
        flags: t.flags.clone(),
        trigger: event.trigger.clone(),
        requested_by: event.user.clone(),
        trusted,
        delivery: delivery.to_string(),
        queued_ms: now_ms(),
    }
}

/// The image builds a tag makes for `project`: one per image whose tag patterns match, built
/// from the tag's commit (a tag moved later does not change what is built).
pub fn plan_images(project: &Project, event: &Event, delivery_key: &str) -> Vec<ImageBuildJob> {
    let Trigger::Tag { tag } = &event.trigger else {
        return Vec::new();
    };
    project
        .images
        .iter()
        .filter(|t| t.built_by(tag))
        .map(|t| image_job(project, t, event, tag, &image_job_id(delivery_key, &t.name)))
        .collect()
}

/// One build of image `t` at `event`'s commit, named after `tag`.
pub fn image_job(
    project: &Project,
    t: &ImageTemplate,
    event: &Event,
    tag: &str,
    job_id: &str,
) -> ImageBuildJob {
    ImageBuildJob {
        job_id: job_id.to_string(),
        request: BuildRequest {
            repo: project
                .clone_url
                .clone()
                .unwrap_or_else(|| event.clone_url.clone()),
            git_ref: event.commit.clone(),
            dockerfile: t.dockerfile.clone(),
            context: t.context.clone(),
            build_args: t
                .build_args
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            channel: t.channel.clone(),
            image_id: Some(t.image_id(tag, &event.commit)),
        },
        lane: t.lane,
        submitted_ms: now_ms(),
    }
}

pub fn image_job_id(delivery_key: &str, image: &str) -> String {
    let h = Sha256::digest(format!("{delivery_key}/image/{image}"));
    hex::encode(&h[..16])
}

/// The KV key of a delivery: a hash, so any id a forge sends makes a valid key.
pub fn delivery_key(project: &Project, delivery: &str) -> String {
    let h = Sha256::digest(format!("{}\n{}\n{delivery}", project.forge, project.name));
    hex::encode(&h[..16])
}

pub fn job_id(delivery_key: &str, index: usize) -> String {
    let h = Sha256::digest(format!("{delivery_key}/{index}"));
    hex::encode(&h[..16])
}

fn merge_request_key(project: &str, number: u64) -> String {
    let h = Sha256::digest(project.as_bytes());
    format!("{}.{number}", hex::encode(&h[..8]))
}

/// What one delivery queues: CI jobs and fleet image builds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Planned {
    pub jobs: Vec<CiJob>,
    pub images: Vec<ImageBuildJob>,
}

impl Planned {
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty() && self.images.is_empty()
    }
}

/// The `what` at `key`, decoded; `None` when there is none.
async fn get<M: motorpool_messages::Message>(
    kv: &async_nats::jetstream::kv::Store,
    key: &str,
    what: &str,
) -> Result<Option<M>, BusError> {
    let Some(bytes) = kv
        .get(key)
        .await
        .map_err(|e| BusError::JetStream(format!("get {what} {key}: {e}")))?
    else {
        return Ok(None);
    };
    Ok(Some(codec::decode(&bytes)?))
}

/// Writes `value` at `key` unless there is a value already: a status written since (by a runner
/// or a builder) is never undone by a delivery finished again.
async fn create_once<M: motorpool_messages::Message>(
    kv: &async_nats::jetstream::kv::Store,
    key: &str,
    value: &M,
    what: &str,
) -> Result<(), BusError> {
    use async_nats::jetstream::kv::CreateErrorKind;
    match kv.create(key, codec::encode(value)?.into()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(BusError::JetStream(format!("put {what} {key}: {e}"))),
    }
}

/// What a submission did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Queued(Planned),
    /// This delivery was seen before: the ids of what it queued then.
    Duplicate(Vec<String>),
}

/// The CI queues, the image builders' queue, and their KV buckets.
#[derive(Clone)]
pub struct Queue {
    bus: Bus,
    jobs: async_nats::jetstream::kv::Store,
    deliveries: async_nats::jetstream::kv::Store,
    merge_requests: async_nats::jetstream::kv::Store,
    builds: async_nats::jetstream::kv::Store,
}

impl Queue {
    pub async fn open(bus: Bus) -> Result<Queue, BusError> {
        bus.ensure_stream(ci::jobs_stream_config()).await?;
        bus.ensure_stream(fleet::builds_stream_config()).await?;
        Ok(Queue {
            jobs: bus.ensure_kv(ci::jobs_config()).await?,
            deliveries: bus.ensure_kv(ci::deliveries_config()).await?,
            merge_requests: bus.ensure_kv(ci::merge_requests_config()).await?,
            builds: bus.ensure_kv(fleet::builds_config()).await?,
            bus,
        })
    }

    /// An image build's status.
    pub async fn build_status(&self, job_id: &str) -> Result<Option<BuildStatus>, BusError> {
        get(&self.builds, job_id, "build").await
    }

    /// Records a build as queued unless a builder has written its status already.
    async fn record_build_queued(&self, job: &ImageBuildJob) -> Result<(), BusError> {
        let status = BuildStatus {
            job_id: job.job_id.clone(),
            state: BuildState::Queued,
            updated_ms: now_ms(),
        };
        create_once(&self.builds, &job.job_id, &status, "build").await
    }

    /// A job's status.
    pub async fn status(&self, job_id: &str) -> Result<Option<JobStatus>, BusError> {
        get(&self.jobs, job_id, "job").await
    }

    /// Records a job as queued, unless it has a status already (a half-queued delivery finished
    /// again must not undo what a runner wrote).
    async fn record_queued(&self, job: &CiJob) -> Result<(), BusError> {
        let status = JobStatus::queued(job.clone(), now_ms());
        create_once(&self.jobs, &job.job_id, &status, "job").await
    }

    /// Queues what `planned` holds for the delivery `key` unless it was queued before;
    /// supersedes the older queued jobs of the same merge request when `supersede` is set.
    pub async fn submit(
        &self,
        key: &str,
        planned: Planned,
        supersede: bool,
    ) -> Result<Outcome, BusError> {
        use async_nats::jetstream::kv::CreateErrorKind;
        let Planned { jobs, images } = &planned;
        let record = |queued| DeliveryRecord {
            job_ids: jobs
                .iter()
                .map(|j| j.job_id.clone())
                .chain(images.iter().map(|i| i.job_id.clone()))
                .collect(),
            queued,
            received_ms: now_ms(),
        };
        match self
            .deliveries
            .create(key, codec::encode(&record(false))?.into())
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                let seen: Option<DeliveryRecord> = match self.deliveries.get(key).await {
                    Ok(Some(b)) => Some(codec::decode(&b)?),
                    Ok(None) => None,
                    Err(e) => return Err(BusError::JetStream(format!("get delivery: {e}"))),
                };
                match seen {
                    Some(r) if r.queued => return Ok(Outcome::Duplicate(r.job_ids)),
                    // Claimed but never finished: finish it now, with the same ids.
                    _ => tracing::warn!(delivery = %key, "Finishing a delivery left half-queued"),
                }
            }
            Err(e) => return Err(BusError::JetStream(format!("claim delivery: {e}"))),
        }
        for job in jobs {
            self.record_queued(job).await?;
            self.bus
                .enqueue_once(&ci::run(job.lane), job, &job.job_id)
                .await?;
            metrics::counter!(crate::metric_names::CI_JOBS_QUEUED_TOTAL, "lane" => job.lane.name(), "kind" => job.kind.name())
                .increment(1);
        }
        for image in images {
            self.record_build_queued(image).await?;
            self.bus
                .enqueue_once(&fleet::build(image.lane), image, &image.job_id)
                .await?;
            metrics::counter!(crate::metric_names::CI_IMAGES_QUEUED_TOTAL, "lane" => image.lane.name())
                .increment(1);
        }
        self.deliveries
            .put(key, codec::encode(&record(true))?.into())
            .await
            .map_err(|e| BusError::JetStream(format!("mark delivery queued: {e}")))?;
        if let Some(first) = jobs.first()
            && let Trigger::MergeRequest { number, .. } = first.trigger
        {
            self.supersede(&first.project, number, &first.commit, jobs, supersede)
                .await?;
        }
        Ok(Outcome::Queued(planned))
    }

    /// Records `jobs` as the merge request's newest, and marks the older commit's jobs that are
    /// still queued as superseded (runners skip them).
    async fn supersede(
        &self,
        project: &str,
        number: u64,
        commit: &str,
        jobs: &[CiJob],
        cancel_older: bool,
    ) -> Result<(), BusError> {
        let key = merge_request_key(project, number);
        let before: Option<MergeRequestJobs> = match self.merge_requests.get(&key).await {
            Ok(Some(b)) => codec::decode(&b).ok(),
            Ok(None) => None,
            Err(e) => return Err(BusError::JetStream(format!("get merge request: {e}"))),
        };
        let mut ids: Vec<String> = jobs.iter().map(|j| j.job_id.clone()).collect();
        if let Some(before) = before {
            if before.commit == commit {
                // Another event for the same commit (a reopen, a second hook): keep both.
                for id in before.job_ids {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            } else if cancel_older {
                for id in &before.job_ids {
                    // Only a job still queued, and only if no runner took it in between: the
                    // write names the revision it read.
                    let Ok(Some(entry)) = self.jobs.entry(id).await else {
                        continue;
                    };
                    let Ok(mut s) = codec::decode::<JobStatus>(&entry.value) else {
                        continue;
                    };
                    if s.state != JobState::Queued {
                        continue;
                    }
                    s.state = JobState::Superseded {
                        by_commit: commit.to_string(),
                    };
                    s.updated_ms = now_ms();
                    if self
                        .jobs
                        .update(id, codec::encode(&s)?.into(), entry.revision)
                        .await
                        .is_ok()
                    {
                        metrics::counter!(crate::metric_names::CI_JOBS_SUPERSEDED_TOTAL)
                            .increment(1);
                    }
                }
            }
        }
        let newest = MergeRequestJobs {
            commit: commit.to_string(),
            job_ids: ids,
        };
        self.merge_requests
            .put(&key, codec::encode(&newest)?.into())
            .await
            .map_err(|e| BusError::JetStream(format!("put merge request: {e}")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use motorpool_messages::ci::Forge;

    fn project() -> Project {
        let t = |kind, on: Option<Vec<On>>| JobTemplate {
            kind,
            command: None,
            targets: vec!["//...".into()],
            flags: vec![],
            on,
        };
        Project {
            name: "av/monorepo".into(),
            forge: Forge::Gitlab,
            secret: b"x".to_vec(),
            clone_url: Some("file:///srv/git/monorepo.git".into()),
            trusted_branches: vec!["main".into()],
            release_labels: vec!["release".into()],
            labels: [
                ("priority::low".to_string(), Lane::Lint),
                ("priority::high".to_string(), Lane::Build),
            ]
            .into(),
            cancel_superseded: true,
            jobs: vec![
                t(JobKind::Build, None),
                t(JobKind::Test, None),
                t(JobKind::Lint, Some(vec![On::MergeRequest])),
                t(JobKind::Release, None),
            ],
            images: vec![ImageTemplate {
                name: "car".into(),
                dockerfile: "images/car/Dockerfile".into(),
                context: "images/car".into(),
                channel: "stable".into(),
                tags: vec!["v*".into()],
                build_args: [("BASE".to_string(), "bookworm".to_string())].into(),
                lane: Lane::Release,
            }],
        }
    }

    fn event(trigger: Trigger) -> Event {
        Event {
            project: "av/monorepo".into(),
            clone_url: "https://forge/av/monorepo.git".into(),
            commit: "a".repeat(40),
            git_ref: "refs/x".into(),
            trigger,
            user: "dev".into(),
        }
    }

    fn mr(labels: &[&str]) -> Trigger {
        Trigger::MergeRequest {
            number: 3,
            source_branch: "feat".into(),
            target_branch: "main".into(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn kinds_and_lanes(jobs: &[CiJob]) -> Vec<(JobKind, Lane)> {
        jobs.iter().map(|j| (j.kind, j.lane)).collect()
    }

    #[test]
    fn each_trigger_earns_its_jobs_lanes_and_trust() {
        let p = project();
        let jobs = plan(&p, &event(mr(&[])), "k", "d");
        assert_eq!(
            kinds_and_lanes(&jobs),
            [
                (JobKind::Build, Lane::Build),
                (JobKind::Test, Lane::Test),
                (JobKind::Lint, Lane::Lint)
            ]
        );
        assert!(
            jobs.iter().all(|j| !j.trusted),
            "a merge request's code is not trusted"
        );
        assert_eq!(
            jobs[0].clone_url, "file:///srv/git/monorepo.git",
            "the configured URL wins"
        );
        assert_eq!(jobs[1].command, "test");

        // A release label adds the release job; priority labels move every job, the highest wins.
        let jobs = plan(
            &p,
            &event(mr(&["release", "priority::low", "priority::high"])),
            "k",
            "d",
        );
        assert_eq!(jobs.len(), 4);
        assert!(
            jobs.iter().all(|j| j.lane == Lane::Build),
            "{:?}",
            kinds_and_lanes(&jobs)
        );
        let low = plan(&p, &event(mr(&["priority::low"])), "k", "d");
        assert!(low.iter().all(|j| j.lane == Lane::Lint));

        let tag = plan(&p, &event(Trigger::Tag { tag: "v1".into() }), "k", "d");
        assert_eq!(kinds_and_lanes(&tag), [(JobKind::Release, Lane::Release)]);
        assert!(tag[0].trusted);

        let main = plan(
            &p,
            &event(Trigger::Push {
                branch: "main".into(),
            }),
            "k",
            "d",
        );
        assert_eq!(
            kinds_and_lanes(&main),
            [(JobKind::Build, Lane::Build), (JobKind::Test, Lane::Test)]
        );
        assert!(main.iter().all(|j| j.trusted));
        assert!(
            plan(
                &p,
                &event(Trigger::Push {
                    branch: "feat".into()
                }),
                "k",
                "d"
            )
            .is_empty()
        );

        // Ids follow the delivery: the same delivery makes the same ids, another makes others.
        let again = plan(&p, &event(mr(&[])), "k", "d");
        assert_eq!(
            again[0].job_id,
            plan(&p, &event(mr(&[])), "k", "d")[0].job_id
        );
        assert_ne!(
            again[0].job_id,
            plan(&p, &event(mr(&[])), "k2", "d")[0].job_id
        );
        assert_ne!(again[0].job_id, again[1].job_id);
        assert_eq!(again[0].job_id.len(), 32);
    }

    #[test]
    fn tags_build_the_images_whose_patterns_they_match_pinned_to_the_commit() {
        let p = project();
        let tag = |t: &str| event(Trigger::Tag { tag: t.into() });
        let images = plan_images(&p, &tag("v2.1"), "k");
        assert_eq!(images.len(), 1);
        let b = &images[0];
        assert_eq!(b.lane, Lane::Release);
        assert_eq!(b.request.image_id.as_deref(), Some("car-v2.1"));
        assert_eq!(
            b.request.git_ref,
            "a".repeat(40),
            "the tag's commit, not the tag"
        );
        assert_eq!(b.request.repo, "file:///srv/git/monorepo.git");
        assert_eq!(b.request.channel, "stable");
        assert_eq!(b.request.build_args, [("BASE".into(), "bookworm".into())]);
        assert_eq!(b.job_id, plan_images(&p, &tag("v2.1"), "k")[0].job_id);
        assert_ne!(b.job_id, plan_images(&p, &tag("v2.1"), "k2")[0].job_id);
        assert_ne!(b.job_id, job_id("k", 0), "image and CI job ids never meet");

        // Other tags, branches and merge requests build no image.
        assert!(plan_images(&p, &tag("nightly-3"), "k").is_empty());
        assert!(plan_images(&p, &event(mr(&["release"])), "k").is_empty());
        let main = Trigger::Push {
            branch: "main".into(),
        };
        assert!(plan_images(&p, &event(main), "k").is_empty());

        // A tag an image id cannot hold names the image after its commit instead.
        for awkward in ["v2/rc1", "v1.0.0-build.20261205.12", "v1+x"] {
            let b = &plan_images(&p, &tag(awkward), "k")[0];
            assert_eq!(
                b.request.image_id.as_deref(),
                Some("car-aaaaaaaaaaaa"),
                "{awkward}"
            );
        }
    }
}
