//! Conversions between REAPI protos and Motorpool's digest types, validated.

use crate::ApiError;
use bazel_remote_apis::build::bazel::remote::execution::v2 as re;
use motorpool_messages::{BlobDigest, DigestFunction};

/// The digest function of a request (`digest_function` field, REAPI 2.3). Unset means SHA-256,
/// which is what clients that predate the field (Bazel 4) use.
pub fn digest_function(value: i32) -> Result<DigestFunction, ApiError> {
    use re::digest_function::Value;
    match Value::try_from(value) {
        Ok(Value::Unknown) | Ok(Value::Sha256) => Ok(DigestFunction::Sha256),
        Ok(Value::Blake3) => Ok(DigestFunction::Blake3),
        Ok(other) => Err(ApiError::Invalid(format!(
            "digest function {} is not supported; use SHA256 or BLAKE3",
            other.as_str_name()
        ))),
        Err(_) => Err(ApiError::Invalid(format!(
            "unknown digest function {value}; use SHA256 or BLAKE3"
        ))),
    }
}

/// A REAPI digest under `function`.
pub fn digest(function: DigestFunction, d: Option<&re::Digest>) -> Result<BlobDigest, ApiError> {
    let d = d.ok_or_else(|| ApiError::Invalid("a digest is missing".into()))?;
    BlobDigest::parse(function, &d.hash, d.size_bytes)
        .map_err(|e| ApiError::Invalid(format!("invalid digest: {e}")))
}

/// The REAPI form of a digest.
pub fn to_proto(d: &BlobDigest) -> re::Digest {
    re::Digest {
        hash: d.hex(),
        size_bytes: d.size as i64,
    }
}
