//! Every NATS subject and JetStream resource Motorpool uses, built here and nowhere else.
//!
//! Scheme: `mp.<version>.<domain>.<noun>.<verb>[.<id>]`. The id comes last so that a wildcard
//! (`mp.v1.cas.shard.heartbeat.*`) selects all instances of one message.

use std::fmt;

/// Subject root shared by every Motorpool message.
pub const ROOT: &str = "mp";
/// Subject-scheme version; a breaking change to the scheme gets a new one.
pub const VERSION: &str = "v1";

/// A NATS subject.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subject(String);

impl Subject {
    fn build(domain: &str, noun: &str, verb: &str, id: Option<&str>) -> Subject {
        let mut s = format!("{ROOT}.{VERSION}.{domain}.{noun}.{verb}");
        if let Some(id) = id {
            s.push('.');
            s.push_str(id);
        }
        Subject(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Subject> for async_nats::Subject {
    fn from(s: Subject) -> Self {
        async_nats::Subject::from(s.0)
    }
}

/// True when `id` can be a subject token and a KV key: ASCII letters, digits, `-` and `_`,
/// at most 64 characters.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Content-addressable storage: the gateway and the CAS shards.
pub mod cas {
    use super::Subject;

    const DOMAIN: &str = "cas";

    /// `FindMissing` to one shard.
    pub fn find_missing(shard: &str) -> Subject {
        Subject::build(DOMAIN, "blob", "find", Some(shard))
    }
    /// `BatchWrite` to one shard.
    pub fn batch_write(shard: &str) -> Subject {
        Subject::build(DOMAIN, "blob", "write", Some(shard))
    }
    /// `BatchRead` to one shard.
    pub fn batch_read(shard: &str) -> Subject {
        Subject::build(DOMAIN, "blob", "read", Some(shard))
    }
    /// `ReadChunk` to one shard (chunked read over NATS).
    pub fn read_chunk(shard: &str) -> Subject {
        Subject::build(DOMAIN, "chunk", "read", Some(shard))
    }
    /// `WriteChunk` to one shard (chunked write over NATS).
    pub fn write_chunk(shard: &str) -> Subject {
        Subject::build(DOMAIN, "chunk", "write", Some(shard))
    }
    /// `QueryWrite` to one shard.
    pub fn query_write(shard: &str) -> Subject {
        Subject::build(DOMAIN, "upload", "query", Some(shard))
    }
    /// `AcGet` to one shard.
    pub fn ac_get(shard: &str) -> Subject {
        Subject::build(DOMAIN, "action", "get", Some(shard))
    }
    /// `AcPut` to one shard.
    pub fn ac_put(shard: &str) -> Subject {
        Subject::build(DOMAIN, "action", "put", Some(shard))
    }
    /// `AcDelete` to one shard.
    pub fn ac_delete(shard: &str) -> Subject {
        Subject::build(DOMAIN, "action", "delete", Some(shard))
    }
    /// `ShardInfo` heartbeats of one shard.
    pub fn heartbeat(shard: &str) -> Subject {
        Subject::build(DOMAIN, "shard", "heartbeat", Some(shard))
    }
    /// Heartbeats of every shard.
    pub fn all_heartbeats() -> Subject {
        Subject::build(DOMAIN, "shard", "heartbeat", Some("*"))
    }
    /// The shard registry: a JetStream KV bucket, key = shard id, value = `ShardInfo`.
    pub const REGISTRY_BUCKET: &str = "mp_v1_cas_shards";

    /// How the shard registry bucket is set up (by whichever service starts first): the latest
    /// entry per shard; entries of shards silent for an hour age out.
    pub fn registry_config() -> async_nats::jetstream::kv::Config {
        async_nats::jetstream::kv::Config {
            bucket: REGISTRY_BUCKET.to_string(),
            history: 1,
            max_age: std::time::Duration::from_secs(3600),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_puts_ids_last() {
        assert_eq!(cas::find_missing("s1").as_str(), "mp.v1.cas.blob.find.s1");
        assert_eq!(
            cas::heartbeat("w-7").as_str(),
            "mp.v1.cas.shard.heartbeat.w-7"
        );
        assert_eq!(
            cas::all_heartbeats().as_str(),
            "mp.v1.cas.shard.heartbeat.*"
        );
    }

    #[test]
    fn ids_are_single_tokens() {
        assert!(valid_id("shard-01_a"));
        for bad in ["", "a.b", "a b", "a*", ">", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
