//! Forge events: who sent them (signature checks) and what they say (GitLab merge request,
//! push and tag push hooks; GitHub pull_request and push events), reduced to one [`Event`].
//!
//! Nothing here trusts the body before [`verify`] has passed: the service checks the signature
//! on the raw bytes first and parses only what a holder of the project's secret sent.

use hmac::{Hmac, Mac};
use motorpool_messages::ci::{Forge, Trigger};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why an event is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    /// No signature, or one that does not match: 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// A body that is not the event it says it is: 400.
    #[error("{0}")]
    Malformed(String),
}

/// The header a forge's delivery names its event kind in.
pub fn kind_header(forge: Forge) -> &'static str {
    match forge {
        Forge::Gitlab => "x-gitlab-event",
        Forge::Github => "x-github-event",
    }
}

/// Checks that `body` came from a holder of `secret`: GitLab's `X-Gitlab-Token` is the secret
/// itself, GitHub's `X-Hub-Signature-256` is `sha256=` and the HMAC-SHA256 of the body. Both
/// compared in constant time.
pub fn verify(
    forge: Forge,
    secret: &[u8],
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
) -> Result<(), EventError> {
    match forge {
        Forge::Gitlab => {
            let token = header("x-gitlab-token").ok_or_else(|| {
                EventError::Unauthenticated(
                    "no X-Gitlab-Token header: set the hook's secret token".into(),
                )
            })?;
            // Hashes first: equal lengths, so the comparison's time says nothing of the secret.
            let (a, b) = (Sha256::digest(token.as_bytes()), Sha256::digest(secret));
            if bool::from(a.ct_eq(&b)) {
                Ok(())
            } else {
                Err(EventError::Unauthenticated(
                    "X-Gitlab-Token does not match this project's secret token".into(),
                ))
            }
        }
        Forge::Github => {
            let sig = header("x-hub-signature-256").ok_or_else(|| {
                EventError::Unauthenticated(
                    "no X-Hub-Signature-256 header: set the webhook's secret".into(),
                )
            })?;
            let given = sig
                .strip_prefix("sha256=")
                .and_then(|h| hex::decode(h.trim()).ok())
                .ok_or_else(|| {
                    EventError::Unauthenticated("X-Hub-Signature-256 is not sha256=<hex>".into())
                })?;
            let mut mac =
                Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
            mac.update(body);
            mac.verify_slice(&given).map_err(|_| {
                EventError::Unauthenticated(
                    "X-Hub-Signature-256 does not match the body and this project's secret".into(),
                )
            })
        }
    }
}

/// The id that stays the same when a forge delivers an event again: GitLab's
/// `Idempotency-Key` (or `X-Gitlab-Event-UUID`), GitHub's `X-GitHub-Delivery`; without one, the
/// body's SHA-256 (an identical body is the same event).
pub fn delivery_id(forge: Forge, header: impl Fn(&str) -> Option<String>, body: &[u8]) -> String {
    let named = match forge {
        Forge::Gitlab => header("idempotency-key").or_else(|| header("x-gitlab-event-uuid")),
        Forge::Github => header("x-github-delivery"),
    };
    named
        .map(|id| id.trim().to_string())
        .filter(|id| !id.is_empty() && id.len() <= 200)
        .unwrap_or_else(|| format!("body-sha256-{}", hex::encode(Sha256::digest(body))))
}

/// What an event asks for, whichever forge sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// GitLab `path_with_namespace`, GitHub `full_name`.
    pub project: String,
    /// The repository's URL as the event gives it.
    pub clone_url: String,
    /// 40 hex digits.
    pub commit: String,
    pub git_ref: String,
    pub trigger: Trigger,
    /// The forge user who caused it.
    pub user: String,
}

/// An event read: one to act on, or one that asks for nothing (and why).
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Event(Event),
    Ignored(String),
}

/// Reads an event of kind `kind` (the value of [`kind_header`]).
pub fn parse(forge: Forge, kind: &str, body: &[u8]) -> Result<Parsed, EventError> {
    match (forge, kind) {
        (Forge::Gitlab, "Merge Request Hook") => gitlab_merge_request(json(body)?),
        (Forge::Gitlab, "Push Hook") => gitlab_push(json(body)?, false),
        (Forge::Gitlab, "Tag Push Hook") => gitlab_push(json(body)?, true),
        (Forge::Github, "pull_request") => github_pull_request(json(body)?),
        (Forge::Github, "push") => github_push(json(body)?),
        (Forge::Github, "ping") => Ok(Parsed::Ignored("ping: the hook reaches Motorpool".into())),
        (_, other) => Ok(Parsed::Ignored(format!(
            "{forge} events of kind {other:?} start no job"
        ))),
    }
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, EventError> {
    serde_json::from_slice(body)
        .map_err(|e| EventError::Malformed(format!("the event is not valid: {e}")))
}

/// A commit id: 40 hex digits (SHA-1) or 64 (SHA-256 repositories).
fn commit(id: &str, what: &str) -> Result<String, EventError> {
    let ok = (id.len() == 40 || id.len() == 64) && id.bytes().all(|b| b.is_ascii_hexdigit());
    if ok {
        Ok(id.to_ascii_lowercase())
    } else {
        Err(EventError::Malformed(format!(
            "{what} {id:?} is not a commit id"
        )))
    }
}

fn deleted(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b == b'0')
}

#[derive(Deserialize)]
struct GlProject {
    path_with_namespace: String,
    git_http_url: String,
}

#[derive(Deserialize)]
struct GlUser {
    username: String,
}

#[derive(Deserialize)]
struct GlLabel {
    title: String,
}

#[derive(Deserialize)]
struct GlCommit {
    id: String,
}

#[derive(Deserialize)]
struct GlMergeRequestAttributes {
    iid: u64,
    #[serde(default)]
    action: Option<String>,
    source_branch: String,
    target_branch: String,
    last_commit: GlCommit,
    /// Set on `update` when new commits arrived.
    #[serde(default)]
    oldrev: Option<String>,
}

#[derive(Deserialize)]
struct GlMergeRequest {
    project: GlProject,
    user: GlUser,
    object_attributes: GlMergeRequestAttributes,
    #[serde(default)]
    labels: Vec<GlLabel>,
}

fn gitlab_merge_request(e: GlMergeRequest) -> Result<Parsed, EventError> {
    let a = &e.object_attributes;
    let action = a.action.as_deref().unwrap_or("");
    match action {
        "open" | "reopen" => {}
        "update" if a.oldrev.is_some() => {}
        "update" => {
            return Ok(Parsed::Ignored(
                "merge request updated without new commits".into(),
            ));
        }
        other => {
            return Ok(Parsed::Ignored(format!(
                "merge request action {other:?} starts no job"
            )));
        }
    }
    Ok(Parsed::Event(Event {
        project: e.project.path_with_namespace,
        clone_url: e.project.git_http_url,
        commit: commit(&a.last_commit.id, "last_commit.id")?,
        git_ref: format!("refs/merge-requests/{}/head", a.iid),
        trigger: Trigger::MergeRequest {
            number: a.iid,
            source_branch: a.source_branch.clone(),
            target_branch: a.target_branch.clone(),
            labels: e.labels.into_iter().map(|l| l.title).collect(),
        },
        user: e.user.username,
    }))
}

#[derive(Deserialize)]
struct GlPush {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    checkout_sha: Option<String>,
    #[serde(default)]
    user_username: String,
    project: GlProject,
}

fn gitlab_push(e: GlPush, tag: bool) -> Result<Parsed, EventError> {
    if deleted(&e.after) {
        return Ok(Parsed::Ignored(format!("{} was deleted", e.git_ref)));
    }
    // An annotated tag's `after` is the tag object; `checkout_sha` is the commit.
    let id = e.checkout_sha.as_deref().unwrap_or(&e.after);
    let trigger = ref_trigger(&e.git_ref, tag)?;
    Ok(Parsed::Event(Event {
        project: e.project.path_with_namespace,
        clone_url: e.project.git_http_url,
        commit: commit(id, "checkout_sha")?,
        git_ref: e.git_ref,
        trigger,
        user: e.user_username,
    }))
}

/// A push's trigger from its ref: `refs/heads/<branch>` or `refs/tags/<tag>`.
fn ref_trigger(git_ref: &str, tag_expected: bool) -> Result<Trigger, EventError> {
    if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
        return Ok(Trigger::Tag { tag: tag.into() });
    }
    match git_ref.strip_prefix("refs/heads/") {
        Some(branch) if !tag_expected => Ok(Trigger::Push {
            branch: branch.into(),
        }),
        _ => Err(EventError::Malformed(format!(
            "ref {git_ref:?} is not a {}",
            if tag_expected { "tag" } else { "branch or tag" }
        ))),
    }
}

#[derive(Deserialize)]
struct GhRepository {
    full_name: String,
    clone_url: String,
}

#[derive(Deserialize)]
struct GhUser {
    login: String,
}

#[derive(Deserialize)]
struct GhLabel {
    name: String,
}

#[derive(Deserialize)]
struct GhBranch {
    sha: String,
    #[serde(rename = "ref")]
    git_ref: String,
}

#[derive(Deserialize)]
struct GhBase {
    #[serde(rename = "ref")]
    git_ref: String,
}

#[derive(Deserialize)]
struct GhPull {
    head: GhBranch,
    base: GhBase,
    #[serde(default)]
    labels: Vec<GhLabel>,
}

#[derive(Deserialize)]
struct GhPullRequestEvent {
    action: String,
    number: u64,
    pull_request: GhPull,
    repository: GhRepository,
    sender: GhUser,
}

fn github_pull_request(e: GhPullRequestEvent) -> Result<Parsed, EventError> {
    if !matches!(e.action.as_str(), "opened" | "reopened" | "synchronize") {
        return Ok(Parsed::Ignored(format!(
            "pull request action {:?} starts no job",
            e.action
        )));
    }
    Ok(Parsed::Event(Event {
        project: e.repository.full_name,
        clone_url: e.repository.clone_url,
        commit: commit(&e.pull_request.head.sha, "pull_request.head.sha")?,
        git_ref: format!("refs/pull/{}/head", e.number),
        trigger: Trigger::MergeRequest {
            number: e.number,
            source_branch: e.pull_request.head.git_ref,
            target_branch: e.pull_request.base.git_ref,
            labels: e.pull_request.labels.into_iter().map(|l| l.name).collect(),
        },
        user: e.sender.login,
    }))
}

#[derive(Deserialize)]
struct GhPushEvent {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    head_commit: Option<GlCommit>,
    repository: GhRepository,
    sender: GhUser,
}

fn github_push(e: GhPushEvent) -> Result<Parsed, EventError> {
    if e.deleted || deleted(&e.after) {
        return Ok(Parsed::Ignored(format!("{} was deleted", e.git_ref)));
    }
    let id = e
        .head_commit
        .as_ref()
        .map_or(e.after.as_str(), |c| c.id.as_str());
    let trigger = ref_trigger(&e.git_ref, false)?;
    Ok(Parsed::Event(Event {
        project: e.repository.full_name,
        clone_url: e.repository.clone_url,
        commit: commit(id, "head_commit.id")?,
        git_ref: e.git_ref,
        trigger,
        user: e.sender.login,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn headers(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| {
            owned
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        }
    }

    fn github_signature(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    #[test]
    fn signatures_are_checked_against_the_secret_and_the_exact_body() {
        let body = br#"{"x":1}"#;
        let gl = |t: &str| {
            verify(
                Forge::Gitlab,
                b"s3cret",
                headers(&[("X-Gitlab-Token", t)]),
                body,
            )
        };
        assert_eq!(gl("s3cret"), Ok(()));
        for wrong in ["s3cre", "s3cret ", "", "S3CRET"] {
            assert!(
                matches!(gl(wrong), Err(EventError::Unauthenticated(_))),
                "{wrong:?}"
            );
        }
        let missing = verify(Forge::Gitlab, b"s3cret", headers(&[]), body).unwrap_err();
        assert!(missing.to_string().contains("X-Gitlab-Token"), "{missing}");

        let sig = github_signature(b"s3cret", body);
        let gh = |sig: &str, body: &[u8]| {
            verify(
                Forge::Github,
                b"s3cret",
                headers(&[("X-Hub-Signature-256", sig)]),
                body,
            )
        };
        assert_eq!(gh(&sig, body), Ok(()));
        assert!(gh(&sig, br#"{"x":2}"#).is_err(), "another body");
        assert!(
            gh(&github_signature(b"other", body), body).is_err(),
            "another secret"
        );
        assert!(gh(&sig.replace("sha256=", "sha1="), body).is_err());
        assert!(gh("sha256=zz", body).is_err());
        let missing = verify(Forge::Github, b"s3cret", headers(&[]), body).unwrap_err();
        assert!(
            missing.to_string().contains("X-Hub-Signature-256"),
            "{missing}"
        );
        // A GitLab token is no GitHub signature.
        assert!(
            verify(
                Forge::Github,
                b"s3cret",
                headers(&[("X-Gitlab-Token", "s3cret")]),
                body
            )
            .is_err()
        );
    }

    #[test]
    fn deliveries_are_named_by_the_forge_or_by_the_body() {
        let body = b"{}";
        let id = delivery_id(
            Forge::Github,
            headers(&[("X-GitHub-Delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958")]),
            body,
        );
        assert_eq!(id, "72d3162e-cc78-11e3-81ab-4c9367dc0958");
        let gl = delivery_id(
            Forge::Gitlab,
            headers(&[("X-Gitlab-Event-UUID", "a"), ("Idempotency-Key", "b")]),
            body,
        );
        assert_eq!(
            gl, "b",
            "GitLab's idempotency key is the same on every retry"
        );
        let none = delivery_id(Forge::Gitlab, headers(&[]), body);
        assert!(none.starts_with("body-sha256-"));
        assert_eq!(none, delivery_id(Forge::Gitlab, headers(&[]), body));
        assert_ne!(none, delivery_id(Forge::Gitlab, headers(&[]), b"{ }"));
    }

    fn gitlab_mr(action: &str, oldrev: Option<&str>) -> Vec<u8> {
        serde_json::json!({
            "object_kind": "merge_request",
            "user": {"username": "dev1"},
            "project": {"path_with_namespace": "av/monorepo", "git_http_url": "https://git.example/av/monorepo.git"},
            "object_attributes": {
                "iid": 7, "action": action, "source_branch": "feat", "target_branch": "main",
                "last_commit": {"id": SHA}, "oldrev": oldrev,
            },
            "labels": [{"title": "priority::release"}, {"title": "perception"}],
        })
        .to_string()
        .into_bytes()
    }

    #[test]
    fn gitlab_merge_requests_pushes_and_tags_become_events() {
        let Parsed::Event(e) = parse(
            Forge::Gitlab,
            "Merge Request Hook",
            &gitlab_mr("open", None),
        )
        .unwrap() else {
            panic!("an opened MR is an event");
        };
        assert_eq!(e.project, "av/monorepo");
        assert_eq!(e.commit, SHA);
        assert_eq!(e.git_ref, "refs/merge-requests/7/head");
        assert_eq!(e.user, "dev1");
        assert!(
            matches!(&e.trigger, Trigger::MergeRequest { number: 7, labels, .. } if labels[0] == "priority::release")
        );
        assert!(matches!(
            parse(
                Forge::Gitlab,
                "Merge Request Hook",
                &gitlab_mr("update", Some(SHA))
            )
            .unwrap(),
            Parsed::Event(_)
        ));
        for (action, oldrev) in [
            ("update", None),
            ("close", None),
            ("merge", None),
            ("approved", None),
        ] {
            assert!(
                matches!(
                    parse(
                        Forge::Gitlab,
                        "Merge Request Hook",
                        &gitlab_mr(action, oldrev)
                    )
                    .unwrap(),
                    Parsed::Ignored(_)
                ),
                "{action}"
            );
        }

        let push = |r: &str, after: &str| {
            serde_json::json!({
                "object_kind": "push", "ref": r, "before": SHA, "after": after,
                "checkout_sha": if deleted(after) { None } else { Some(SHA) },
                "user_username": "dev2",
                "project": {"path_with_namespace": "av/monorepo", "git_http_url": "u"},
            })
            .to_string()
            .into_bytes()
        };
        let Parsed::Event(p) =
            parse(Forge::Gitlab, "Push Hook", &push("refs/heads/main", SHA)).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            p.trigger,
            Trigger::Push {
                branch: "main".into()
            }
        );
        assert!(matches!(
            parse(Forge::Gitlab, "Push Hook", &push("refs/heads/main", &"0".repeat(40))).unwrap(),
            Parsed::Ignored(r) if r.contains("deleted")
        ));
        // An annotated tag: `after` names the tag object, the build takes the commit.
        let tag_object = "f".repeat(40);
        let Parsed::Event(t) = parse(
            Forge::Gitlab,
            "Tag Push Hook",
            &push("refs/tags/v2.1", &tag_object),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(t.trigger, Trigger::Tag { tag: "v2.1".into() });
        assert_eq!(t.commit, SHA);
        assert!(parse(Forge::Gitlab, "Tag Push Hook", &push("refs/heads/x", SHA)).is_err());
        assert!(matches!(
            parse(Forge::Gitlab, "Note Hook", b"{}").unwrap(),
            Parsed::Ignored(r) if r.contains("Note Hook")
        ));
    }

    #[test]
    fn github_pull_requests_and_pushes_become_events() {
        let pr = |action: &str| {
            serde_json::json!({
                "action": action, "number": 12,
                "pull_request": {"head": {"sha": SHA, "ref": "feat"}, "base": {"ref": "main"}, "labels": [{"name": "priority::low"}]},
                "repository": {"full_name": "av/monorepo", "clone_url": "https://github.example/av/monorepo.git"},
                "sender": {"login": "octo"},
            })
            .to_string()
            .into_bytes()
        };
        let Parsed::Event(e) = parse(Forge::Github, "pull_request", &pr("synchronize")).unwrap()
        else {
            panic!()
        };
        assert_eq!(e.git_ref, "refs/pull/12/head");
        assert_eq!(e.user, "octo");
        assert!(matches!(
            parse(Forge::Github, "pull_request", &pr("labeled")).unwrap(),
            Parsed::Ignored(_)
        ));
        assert!(matches!(
            parse(Forge::Github, "ping", b"{}").unwrap(),
            Parsed::Ignored(_)
        ));
        let push = serde_json::json!({
            "ref": "refs/tags/v3", "after": SHA, "deleted": false, "head_commit": {"id": SHA},
            "repository": {"full_name": "av/monorepo", "clone_url": "c"}, "sender": {"login": "rm"},
        });
        let Parsed::Event(t) = parse(Forge::Github, "push", push.to_string().as_bytes()).unwrap()
        else {
            panic!()
        };
        assert_eq!(t.trigger, Trigger::Tag { tag: "v3".into() });
    }

    #[test]
    fn malformed_events_are_named_not_guessed() {
        let e = parse(Forge::Gitlab, "Push Hook", b"{not json").unwrap_err();
        assert!(matches!(e, EventError::Malformed(_)));
        let e = parse(Forge::Github, "pull_request", br#"{"action":"opened"}"#).unwrap_err();
        assert!(
            e.to_string().contains("number") || e.to_string().contains("missing"),
            "{e}"
        );
        let bad_sha = serde_json::json!({
            "ref": "refs/heads/main", "after": "HEAD", "repository": {"full_name": "a/b", "clone_url": "c"},
            "sender": {"login": "x"},
        });
        let e = parse(Forge::Github, "push", bad_sha.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("not a commit id"), "{e}");
    }
}
