//! The error a remote handler answers with. Its code mirrors the gRPC status codes the gateway
//! will hand to clients, so the error a Bazel user sees is the one the shard meant.

use serde::{Deserialize, Serialize};
use std::fmt;

/// gRPC-style error class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    ResourceExhausted,
    Unavailable,
    DeadlineExceeded,
    Internal,
    Unimplemented,
    Cancelled,
    Aborted,
    /// The sender may not ask this (the bus's subject says who it is, and that is not who the
    /// message claims to be).
    PermissionDenied,
}

/// An error carried in a reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// FAILED_PRECONDITION for a blob an execution needs that no shard holds: the client must
    /// upload it and execute again. The gateway tells REAPI clients which blob in a
    /// `PreconditionFailure` (see [`WireError::missing_blob`]), which Bazel answers by uploading
    /// it and executing again.
    pub fn missing_input(what: &str, d: &crate::BlobDigest) -> Self {
        Self::new(
            ErrorCode::FailedPrecondition,
            format!("{what} {d}{MISSING}; upload it and execute again"),
        )
    }

    /// The blob a [`WireError::missing_input`] error names.
    pub fn missing_blob(&self) -> Option<crate::BlobDigest> {
        if self.code != ErrorCode::FailedPrecondition {
            return None;
        }
        let (before, _) = self.message.split_once(MISSING)?;
        let digest = before.rsplit(' ').next()?;
        let (function, rest) = digest.split_once(':')?;
        let (hash, size) = rest.split_once('/')?;
        crate::BlobDigest::parse(
            crate::DigestFunction::from_name(function)?,
            hash,
            size.parse().ok()?,
        )
        .ok()
    }
}

/// What follows the digest in a [`WireError::missing_input`] message.
const MISSING: &str = " is missing from the CAS";

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for WireError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_input_names_its_blob_and_nothing_else_does() {
        let d = crate::DigestFunction::Sha256.digest_of(b"input");
        let e = WireError::missing_input("input blob", &d);
        assert_eq!(e.code, ErrorCode::FailedPrecondition);
        assert_eq!(e.missing_blob(), Some(d));
        let other = WireError::new(ErrorCode::FailedPrecondition, format!("blob {d} is late"));
        assert_eq!(other.missing_blob(), None);
        let not_precondition = WireError::not_found(e.message.clone());
        assert_eq!(not_precondition.missing_blob(), None);
    }
}
