//! The warm workspace pool. A workspace is a directory (`<workspaces_dir>/<name>`) holding a
//! checkout (`src/`, with its Git LFS objects) and a Bazel output base (`output_base/`), whose
//! Bazel server may stay alive between jobs. Its entry in the KV bucket `mp_v1_ci_workspaces`
//! says which repository and commit it last held and who holds it now.
//!
//! - **One job at a time**: a job takes a workspace by writing its lease with the revision it
//!   read (a compare-and-set): of two runners, one wins, the other takes another.
//! - **Leases expire**: the holder renews its lease every third of `lease_ms`; a runner that
//!   dies stops renewing, and once the lease has expired the workspace is free again.
//! - **Dirty until released**: taking a workspace marks it dirty; only a job that ends normally
//!   clears the mark. The next job in a dirty workspace resets it first (stops its Bazel
//!   server, discards every change to the checkout).
//! - **Unreviewed code never warms a trusted job**: a workspace that ran a merge request's or an
//!   API client's job is tainted; a trusted job (the one with the key that may write the action
//!   cache) takes it only wiped, so nothing such code left in the checkout or the output base
//!   (a poisoned repository cache, a planted tool) runs with that key.
//! - **Warm first**: a job prefers a free workspace that last held its repository (the most
//!   recently used one), then a new one while the pool has room, then the least recently used
//!   one of another repository.

use motorpool_bus::{Bus, BusError, subjects::ci};
use motorpool_messages::ci::{CiJob, Lease, Workspace};
use motorpool_messages::{codec, now_ms};
use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The pool this runner takes workspaces from.
#[derive(Clone)]
pub struct Pool {
    kv: async_nats::jetstream::kv::Store,
    pub dir: PathBuf,
    pub name: String,
    size: usize,
    lease_ms: u64,
    runner: String,
}

/// A workspace this runner holds. Its lease is renewed until [`Pool::release`].
pub struct Held {
    pub name: String,
    pub path: PathBuf,
    /// It last held this job's repository.
    pub warm: bool,
    /// The job before did not finish cleanly: reset it before use.
    pub was_dirty: bool,
    /// It ran unreviewed code and this job is trusted: remove it whole before use.
    pub wipe: bool,
    state: Arc<Mutex<(Workspace, u64)>>,
    renew: CancellationToken,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renew.cancel();
    }
}

fn free(w: &Workspace, now: u64) -> bool {
    w.holder.as_ref().is_none_or(|l| l.expires_ms <= now)
}

impl Pool {
    pub async fn open(
        bus: &Bus,
        dir: PathBuf,
        name: &str,
        size: usize,
        lease_ms: u64,
        runner: &str,
    ) -> Result<Pool, BusError> {
        Ok(Pool {
            kv: bus.ensure_kv(ci::workspaces_config()).await?,
            dir,
            name: name.to_string(),
            size: size.max(1),
            lease_ms: lease_ms.max(1_000),
            runner: runner.to_string(),
        })
    }

    fn key(&self, workspace: &str) -> String {
        format!("{}.{workspace}", self.name)
    }

    /// Every workspace of the pool with its KV revision.
    pub async fn list(&self) -> Result<Vec<(Workspace, u64)>, BusError> {
        use futures::StreamExt;
        let prefix = format!("{}.", self.name);
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| BusError::JetStream(format!("workspace keys: {e}")))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { continue };
            if !key.starts_with(&prefix) {
                continue;
            }
            if let Ok(Some(entry)) = self.kv.entry(&key).await
                && let Ok(w) = codec::decode::<Workspace>(&entry.value)
            {
                out.push((w, entry.revision));
            }
        }
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        Ok(out)
    }

    /// Takes a workspace for `job`, waiting while every one is busy. Cancelled by `stop`.
    pub async fn acquire(&self, job: &CiJob, stop: &CancellationToken) -> Result<Held, BusError> {
        loop {
            let now = now_ms();
            let all = self.list().await?;
            let lease = Lease {
                runner: self.runner.clone(),
                job_id: job.job_id.clone(),
                expires_ms: now + self.lease_ms,
            };
            // Warm first (most recently used), then a new one, then the coldest other. A trusted
            // job never finds unreviewed code's leftovers warm: such a workspace is only cold
            // to it, and wiped.
            let usable_warm = |w: &Workspace| !(job.trusted && w.tainted);
            let mut warm: Vec<&(Workspace, u64)> = all
                .iter()
                .filter(|(w, _)| free(w, now) && w.repo == job.clone_url && usable_warm(w))
                .collect();
            warm.sort_by_key(|(w, _)| std::cmp::Reverse(w.updated_ms));
            let mut cold: Vec<&(Workspace, u64)> = all
                .iter()
                .filter(|(w, _)| free(w, now) && !(w.repo == job.clone_url && usable_warm(w)))
                .collect();
            cold.sort_by_key(|(w, _)| w.updated_ms);
            for (w, rev) in warm {
                if let Some(h) = self.take(w, *rev, &lease, true, job.trusted).await? {
                    return Ok(h);
                }
            }
            if all.len() < self.size {
                let names: Vec<&str> = all.iter().map(|(w, _)| w.name.as_str()).collect();
                let name = (0..)
                    .map(|i| format!("ws-{i}"))
                    .find(|n| !names.contains(&n.as_str()))
                    .expect("a free name");
                let new = Workspace {
                    pool: self.name.clone(),
                    name: name.clone(),
                    repo: String::new(),
                    commit: String::new(),
                    holder: Some(lease.clone()),
                    dirty: true,
                    tainted: !job.trusted,
                    bytes: 0,
                    jobs: 0,
                    updated_ms: now,
                };
                if let Ok(rev) = self
                    .kv
                    .create(&self.key(&name), codec::encode(&new)?.into())
                    .await
                {
                    return Ok(self.held(new, rev, false, false, false));
                }
                continue; // another runner made it first
            }
            for (w, rev) in cold {
                if let Some(h) = self.take(w, *rev, &lease, false, job.trusted).await? {
                    return Ok(h);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.cancelled() => return Err(BusError::JetStream("stopping".into())),
            }
        }
    }

    /// Takes `w` if nobody took it since revision `rev`; `warm` when it holds the job's
    /// repository; `trusted` for a trusted job (a tainted workspace is then wiped first).
    async fn take(
        &self,
        w: &Workspace,
        rev: u64,
        lease: &Lease,
        warm: bool,
        trusted: bool,
    ) -> Result<Option<Held>, BusError> {
        let was_dirty = w.dirty;
        let wipe = trusted && w.tainted;
        let mut taken = w.clone();
        taken.holder = Some(lease.clone());
        taken.dirty = true;
        taken.tainted = (w.tainted && !wipe) || !trusted;
        taken.updated_ms = now_ms();
        match self
            .kv
            .update(&self.key(&w.name), codec::encode(&taken)?.into(), rev)
            .await
        {
            Ok(rev) => Ok(Some(self.held(taken, rev, warm && !wipe, was_dirty, wipe))),
            Err(_) => Ok(None),
        }
    }

    fn held(&self, w: Workspace, rev: u64, warm: bool, was_dirty: bool, wipe: bool) -> Held {
        let state = Arc::new(Mutex::new((w.clone(), rev)));
        let renew = CancellationToken::new();
        let (kv, key, every) = (
            self.kv.clone(),
            self.key(&w.name),
            Duration::from_millis(self.lease_ms / 3),
        );
        let (s, stop, lease_ms) = (state.clone(), renew.clone(), self.lease_ms);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.cancelled() => return,
                }
                let (mut w, rev) = s.lock().clone();
                if let Some(l) = w.holder.as_mut() {
                    l.expires_ms = now_ms() + lease_ms;
                }
                let Ok(bytes) = codec::encode(&w) else { return };
                match kv.update(&key, bytes.into(), rev).await {
                    Ok(rev) => *s.lock() = (w, rev),
                    Err(error) => {
                        tracing::warn!(workspace = %key, %error, "Could not renew a workspace lease")
                    }
                }
            }
        });
        Held {
            name: w.name.clone(),
            path: self.dir.join(&w.name),
            warm: warm && !w.repo.is_empty(),
            was_dirty,
            wipe,
            state,
            renew,
        }
    }

    /// Gives `held` back: it now holds `repo` at `commit`, takes `bytes` on disk, and is clean
    /// unless the job ended badly.
    pub async fn release(
        &self,
        held: Held,
        repo: &str,
        commit: &str,
        bytes: u64,
        dirty: bool,
    ) -> Result<(), BusError> {
        held.renew.cancel();
        let (mut w, rev) = held.state.lock().clone();
        w.holder = None;
        w.repo = repo.to_string();
        w.commit = commit.to_string();
        w.bytes = bytes;
        w.dirty = dirty;
        w.jobs += 1;
        w.updated_ms = now_ms();
        self.kv
            .update(&self.key(&w.name), codec::encode(&w)?.into(), rev)
            .await
            .map_err(|e| BusError::JetStream(format!("release workspace {}: {e}", w.name)))?;
        Ok(())
    }
}
