//! Invocations: what Bazel's build events say, folded into what people look at.
//!
//! [`Fold`] turns events into an [`InvocationSummary`] as they stream (the list page's row);
//! [`load`] reads an invocation's kept events and the platform's records of its remote actions
//! back from JetStream and folds them into an [`Invocation`] (the invocation page).

use bazel_bep::types::build_event_stream as bep;
use googleapis_tonic_google_devtools_build_v1::google::devtools::build::v1 as bes;
use motorpool_bus::subjects;
use motorpool_messages::bes::{BesEvent, InvocationSummary, RemoteAction};
use motorpool_messages::codec;
use prost_bep::Message as _;
use std::collections::{BTreeMap, HashMap};

/// One event, decoded.
#[derive(Debug)]
pub enum Decoded {
    /// Bazel's own event (`build_event_stream.BuildEvent`).
    Bazel(Box<bep::BuildEvent>),
    /// A lifecycle event of the build or invocation (enqueued, started, finished).
    Lifecycle,
    /// The end of a component's stream.
    StreamFinished,
    /// Console output and other events shown nowhere yet.
    Other,
}

/// `s` cut to at most `n` characters, for messages that quote what a client sent.
pub fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// Decodes one event. A Bazel event must be a `build_event_stream.BuildEvent` that decodes.
pub fn decode(e: &bes::BuildEvent) -> Result<Decoded, String> {
    use bes::build_event::Event;
    Ok(match &e.event {
        Some(Event::BazelEvent(any)) => {
            if !any.type_url.ends_with("build_event_stream.BuildEvent") {
                return Err(format!(
                    "a bazel_event of type {:?}, not build_event_stream.BuildEvent",
                    clip(&any.type_url, 120)
                ));
            }
            let event = bep::BuildEvent::decode(any.value.as_slice())
                .map_err(|e| format!("not a build_event_stream.BuildEvent: {e}"))?;
            Decoded::Bazel(Box::new(event))
        }
        Some(
            Event::InvocationAttemptStarted(_)
            | Event::InvocationAttemptFinished(_)
            | Event::BuildEnqueued(_)
            | Event::BuildFinished(_),
        ) => Decoded::Lifecycle,
        Some(Event::ComponentStreamFinished(_)) => Decoded::StreamFinished,
        Some(_) => Decoded::Other,
        None => return Err("the event has no content".into()),
    })
}

/// `option` with any secret it carries replaced by `<redacted>`: header values that
/// authenticate (`--remote_header=authorization=Bearer ...`), and environment variables whose
/// names say they hold a secret (`--client_env=GITLAB_TOKEN=...`).
pub fn redact(option: &str) -> String {
    const SECRET: [&str; 6] = ["TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL"];
    let Some((name, value)) = option.split_once('=') else {
        return option.to_string();
    };
    let flag = name.trim_start_matches('-');
    if flag.ends_with("header") {
        let header = value.split_once('=').map_or(value, |(h, _)| h);
        let h = header.to_ascii_lowercase();
        if h == "authorization" || h.contains("key") || h.contains("token") || h.contains("cookie")
        {
            return format!("{name}={header}=<redacted>");
        }
    }
    if flag.ends_with("env")
        && let Some((var, _)) = value.split_once('=')
        && SECRET.iter().any(|s| var.to_ascii_uppercase().contains(s))
    {
        return format!("{name}={var}=<redacted>");
    }
    if value.contains("Bearer ") || value.contains("bearer ") {
        return format!("{name}=<redacted>");
    }
    option.to_string()
}

/// An event as it may be kept: Bazel's command lines with their secrets redacted (the API key
/// Bazel sends as a `--remote_header` is on them), its structured command lines and the
/// started event's `options_description` dropped (the same options again, which nothing here
/// shows). Other events are kept as they came.
pub fn redacted(event: &mut bes::BuildEvent, decoded: &Decoded) {
    use bep::build_event::Payload;
    let Decoded::Bazel(b) = decoded else { return };
    let mut b = (**b).clone();
    match &mut b.payload {
        Some(Payload::UnstructuredCommandLine(c)) => {
            c.args = c.args.iter().map(|a| redact(a)).collect();
        }
        Some(Payload::OptionsParsed(o)) => {
            for list in [
                &mut o.startup_options,
                &mut o.explicit_startup_options,
                &mut o.cmd_line,
                &mut o.explicit_cmd_line,
            ] {
                *list = list.iter().map(|a| redact(a)).collect();
            }
        }
        Some(Payload::StructuredCommandLine(c)) => {
            c.sections.clear();
        }
        // The whole command line again, shell-quoted.
        Some(Payload::Started(s)) => s.options_description.clear(),
        _ => return,
    }
    if let Some(bes::build_event::Event::BazelEvent(any)) = &mut event.event {
        any.value = b.encode_to_vec();
    }
}

/// A test status's name, lower case (`passed`, `failed`, `flaky`, ...).
fn test_status(code: i32) -> String {
    bep::TestStatus::try_from(code)
        .map(|s| s.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("status {code}"))
}

/// The summary an invocation's events make so far.
#[derive(Clone, Debug, Default)]
pub struct Fold {
    pub summary: InvocationSummary,
    finished: bool,
}

impl Fold {
    /// Goes on from a summary written before (by another gateway, or this one before a restart).
    pub fn resume(summary: InvocationSummary) -> Fold {
        let finished = summary.finished_ms != 0;
        Fold { summary, finished }
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    pub fn apply(&mut self, event: &Decoded, now_ms: u64) {
        let s = &mut self.summary;
        if s.status.is_empty() {
            s.status = "running".into();
            s.started_ms = now_ms;
        }
        let Decoded::Bazel(e) = event else { return };
        use bep::build_event::Payload;
        match &e.payload {
            #[allow(deprecated)] // Bazel 4 sends the millis, later ones the timestamp.
            Some(Payload::Started(b)) => {
                s.command = b.command.clone();
                if b.start_time_millis > 0 {
                    s.started_ms = b.start_time_millis as u64;
                }
            }
            Some(Payload::Expanded(_)) => {
                if let Some(bep::build_event_id::Id::Pattern(p)) =
                    e.id.as_ref().and_then(|i| i.id.as_ref())
                {
                    s.patterns.extend(p.pattern.iter().cloned());
                }
            }
            Some(Payload::WorkspaceStatus(w)) => {
                for item in &w.item {
                    match item.key.as_str() {
                        "BUILD_USER" if s.user.is_empty() => s.user = item.value.clone(),
                        "BUILD_HOST" => s.host = item.value.clone(),
                        _ => {}
                    }
                }
            }
            Some(Payload::BuildMetadata(m)) => {
                for (k, v) in &m.metadata {
                    match k.as_str() {
                        "USER" | "user" => s.user = v.clone(),
                        "BRANCH_NAME" | "branch" => s.branch = v.clone(),
                        "COMMIT_SHA" | "commit" => s.commit = v.clone(),
                        "CI_JOB" => s.ci_job = v.clone(),
                        "CI_MERGE_REQUEST" => s.merge_request = v.clone(),
                        _ => {}
                    }
                }
            }
            Some(Payload::Configured(_)) => s.targets += 1,
            Some(Payload::Completed(c)) if !c.success => s.targets_failed += 1,
            Some(Payload::TestSummary(t)) => {
                s.tests += 1;
                match test_status(t.overall_status).as_str() {
                    "passed" => {}
                    "flaky" => s.tests_flaky += 1,
                    _ => s.tests_failed += 1,
                }
            }
            #[allow(deprecated)]
            Some(Payload::Finished(f)) => {
                let code = f.exit_code.clone().unwrap_or_default();
                s.exit_code = code.code;
                s.status = if code.code == 0 {
                    "succeeded".into()
                } else {
                    code.name.to_ascii_lowercase()
                };
                s.finished_ms = if f.finish_time_millis > 0 {
                    f.finish_time_millis as u64
                } else {
                    now_ms
                };
                self.finished = true;
            }
            _ => {}
        }
    }
}

/// A target of an invocation, and its test when it is one.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Target {
    pub label: String,
    pub kind: String,
    /// None while it builds.
    pub success: Option<bool>,
    pub test: Option<Test>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Test {
    pub status: String,
    pub attempts: u32,
    pub duration_ms: i64,
    pub cached: bool,
    /// `(name, bytestream:// URI)` of each attempt's outputs: `test.log`, `test.xml`, ...
    pub outputs: Vec<(String, String)>,
}

/// What the invocation page shows.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Invocation {
    pub summary: InvocationSummary,
    /// The options given on the command line and in rc files (`explicit_cmd_line`), redacted.
    pub options: Vec<String>,
    pub tool_version: String,
    pub targets: Vec<Target>,
    /// Bazel's build tool logs: name and, for the short ones, their text (the critical path).
    pub tool_logs: Vec<(String, String)>,
    /// Every action the platform executed for the invocation, by start time.
    pub actions: Vec<RemoteAction>,
    /// Bazel's critical path, longest first as Bazel lists it, each step with the operation of
    /// the platform's action it was (when it ran here).
    pub critical_path: Vec<CriticalStep>,
    /// Bazel's timing profile, when it uploaded one (read from the CAS by the page).
    pub profile: Option<Profile>,
}

impl Invocation {
    /// The `bytestream://` URI of Bazel's timing profile, when its build tool logs name one.
    pub fn profile_uri(&self) -> Option<&str> {
        self.tool_logs
            .iter()
            .find(|(name, uri)| name == "command.profile.gz" && uri.starts_with("bytestream://"))
            .map(|(_, uri)| uri.as_str())
    }
}

/// Bazel's own timing profile of the invocation (`--experimental_generate_json_trace_profile`
/// uploads it to the CAS as `command.profile.gz`): every action Bazel processed, local, cached
/// or remote, on the thread that processed it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Profile {
    /// `(thread id, name)` of the threads that processed actions.
    pub threads: Vec<(i64, String)>,
    pub actions: Vec<ProfiledAction>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProfiledAction {
    pub thread: i64,
    /// Bazel's description: `Compiling lib/a.cc`.
    pub name: String,
    /// Microseconds from the profile's start.
    pub start_us: u64,
    pub duration_us: u64,
    /// On Bazel's critical path.
    pub critical: bool,
}

/// Reads a gzipped Chrome-trace profile as Bazel writes it.
pub fn parse_profile(gz: &[u8]) -> Result<Profile, String> {
    let v: serde_json::Value = serde_json::from_reader(flate2::read::GzDecoder::new(gz))
        .map_err(|e| format!("not a gzipped JSON profile: {e}"))?;
    let events = match &v {
        serde_json::Value::Array(a) => a,
        v => v["traceEvents"]
            .as_array()
            .ok_or("a profile without traceEvents")?,
    };
    let critical: std::collections::HashSet<&str> = events
        .iter()
        .filter(|e| e["cat"] == "critical path component")
        .filter_map(|e| e["name"].as_str())
        .map(|n| {
            n.strip_prefix("action '")
                .and_then(|n| n.strip_suffix('\''))
                .unwrap_or(n)
        })
        .collect();
    let mut actions: Vec<ProfiledAction> = events
        .iter()
        .filter(|e| e["cat"] == "action processing" && e["ph"] == "X")
        .map(|e| {
            let name = e["name"].as_str().unwrap_or_default().to_string();
            ProfiledAction {
                thread: e["tid"].as_i64().unwrap_or_default(),
                critical: critical.contains(name.as_str()),
                name,
                start_us: e["ts"].as_f64().unwrap_or_default().max(0.0) as u64,
                duration_us: e["dur"].as_f64().unwrap_or_default().max(0.0) as u64,
            }
        })
        .collect();
    actions.sort_by_key(|a| a.start_us);
    let used: std::collections::HashSet<i64> = actions.iter().map(|a| a.thread).collect();
    let mut threads: Vec<(i64, String)> = events
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
        .filter_map(|e| Some((e["tid"].as_i64()?, e["args"]["name"].as_str()?.to_string())))
        .filter(|(tid, _)| used.contains(tid))
        .collect();
    threads.sort();
    threads.dedup_by_key(|t| t.0);
    for tid in used {
        if !threads.iter().any(|t| t.0 == tid) {
            threads.push((tid, format!("thread {tid}")));
        }
    }
    threads.sort();
    Ok(Profile { threads, actions })
}

/// Whether Bazel's `description` of an action and the platform's name the same action.
pub fn same_action(description: &str, platform: &str) -> bool {
    normalize(description) == normalize(platform)
}

/// One step of Bazel's critical path.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CriticalStep {
    pub seconds: f64,
    pub description: String,
    /// The platform's operation that ran it; empty when Bazel ran it itself.
    pub operation: String,
}

/// `Testing //lib:a_test` and `Testing lib/a_test` name the same action.
fn normalize(description: &str) -> String {
    let (verb, subject) = description.split_once(' ').unwrap_or(("", description));
    let subject = match subject.strip_prefix("//") {
        Some(label) => label.replace(':', "/").trim_start_matches('/').to_string(),
        None => subject.to_string(),
    };
    format!("{verb} {subject}")
}

/// Bazel's critical path (its `critical path` build tool log), each step matched by its
/// description to the platform's action that ran it.
pub fn critical_path(text: &str, actions: &[RemoteAction]) -> Vec<CriticalStep> {
    let by_description: HashMap<String, &RemoteAction> = actions
        .iter()
        .filter(|a| !a.description.is_empty())
        .map(|a| (normalize(&a.description), a))
        .collect();
    parse_critical_path(text)
        .into_iter()
        .map(|(seconds, description)| CriticalStep {
            seconds,
            operation: by_description
                .get(&normalize(&description))
                .map(|a| a.operation.clone())
                .unwrap_or_default(),
            description,
        })
        .collect()
}

/// The steps of Bazel's `critical path` build tool log: lines such as
/// `  0.63s, Remote (78.63% of the time): [...] action 'Testing //lib2:lib2_test'`.
pub fn parse_critical_path(text: &str) -> Vec<(f64, String)> {
    text.lines()
        .filter_map(|line| {
            let secs = line.trim_start().split('s').next()?.parse::<f64>().ok()?;
            let start = line.find("action '")? + "action '".len();
            let end = line[start..].rfind('\'')? + start;
            Some((secs, line[start..end].to_string()))
        })
        .collect()
}

impl Invocation {
    /// Folds `events` (any order; sorted here) and `actions`.
    pub fn build(
        summary: InvocationSummary,
        mut events: Vec<BesEvent>,
        mut actions: Vec<RemoteAction>,
    ) -> Invocation {
        events.sort_by_key(|e| (e.component, e.sequence));
        events.dedup_by_key(|e| (e.component, e.sequence));
        let mut inv = Invocation {
            summary,
            ..Default::default()
        };
        let mut targets: BTreeMap<String, Target> = BTreeMap::new();
        for e in &events {
            let Ok(event) = prost::Message::decode(e.event.as_slice()) else {
                continue;
            };
            let Ok(Decoded::Bazel(b)) = decode(&event) else {
                continue;
            };
            inv.apply(&b, &mut targets);
        }
        inv.targets = targets.into_values().collect();
        actions.sort_by_key(|a| (a.worker_start_ms.max(a.queued_ms), a.operation.clone()));
        actions.dedup_by(|a, b| {
            a.operation == b.operation
                && a.cached == b.cached
                && a.action == b.action
                && a.done_ms == b.done_ms
        });
        inv.actions = actions;
        let text = inv
            .tool_logs
            .iter()
            .find(|(name, _)| name == "critical path")
            .map(|(_, t)| t.as_str())
            .unwrap_or_default();
        inv.critical_path = critical_path(text, &inv.actions);
        inv
    }

    fn apply(&mut self, e: &bep::BuildEvent, targets: &mut BTreeMap<String, Target>) {
        use bep::build_event::Payload;
        use bep::build_event_id::Id;
        let id = e.id.as_ref().and_then(|i| i.id.as_ref());
        let label = match id {
            Some(Id::TargetConfigured(t)) => Some(t.label.clone()),
            Some(Id::TargetCompleted(t)) => Some(t.label.clone()),
            Some(Id::TestResult(t)) => Some(t.label.clone()),
            Some(Id::TestSummary(t)) => Some(t.label.clone()),
            _ => None,
        };
        let label = label.unwrap_or_default();
        match &e.payload {
            Some(Payload::Started(b)) => self.tool_version = b.build_tool_version.clone(),
            Some(Payload::OptionsParsed(o)) => {
                self.options = o.explicit_cmd_line.iter().map(|a| redact(a)).collect();
            }
            Some(Payload::Configured(c)) => {
                let t = target(targets, &label);
                t.kind = c.target_kind.clone();
            }
            Some(Payload::Completed(c)) => {
                let t = target(targets, &label);
                t.success = Some(c.success);
            }
            #[allow(deprecated)]
            Some(Payload::TestResult(r)) => {
                let t = target(targets, &label);
                let test = t.test.get_or_insert_with(Test::default);
                test.attempts += 1;
                test.status = test_status(r.status);
                test.duration_ms = r.test_attempt_duration_millis;
                test.cached = r.cached_locally
                    || r.execution_info.as_ref().is_some_and(|x| x.cached_remotely);
                for f in &r.test_action_output {
                    if let Some(bep::file::File::Uri(uri)) = &f.file {
                        test.outputs.push((f.name.clone(), uri.clone()));
                    }
                }
            }
            Some(Payload::TestSummary(s)) => {
                let t = target(targets, &label);
                t.test.get_or_insert_with(Test::default).status = test_status(s.overall_status);
            }
            Some(Payload::BuildToolLogs(logs)) => {
                for f in &logs.log {
                    let text = match &f.file {
                        Some(bep::file::File::Contents(c)) => {
                            String::from_utf8_lossy(c).into_owned()
                        }
                        Some(bep::file::File::Uri(u)) => u.clone(),
                        _ => String::new(),
                    };
                    self.tool_logs.push((f.name.clone(), text));
                }
            }
            _ => {}
        }
    }

    /// Remote actions found in the cache vs executed, and the share of cache hits.
    pub fn cache_hits(&self) -> (usize, usize) {
        let hits = self.actions.iter().filter(|a| a.cached).count();
        (hits, self.actions.len() - hits)
    }
}

fn target<'a>(targets: &'a mut BTreeMap<String, Target>, label: &str) -> &'a mut Target {
    targets.entry(label.to_string()).or_insert_with(|| Target {
        label: label.to_string(),
        ..Default::default()
    })
}

/// Reads every message on `subject` of the BES stream, oldest first.
async fn read_subject(
    stream: &async_nats::jetstream::stream::Stream,
    subject: String,
) -> Result<Vec<async_nats::jetstream::Message>, String> {
    use async_nats::jetstream::consumer;
    use futures::StreamExt;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subject.clone(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("read {subject}: {e}"))?;
    let mut pending = consumer.cached_info().num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("read {subject}: {e}"))?;
    while pending > 0 {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| format!("read {subject}: timed out"))?;
        let Some(m) = next else { break };
        let m = m.map_err(|e| format!("read {subject}: {e}"))?;
        pending = m.info().map(|i| i.pending).unwrap_or(0);
        out.push(m);
    }
    Ok(out)
}

/// An invocation's summary, kept events and remote actions, folded.
pub async fn load(
    stream: &async_nats::jetstream::stream::Stream,
    summaries: &async_nats::jetstream::kv::Store,
    id: &str,
) -> Result<Option<Invocation>, String> {
    let Some(bytes) = summaries.get(id).await.map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let summary: InvocationSummary = codec::decode(&bytes).map_err(|e| e.to_string())?;
    let events = read_subject(stream, subjects::bes::event(id).as_str().to_string())
        .await?
        .iter()
        .filter_map(|m| codec::decode::<BesEvent>(&m.payload).ok())
        .collect();
    let actions = read_subject(stream, subjects::bes::action(id).as_str().to_string())
        .await?
        .iter()
        .filter_map(|m| codec::decode::<RemoteAction>(&m.payload).ok())
        .collect();
    Ok(Some(Invocation::build(summary, events, actions)))
}

/// Every summary in the bucket, newest first.
pub async fn list(
    summaries: &async_nats::jetstream::kv::Store,
) -> Result<Vec<InvocationSummary>, String> {
    let mut out: Vec<InvocationSummary> = motorpool_bus::kv_values(summaries)
        .await
        .map_err(|e| e.to_string())?;
    out.sort_by_key(|s| std::cmp::Reverse(s.started_ms));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bazels_profile_gives_its_actions_threads_and_critical_path() {
        use std::io::Write as _;
        let trace = serde_json::json!({"traceEvents": [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 72, "args": {"name": "skyframe-evaluator 1"}},
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 9, "args": {"name": "idle"}},
            {"cat": "action processing", "name": "Compiling lib0/lib0.cc", "ph": "X", "ts": 1000, "dur": 5000, "pid": 1, "tid": 72},
            {"cat": "action processing", "name": "Linking lib0/liblib0.a", "ph": "X", "ts": 7000, "dur": 900, "pid": 1, "tid": 73},
            {"cat": "critical path component", "name": "action 'Compiling lib0/lib0.cc'", "ph": "X", "ts": 1000, "dur": 5000, "pid": 1, "tid": 0},
            {"cat": "general information", "name": "noise", "ph": "X", "ts": 0, "dur": 1, "pid": 1, "tid": 72},
        ]});
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(trace.to_string().as_bytes()).unwrap();
        let p = parse_profile(&gz.finish().unwrap()).unwrap();
        assert_eq!(p.actions.len(), 2);
        assert!(p.actions[0].critical && !p.actions[1].critical);
        assert_eq!(
            p.threads,
            [
                (72, "skyframe-evaluator 1".to_string()),
                (73, "thread 73".to_string())
            ],
            "only threads that processed actions, named when Bazel named them"
        );
        assert!(parse_profile(b"not gzip").is_err());
        assert!(same_action(
            "Testing //lib2:lib2_test",
            "Testing lib2/lib2_test"
        ));
    }

    #[test]
    fn secrets_on_command_lines_are_redacted() {
        for (given, kept) in [
            (
                "--remote_header=authorization=Bearer mp_123",
                "--remote_header=authorization=<redacted>",
            ),
            (
                "--remote_header=x-api-key=mp_123",
                "--remote_header=x-api-key=<redacted>",
            ),
            (
                "--bes_header=Authorization=Bearer x",
                "--bes_header=Authorization=<redacted>",
            ),
            (
                "--client_env=GITLAB_TOKEN=glpat-1",
                "--client_env=GITLAB_TOKEN=<redacted>",
            ),
            (
                "--action_env=AWS_SECRET_ACCESS_KEY=abc",
                "--action_env=AWS_SECRET_ACCESS_KEY=<redacted>",
            ),
            ("--some_flag=Bearer abc", "--some_flag=<redacted>"),
            // What is no secret stays.
            (
                "--remote_header=x-motorpool-lane=release",
                "--remote_header=x-motorpool-lane=release",
            ),
            ("--client_env=PATH=/usr/bin", "--client_env=PATH=/usr/bin"),
            ("--jobs=8", "--jobs=8"),
            ("//lib:a", "//lib:a"),
        ] {
            assert_eq!(redact(given), kept, "{given}");
        }
        // A whole event: what is kept of it holds no key.
        let line = bep::BuildEvent {
            payload: Some(bep::build_event::Payload::UnstructuredCommandLine(
                bep::UnstructuredCommandLine {
                    args: vec![
                        "test".into(),
                        "--remote_header=authorization=Bearer mp_secret".into(),
                    ],
                },
            )),
            ..Default::default()
        };
        let mut event = bes::BuildEvent {
            event_time: None,
            event: Some(bes::build_event::Event::BazelEvent(prost_types::Any {
                type_url: "type.googleapis.com/build_event_stream.BuildEvent".into(),
                value: line.encode_to_vec(),
            })),
        };
        let decoded = decode(&event).unwrap();
        redacted(&mut event, &decoded);
        let bytes = prost::Message::encode_to_vec(&event);
        assert!(!bytes.windows(9).any(|w| w == b"mp_secret"));
        assert!(bytes.windows(10).any(|w| w == b"<redacted>"));
    }

    #[test]
    fn the_critical_path_is_read_from_bazels_log_and_matched_to_actions() {
        let text = "Critical Path: 3.36s, Remote (94.68% of the time): [parse: 1.34%]\n  \
                    0.63s, Remote (78.63% of the time): [queue: 2.07%] action 'Testing //lib2:lib2_test'\n  \
                    0.00s runfiles for //lib2:lib2_test\n  \
                    0.27s, Remote (99.63% of the time): [process: 31.60%] action 'Linking lib2/lib2_test'\n  \
                    0.01s action 'SolibSymlink _solib_k8/liblib0.so'\n";
        let action = |op: &str, description: &str| RemoteAction {
            operation: op.into(),
            description: description.into(),
            ..Default::default()
        };
        let actions = [
            action("t", "Testing lib2/lib2_test"),
            action("l", "Linking lib2/lib2_test"),
            action("c", "Compiling lib2/lib2.cc"),
        ];
        let owned: Vec<(f64, String, String)> = critical_path(text, &actions)
            .into_iter()
            .map(|s| (s.seconds, s.description, s.operation))
            .collect();
        assert_eq!(
            owned,
            [
                (0.63, "Testing //lib2:lib2_test".into(), "t".into()),
                (0.27, "Linking lib2/lib2_test".into(), "l".into()),
                // Bazel made the symlink itself: no action of the platform's.
                (
                    0.01,
                    "SolibSymlink _solib_k8/liblib0.so".into(),
                    String::new()
                ),
            ]
        );
    }
}
