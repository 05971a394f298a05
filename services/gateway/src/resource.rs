//! Instance names, digests and ByteStream resource names, validated at the edge.

use motorpool_cas_client::ApiError;
pub use motorpool_cas_client::proto::{digest, digest_function, to_proto};
use motorpool_messages::{BlobDigest, DigestFunction};

/// Path segments that mark the end of an instance name in a resource name; an instance name may
/// not contain them.
const RESERVED: [&str; 7] = [
    "blobs",
    "uploads",
    "compressed-blobs",
    "actions",
    "actionResults",
    "operations",
    "capabilities",
];

/// Checks an instance name: `/`-separated segments, none empty, `.`, `..` or reserved, no control
/// characters, at most 256 bytes. `allowed` (when non-empty) lists the instance names in use.
pub fn check_instance(name: &str, allowed: &[String]) -> Result<(), ApiError> {
    if !name.is_empty() {
        if name.len() > 256 {
            return Err(ApiError::Invalid(
                "instance name is longer than 256 bytes".into(),
            ));
        }
        for seg in name.split('/') {
            if seg.is_empty()
                || seg == "."
                || seg == ".."
                || RESERVED.contains(&seg)
                || seg.chars().any(|c| c.is_control())
            {
                return Err(ApiError::Invalid(format!(
                    "instance name {name:?} has an invalid segment {seg:?}"
                )));
            }
        }
    }
    if !allowed.is_empty() && !allowed.iter().any(|a| a == name) {
        return Err(ApiError::Invalid(format!(
            "unknown instance name {name:?}; this server serves {allowed:?}"
        )));
    }
    Ok(())
}

/// A parsed ByteStream resource name.
#[derive(Debug, PartialEq, Eq)]
pub struct BlobResource {
    pub instance: String,
    pub digest: BlobDigest,
    /// For writes: the client's upload id.
    pub upload_id: Option<String>,
}

/// Parses `{instance}/blobs/{function/}{hash}/{size}` (read).
pub fn parse_read(name: &str, allowed: &[String]) -> Result<BlobResource, ApiError> {
    parse(name, false, allowed)
}

/// Parses `{instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}{/metadata...}` (write).
pub fn parse_write(name: &str, allowed: &[String]) -> Result<BlobResource, ApiError> {
    parse(name, true, allowed)
}

fn parse(name: &str, write: bool, allowed: &[String]) -> Result<BlobResource, ApiError> {
    let bad = |why: &str| {
        ApiError::Invalid(format!(
            "malformed resource name {:?}: {why}; expected {}",
            truncate(name),
            if write {
                "{instance}/uploads/{uuid}/blobs/{hash}/{size}"
            } else {
                "{instance}/blobs/{hash}/{size}"
            }
        ))
    };
    if name.len() > 2048 {
        return Err(bad("longer than 2048 bytes"));
    }
    let segs: Vec<&str> = name.split('/').collect();
    if segs.iter().any(|s| *s == ".." || *s == ".") {
        return Err(bad("`.` and `..` segments are not allowed"));
    }
    if segs.contains(&"compressed-blobs") {
        return Err(ApiError::Invalid(format!(
            "resource name {:?} asks for a compressed blob; this server supports only identity (see Capabilities)",
            truncate(name)
        )));
    }
    let (instance_end, upload_id, blobs_at) = if write {
        let u = segs
            .iter()
            .position(|s| *s == "uploads")
            .ok_or_else(|| bad("no `uploads` segment"))?;
        let id = segs
            .get(u + 1)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("no upload id"))?;
        if segs.get(u + 2) != Some(&"blobs") {
            return Err(bad("no `blobs` segment after the upload id"));
        }
        (u, Some(id.to_string()), u + 2)
    } else {
        let b = segs
            .iter()
            .position(|s| *s == "blobs")
            .ok_or_else(|| bad("no `blobs` segment"))?;
        (b, None, b)
    };
    let instance = segs[..instance_end].join("/");
    check_instance(&instance, allowed)?;
    let mut rest = &segs[blobs_at + 1..];
    let mut function = DigestFunction::Sha256;
    if let Some(first) = rest.first()
        && first.len() != 64
    {
        function = DigestFunction::from_name(first).ok_or_else(|| {
            ApiError::Invalid(format!(
                "digest function {first:?} is not supported; use sha256 or blake3"
            ))
        })?;
        rest = &rest[1..];
    }
    let (hash, size) = match rest {
        [hash, size] => (hash, size),
        [hash, size, ..] if write => (hash, size),
        _ => return Err(bad("expected a hash and a size after `blobs`")),
    };
    let size: i64 = size.parse().map_err(|_| bad("the size is not a number"))?;
    let digest = BlobDigest::parse(function, hash, size)
        .map_err(|e| ApiError::Invalid(format!("invalid digest in resource name: {e}")))?;
    Ok(BlobResource {
        instance,
        digest,
        upload_id,
    })
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn parses_reads_and_writes() {
        let r = parse_read(&format!("blobs/{H}/3"), &[]).unwrap();
        assert_eq!(r.instance, "");
        assert_eq!(r.digest.size, 3);
        let r = parse_read(&format!("prod/x86/blobs/blake3/{H}/3"), &[]).unwrap();
        assert_eq!(r.instance, "prod/x86");
        assert_eq!(r.digest.function, DigestFunction::Blake3);
        let w = parse_write(&format!("grey/uploads/u-1/blobs/{H}/3/extra/meta"), &[]).unwrap();
        assert_eq!(w.instance, "grey");
        assert_eq!(w.upload_id.as_deref(), Some("u-1"));
    }

    #[test]
    fn rejects_malformed_names() {
        for bad in [
            String::new(),
            format!("../blobs/{H}/3"),
            format!("a/../blobs/{H}/3"),
            format!("a//b/blobs/{H}/3"),
            format!("blobs/{H}"),
            format!("blobs/{H}/-1"),
            format!("blobs/{H}/x"),
            format!("blobs/md5/{H}/3"),
            format!("blobs/{}/3", &H[..10]),
            format!("blobs/{}/3", H.to_uppercase()),
            format!("compressed-blobs/zstd/{H}/3"),
            format!("blobs/{H}/3/extra"),
        ] {
            assert!(
                matches!(parse_read(&bad, &[]), Err(ApiError::Invalid(_))),
                "{bad}"
            );
        }
        assert!(parse_write(&format!("blobs/{H}/3"), &[]).is_err());
        assert!(parse_write(&format!("uploads//blobs/{H}/3"), &[]).is_err());
    }

    #[test]
    fn instance_policy() {
        let allowed = vec!["prod".to_string(), "grey".to_string()];
        assert!(parse_read(&format!("prod/blobs/{H}/3"), &allowed).is_ok());
        assert!(parse_read(&format!("test/blobs/{H}/3"), &allowed).is_err());
        assert!(check_instance("a\u{0}b", &[]).is_err());
        assert!(digest_function(2).is_err(), "SHA1 is refused");
        assert!(digest_function(12345).is_err());
        assert_eq!(digest_function(0).unwrap(), DigestFunction::Sha256);
    }
}
