//! The image builder as an actor: build jobs come from per-lane JetStream queues (release by
//! default, the platform's lane rule), each job's status is kept in the KV bucket
//! `mp_v1_fleet_builds`, and a job leaves its queue only once it is done or failed for good.

use crate::{BuildError, BuildRequest, ManifestSigner, build};
use motorpool_bus::{Bus, BusError, LaneQueue, LaneQueueOptions, subjects::fleet};
use motorpool_config::FleetConfig;
use motorpool_messages::exec::Lane;
use motorpool_messages::fleet::{BuildState, BuildStatus, ImageBuildJob};
use motorpool_messages::{codec, now_ms};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

async fn put(kv: &async_nats::jetstream::kv::Store, job_id: &str, state: BuildState) {
    let s = BuildStatus {
        job_id: job_id.to_string(),
        state,
        updated_ms: now_ms(),
    };
    if let Ok(bytes) = codec::encode(&s)
        && let Err(error) = kv.put(job_id, bytes.into()).await
    {
        tracing::warn!(%error, "Cannot record a build status");
    }
}

/// Queues a build (its status `Queued`) and returns the job.
pub async fn submit(bus: &Bus, req: &BuildRequest, lane: Lane) -> Result<ImageBuildJob, BusError> {
    bus.ensure_stream(fleet::builds_stream_config()).await?;
    let kv = bus.ensure_kv(fleet::builds_config()).await?;
    let job = ImageBuildJob {
        job_id: uuid::Uuid::new_v4().simple().to_string(),
        request: req.clone(),
        lane,
        submitted_ms: now_ms(),
    };
    put(&kv, &job.job_id, BuildState::Queued).await;
    bus.enqueue(&fleet::build(lane), &job).await?;
    Ok(job)
}

/// Deliveries of a build whose tools (git, Docker) could not be reached, before it fails.
const MAX_DELIVER: i64 = 3;
/// Seconds before such a build is tried again.
const RETRY_S: u64 = 10;

/// Serves build jobs until `shutdown`.
pub async fn serve(
    bus: Bus,
    config: FleetConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // The key first: a builder that cannot sign does not take jobs.
    let signer = match &config.signing_key_file {
        Some(f) => Some(Arc::new(
            ManifestSigner::read(f).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    let kv = bus.ensure_kv(fleet::builds_config()).await?;
    let queue = LaneQueue::<ImageBuildJob>::open(
        &bus,
        fleet::builds_stream_config(),
        LaneQueueOptions {
            consumer: fleet::build_consumer,
            subject: fleet::build,
            aging_step_ms: config.aging_step_ms,
            ack_wait: Duration::from_secs(120),
            max_deliver: MAX_DELIVER,
        },
    )
    .await?;
    tracing::info!(store = %config.store_dir.display(), signed = signer.is_some(), "Image builder ready");
    let concurrency = config.concurrency;
    let config = Arc::new(config);
    queue
        .serve(concurrency, shutdown, move |delivery| {
            handle(kv.clone(), config.clone(), signer.clone(), delivery)
        })
        .await;
    Ok(())
}

async fn handle(
    kv: async_nats::jetstream::kv::Store,
    config: Arc<FleetConfig>,
    signer: Option<Arc<ManifestSigner>>,
    delivery: motorpool_bus::Delivery<ImageBuildJob>,
) {
    let job = delivery.msg.clone();
    let req = job.request.clone();
    tracing::info!(job = %job.job_id, repo = %req.repo, git_ref = %req.git_ref, lane = %job.lane, "Building an image");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let steps = {
        let (kv, id) = (kv.clone(), job.job_id.clone());
        tokio::spawn(async move {
            while let Some(step) = rx.recv().await {
                put(&kv, &id, BuildState::Running { step }).await;
            }
        })
    };
    let result = tokio::task::spawn_blocking(move || {
        build(
            &req,
            &config.store_dir,
            config.keep,
            signer.as_deref(),
            &|s| {
                let _ = tx.send(s.to_string());
            },
        )
    })
    .await
    .unwrap_or_else(|e| Err(BuildError::Request(format!("the build panicked: {e}"))));
    let _ = steps.await;
    match result {
        Ok(built) => {
            metrics::counter!(crate::metric_names::FLEET_BUILDS_TOTAL, "result" => "done")
                .increment(1);
            put(
                &kv,
                &job.job_id,
                BuildState::Done {
                    image_id: built.manifest.image.id.clone(),
                    dir: built.dir.display().to_string(),
                    blake3: built.manifest.image.blake3.clone(),
                },
            )
            .await;
            let _ = delivery.ack().await;
        }
        Err(error) if error.is_infrastructure() && delivery.delivered < MAX_DELIVER => {
            // Git or Docker could not be reached: not the build's fault, so it is tried again.
            metrics::counter!(crate::metric_names::FLEET_BUILDS_TOTAL, "result" => "retried")
                .increment(1);
            tracing::warn!(job = %job.job_id, %error, attempt = delivery.delivered, "An image build could not reach its tools; retrying");
            put(
                &kv,
                &job.job_id,
                BuildState::Running {
                    step: format!(
                        "attempt {} of {MAX_DELIVER} failed ({error}); retrying in {RETRY_S} s",
                        delivery.delivered
                    ),
                },
            )
            .await;
            let _ = delivery.nak(Duration::from_secs(RETRY_S)).await;
        }
        Err(error) => {
            metrics::counter!(crate::metric_names::FLEET_BUILDS_TOTAL, "result" => "failed")
                .increment(1);
            tracing::warn!(job = %job.job_id, %error, "An image build failed");
            put(
                &kv,
                &job.job_id,
                BuildState::Failed {
                    reason: error.to_string(),
                },
            )
            .await;
            let _ = delivery.term().await;
        }
    }
}

/// `motorpool image-builder`: connects and serves until `shutdown`.
pub async fn run(config: FleetConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.store_dir)?;
    motorpool_telemetry::with_metrics(config.http_addr, async move {
        let bus = Bus::connect_service(
            &config.nats_url,
            "motorpool-image-builder",
            config.nats_nkey_file.as_deref(),
            config.nats_tls_ca_file.as_deref(),
            Duration::from_secs(10),
        )
        .await?;
        serve(bus, config, shutdown).await
    })
    .await
}
