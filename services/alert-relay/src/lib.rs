//! The alert relay: the platform's alerts reach people.
//!
//! Services raise an [`Alert`] on the bus (`mp.v1.ops.alert.raise.<kind>`: retries exhausted, a
//! worker lost, a CI job given up); JetStream keeps them in `MP_V1_ALERTS`. The relay reads that
//! stream with a durable consumer and delivers each alert to every configured sink that wants
//! its kind:
//!
//! - **Alertmanager** (`POST <url>/api/v2/alerts`): labels `alertname` (`Motorpool` and the
//!   kind in camel case), `kind`, `source`, `subject`, `origin="bus"`; the message as the
//!   `summary` annotation; firing for the dedupe window. Alertmanager then groups, silences and
//!   routes them like the Prometheus rules' alerts.
//! - **Slack** incoming webhooks (`{"text": ...}`) and **Feishu** custom bots (`{"msg_type":
//!   "text", ...}`).
//!
//! **Once.** An alert of the same kind about the same thing reaches each sink once per
//! `dedupe_s`. An alert is acknowledged on the stream only when every sink took it (or skipped
//! it on purpose); a sink that fails gets it again with a growing delay (5 s to 5 min), the
//! others do not (they are in the dedupe window). Delivery is at least once across a relay's
//! crash between a sink's answer and the acknowledgement; run one relay per deployment.
//!
//! **Rate.** A chat sink takes at most `chat_per_minute` alerts a minute; the rest are counted,
//! never dropped silently: the count (by kind) goes out with the next message, or on its own
//! once the minute has passed.

pub mod metric_names;
use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use motorpool_bus::{Bus, subjects};
use motorpool_config::{AlertRelayConfig, AlertSink, AlertSinkKind};
use motorpool_messages::exec::Alert;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The durable consumer's name on the alerts stream.
pub const CONSUMER: &str = "alert-relay";

/// What was done with one alert for one sink.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// The sink does not take this kind.
    NotWanted,
    /// The same alert reached this sink within the dedupe window.
    Duplicate,
    /// Over the chat sink's rate: counted, reported with a later message.
    Held,
    Failed(String),
}

/// One sink and what it has been sent.
struct Sink {
    config: AlertSink,
    /// `(kind, subject)` -> when it was last delivered.
    sent: HashMap<(String, String), Instant>,
    /// The current minute of a chat sink: its start and how many went out in it.
    minute: (Instant, u32),
    /// Alerts held back by the rate, by kind, not yet reported.
    held: BTreeMap<String, u32>,
}

impl Sink {
    fn name(&self) -> &'static str {
        match self.config.kind {
            AlertSinkKind::Alertmanager => "alertmanager",
            AlertSinkKind::Slack => "slack",
            AlertSinkKind::Feishu => "feishu",
        }
    }

    fn is_chat(&self) -> bool {
        self.config.kind != AlertSinkKind::Alertmanager
    }

    /// Takes a place in this minute's allowance (always, for an Alertmanager).
    fn admit(&mut self, now: Instant, per_minute: u32) -> bool {
        if !self.is_chat() {
            return true;
        }
        if now.duration_since(self.minute.0) >= Duration::from_secs(60) {
            self.minute = (now, 0);
        }
        if self.minute.1 < per_minute.max(1) {
            self.minute.1 += 1;
            true
        } else {
            false
        }
    }

    /// "N more held back by the rate limit (kind: n, ...)" for the next message, if any.
    fn held_note(&self) -> Option<String> {
        let n: u32 = self.held.values().sum();
        (n > 0).then(|| {
            let kinds: Vec<String> = self.held.iter().map(|(k, n)| format!("{k}: {n}")).collect();
            format!(
                "{n} more alert(s) held back by the rate limit ({})",
                kinds.join(", ")
            )
        })
    }
}

/// The relay's decisions, apart from the bus: testable on its own.
pub struct Relay {
    sinks: Vec<Sink>,
    dedupe: Duration,
    per_minute: u32,
    agent: ureq::Agent,
}

impl Relay {
    /// Checks the configuration: at least one sink, each with an http(s) URL.
    pub fn new(config: &AlertRelayConfig) -> anyhow::Result<Relay> {
        anyhow::ensure!(
            !config.sinks.is_empty(),
            "no sinks: add [[sinks]] entries (kind = \"alertmanager\", \"slack\" or \"feishu\", \
             url = ...) to the configuration, or --alertmanager-url / --slack-webhook-url / \
             --feishu-webhook-url"
        );
        for s in &config.sinks {
            anyhow::ensure!(
                s.url.starts_with("http://") || s.url.starts_with("https://"),
                "sink {:?}: {:?} is not an http:// or https:// URL",
                s.kind,
                s.url
            );
        }
        let now = Instant::now();
        Ok(Relay {
            sinks: config
                .sinks
                .iter()
                .map(|c| Sink {
                    config: c.clone(),
                    sent: HashMap::new(),
                    minute: (now, 0),
                    held: BTreeMap::new(),
                })
                .collect(),
            dedupe: Duration::from_secs(config.dedupe_s),
            per_minute: config.chat_per_minute,
            agent: ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(10)))
                .http_status_as_error(false)
                .build()
                .new_agent(),
        })
    }

    /// Delivers `alert` to every sink that should get it; one verdict per sink, in order.
    pub async fn deliver(&mut self, alert: &Alert, now: Instant) -> Vec<Verdict> {
        let key = (alert.kind.clone(), alert.subject_id.clone());
        let (dedupe, per_minute) = (self.dedupe, self.per_minute);
        let mut out = Vec::new();
        for sink in &mut self.sinks {
            sink.sent.retain(|_, at| now.duration_since(*at) < dedupe);
            let verdict = if !sink.config.kinds.is_empty()
                && !sink.config.kinds.contains(&alert.kind)
            {
                Verdict::NotWanted
            } else if sink.sent.contains_key(&key) {
                Verdict::Duplicate
            } else if !sink.admit(now, per_minute) {
                *sink.held.entry(alert.kind.clone()).or_default() += 1;
                Verdict::Held
            } else {
                let body = payload(sink.config.kind, alert, sink.held_note().as_deref(), dedupe);
                match post(&self.agent, sink.config.kind, &sink.config.url, body).await {
                    Ok(()) => {
                        sink.sent.insert(key.clone(), now);
                        sink.held.clear();
                        Verdict::Delivered
                    }
                    Err(e) => Verdict::Failed(e),
                }
            };
            let outcome = match &verdict {
                Verdict::Delivered => "delivered",
                Verdict::NotWanted => "not_wanted",
                Verdict::Duplicate => "duplicate",
                Verdict::Held => "held",
                Verdict::Failed(_) => "failed",
            };
            metrics::counter!(crate::metric_names::ALERT_RELAY_ALERTS_TOTAL, "sink" => sink.name(), "outcome" => outcome)
                .increment(1);
            out.push(verdict);
        }
        out
    }

    /// Sends each chat sink's count of held-back alerts on its own once a new minute allows.
    pub async fn report_held(&mut self, now: Instant) {
        let per_minute = self.per_minute;
        for sink in &mut self.sinks {
            let Some(note) = sink.held_note() else {
                continue;
            };
            if !sink.admit(now, per_minute) {
                continue;
            }
            let body = chat_body(sink.config.kind, &format!("[motorpool] {note}"));
            match post(&self.agent, sink.config.kind, &sink.config.url, body).await {
                Ok(()) => sink.held.clear(),
                Err(error) => {
                    tracing::warn!(sink = sink.name(), %error, "Cannot report held alerts")
                }
            }
        }
    }
}

/// `retries_exhausted` -> `MotorpoolRetriesExhausted`.
fn alert_name(kind: &str) -> String {
    let mut out = String::from("Motorpool");
    for word in kind.split(['_', '-', '.']).filter(|w| !w.is_empty()) {
        let mut c = word.chars();
        if let Some(first) = c.next() {
            out.extend(first.to_uppercase());
            out.push_str(c.as_str());
        }
    }
    out
}

fn rfc3339(ms: u64) -> String {
    let t = time::OffsetDateTime::UNIX_EPOCH + Duration::from_millis(ms);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The body a sink of `kind` gets for `alert`.
pub fn payload(
    kind: AlertSinkKind,
    alert: &Alert,
    held: Option<&str>,
    firing_for: Duration,
) -> serde_json::Value {
    match kind {
        AlertSinkKind::Alertmanager => {
            let now = motorpool_messages::now_ms();
            serde_json::json!([{
                "labels": {
                    "alertname": alert_name(&alert.kind),
                    "kind": alert.kind,
                    "source": alert.source,
                    "subject": alert.subject_id,
                    "origin": "bus",
                    "severity": "warning",
                },
                "annotations": {"summary": alert.message},
                "startsAt": rfc3339(alert.at_ms),
                "endsAt": rfc3339(now.max(alert.at_ms) + firing_for.as_millis() as u64),
            }])
        }
        chat => {
            let mut text = format!(
                "[motorpool] {} from {} about {}: {}",
                alert.kind, alert.source, alert.subject_id, alert.message
            );
            if let Some(h) = held {
                text.push_str(&format!("\n({h})"));
            }
            chat_body(chat, &text)
        }
    }
}

fn chat_body(kind: AlertSinkKind, text: &str) -> serde_json::Value {
    match kind {
        AlertSinkKind::Feishu => serde_json::json!({"msg_type": "text", "content": {"text": text}}),
        _ => serde_json::json!({ "text": text }),
    }
}

/// Posts `body`; a 2xx answer is success, except a Feishu answer whose `code` is not 0.
async fn post(
    agent: &ureq::Agent,
    kind: AlertSinkKind,
    url: &str,
    body: serde_json::Value,
) -> Result<(), String> {
    let target = match kind {
        AlertSinkKind::Alertmanager => format!("{}/api/v2/alerts", url.trim_end_matches('/')),
        _ => url.to_string(),
    };
    let agent = agent.clone();
    tokio::task::spawn_blocking(move || {
        // A chat webhook's path is its secret: errors name the host only.
        let shown = host_of(&target);
        let mut resp = agent
            .post(&target)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| format!("{shown}: {}", e.to_string().replace(&target, &shown)))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        if !(200..300).contains(&status) {
            return Err(format!(
                "{shown} answered {status}: {}",
                text.chars().take(200).collect::<String>()
            ));
        }
        if kind == AlertSinkKind::Feishu
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(code) = v["code"].as_i64().filter(|c| *c != 0)
        {
            return Err(format!(
                "{shown} refused the message: code {code}, {}",
                v["msg"]
            ));
        }
        Ok(())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// `scheme://host[:port]/…` of a URL: what may be logged of a webhook whose path is a secret.
fn host_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit('@').next().unwrap_or_default();
    format!("{scheme}://{host}/…")
}

/// The delay before a failed delivery is tried again: 5 s, doubling, at most 5 minutes.
fn retry_delay(delivered: i64) -> Duration {
    Duration::from_secs(5u64.saturating_mul(1 << delivered.clamp(1, 7).saturating_sub(1) as u32))
        .min(Duration::from_secs(300))
}

/// Reads the alerts stream and delivers until `shutdown`.
pub async fn serve(
    bus: Bus,
    config: AlertRelayConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut relay = Relay::new(&config)?;
    let stream = bus
        .ensure_stream(subjects::ops::alerts_stream_config())
        .await?;
    // A first start also delivers what was raised in the last dedupe window.
    let since = time::OffsetDateTime::now_utc() - Duration::from_secs(config.dedupe_s);
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.into()),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartTime {
                    start_time: since,
                },
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(120),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("consumer {CONSUMER} on the alerts stream: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("reading the alerts stream: {e}"))?;
    tracing::info!(sinks = config.sinks.len(), "Alert relay is running");
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => relay.report_held(Instant::now()).await,
            next = messages.next() => {
                let Some(next) = next else { break };
                let msg = match next {
                    Ok(m) => m,
                    Err(error) => {
                        tracing::warn!(%error, "Alerts stream");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let alert = match motorpool_messages::decode::<Alert>(&msg.payload) {
                    Ok(a) => a,
                    Err(error) => {
                        tracing::warn!(subject = %msg.subject, %error, "Not an alert; dropped");
                        metrics::counter!(crate::metric_names::ALERT_RELAY_MALFORMED_TOTAL).increment(1);
                        let _ = msg.ack_with(AckKind::Term).await;
                        continue;
                    }
                };
                let verdicts = relay.deliver(&alert, Instant::now()).await;
                let failed: Vec<&String> = verdicts
                    .iter()
                    .filter_map(|v| match v {
                        Verdict::Failed(e) => Some(e),
                        _ => None,
                    })
                    .collect();
                if failed.is_empty() {
                    let _ = msg.ack().await;
                } else {
                    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
                    let delay = retry_delay(delivered);
                    tracing::warn!(kind = %alert.kind, subject = %alert.subject_id, errors = ?failed, ?delay, "A sink did not take an alert; trying again");
                    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                }
            }
        }
    }
    Ok(())
}

/// `motorpool alert-relay`: connects and serves until `shutdown`.
pub async fn run(config: AlertRelayConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    Relay::new(&config)?;
    motorpool_telemetry::with_metrics(config.http_addr, async move {
        let bus = Bus::connect_service(
            &config.nats_url,
            "motorpool-alert-relay",
            config.nats_nkey_file.as_deref(),
            config.nats_tls_ca_file.as_deref(),
            Duration::from_secs(10),
        )
        .await?;
        serve(bus, config, shutdown).await
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{App, HttpResponse, HttpServer, web};
    use parking_lot::Mutex;
    use std::sync::Arc;

    /// A webhook that records what it gets and answers with `status`.
    fn recorder(status: Arc<Mutex<u16>>) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
        let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let g = got.clone();
        let server = HttpServer::new(move || {
            let (g, status) = (g.clone(), status.clone());
            App::new().default_service(web::to(move |body: web::Bytes| {
                let (g, status) = (g.clone(), status.clone());
                async move {
                    let code = *status.lock();
                    if code == 200 {
                        g.lock().push(serde_json::from_slice(&body).unwrap());
                    }
                    HttpResponse::build(actix_web::http::StatusCode::from_u16(code).unwrap())
                        .body("ok")
                }
            }))
        })
        .workers(1)
        .bind("127.0.0.1:0")
        .unwrap();
        let addr = server.addrs()[0];
        tokio::spawn(server.run());
        (format!("http://{addr}/hook"), got)
    }

    fn alert(kind: &str, subject: &str) -> Alert {
        Alert {
            kind: kind.into(),
            source: "scheduler".into(),
            subject_id: subject.into(),
            message: format!("{subject} <b>failed</b>"),
            at_ms: 1_765_000_000_000,
        }
    }

    fn config(sinks: Vec<AlertSink>) -> AlertRelayConfig {
        AlertRelayConfig {
            sinks,
            chat_per_minute: 2,
            dedupe_s: 600,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn duplicates_go_out_once_and_a_chat_sinks_excess_is_counted_not_lost() {
        let ok = Arc::new(Mutex::new(200));
        let (url, got) = recorder(ok.clone());
        let sink = |kinds: Vec<String>| AlertSink {
            kind: AlertSinkKind::Slack,
            url: url.clone(),
            kinds,
        };
        let mut relay = Relay::new(&config(vec![
            sink(vec![]),
            sink(vec!["worker_lost".into()]),
        ]))
        .unwrap();
        let t0 = Instant::now();
        use Verdict::*;
        assert_eq!(
            relay.deliver(&alert("retries_exhausted", "op-1"), t0).await,
            [Delivered, NotWanted]
        );
        assert_eq!(
            relay.deliver(&alert("retries_exhausted", "op-1"), t0).await,
            [Duplicate, NotWanted],
            "the same alert again: not sent again"
        );
        assert_eq!(
            relay.deliver(&alert("worker_lost", "w1"), t0).await,
            [Delivered, Delivered]
        );
        // The first sink has had its two for this minute.
        assert_eq!(
            relay.deliver(&alert("retries_exhausted", "op-2"), t0).await,
            [Held, NotWanted]
        );
        assert_eq!(
            relay.deliver(&alert("retries_exhausted", "op-3"), t0).await,
            [Held, NotWanted]
        );
        relay.report_held(t0 + Duration::from_secs(30)).await;
        assert_eq!(got.lock().len(), 3, "still within the minute");
        relay.report_held(t0 + Duration::from_secs(61)).await;
        let texts: Vec<String> = got
            .lock()
            .iter()
            .map(|v| v["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(texts.len(), 4, "{texts:?}");
        assert_eq!(
            texts[0],
            "[motorpool] retries_exhausted from scheduler about op-1: op-1 <b>failed</b>"
        );
        assert_eq!(
            texts[3],
            "[motorpool] 2 more alert(s) held back by the rate limit (retries_exhausted: 2)"
        );
        // Past the dedupe window the same alert goes out again.
        assert_eq!(
            relay
                .deliver(
                    &alert("retries_exhausted", "op-1"),
                    t0 + Duration::from_secs(700)
                )
                .await,
            [Delivered, NotWanted]
        );
    }

    #[tokio::test]
    async fn a_failing_sink_is_retried_alone_and_feishu_refusals_are_failures() {
        let down = Arc::new(Mutex::new(503));
        let (bad, _) = recorder(down.clone());
        let (good, got) = recorder(Arc::new(Mutex::new(200)));
        let mut relay = Relay::new(&config(vec![
            AlertSink {
                kind: AlertSinkKind::Alertmanager,
                url: bad.trim_end_matches("/hook").into(),
                kinds: vec![],
            },
            AlertSink {
                kind: AlertSinkKind::Feishu,
                url: good,
                kinds: vec![],
            },
        ]))
        .unwrap();
        let a = alert("retries_exhausted", "op-1");
        let t0 = Instant::now();
        let first = relay.deliver(&a, t0).await;
        assert!(
            matches!(&first[0], Verdict::Failed(e) if e.contains("503") && !e.contains("/api/v2")),
            "the status, and the host without the path: {first:?}"
        );
        assert_eq!(first[1], Verdict::Delivered);
        *down.lock() = 200;
        // Redelivered: the Alertmanager gets it now, the chat not twice.
        assert_eq!(
            relay.deliver(&a, t0).await,
            [Verdict::Delivered, Verdict::Duplicate]
        );
        let body = &got.lock()[0];
        assert_eq!(body["msg_type"], "text");
        assert!(body["content"]["text"].as_str().unwrap().contains("op-1"));
    }

    #[test]
    fn alertmanager_alerts_carry_labels_and_times_and_configs_are_checked() {
        let v = payload(
            AlertSinkKind::Alertmanager,
            &alert("worker_lost", "w1"),
            None,
            Duration::from_secs(600),
        );
        assert_eq!(v[0]["labels"]["alertname"], "MotorpoolWorkerLost");
        assert_eq!(v[0]["labels"]["subject"], "w1");
        assert_eq!(v[0]["startsAt"], "2025-12-06T05:46:40Z");
        assert!(v[0]["endsAt"].as_str().unwrap() > v[0]["startsAt"].as_str().unwrap());
        assert_eq!(
            alert_name("ci_retries_exhausted"),
            "MotorpoolCiRetriesExhausted"
        );
        assert!(
            Relay::new(&config(vec![]))
                .err()
                .unwrap()
                .to_string()
                .contains("no sinks")
        );
        let bad = AlertSink {
            kind: AlertSinkKind::Slack,
            url: "file:///etc/passwd".into(),
            kinds: vec![],
        };
        assert!(
            Relay::new(&config(vec![bad]))
                .err()
                .unwrap()
                .to_string()
                .contains("not an http")
        );
        assert_eq!(
            host_of("https://user:pw@hooks.slack.com/services/T0/B0/SECRET?x=1"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(retry_delay(1), Duration::from_secs(5));
        assert_eq!(retry_delay(2), Duration::from_secs(10));
        assert_eq!(retry_delay(30), Duration::from_secs(300));
    }
}
