//! The one error type of CAS calls and the gRPC front; it maps once to `tonic::Status`.

use motorpool_bus::BusError;
use motorpool_messages::{BlobDigest, ErrorCode, WireError};
use tonic::{Code, Status};

/// Every error a gateway handler can return.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Cancelled(String),
    #[error("{0}")]
    Aborted(String),
    /// The caller is known but may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller did not say who it is, or said it wrongly.
    #[error("{0}")]
    Unauthenticated(String),
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        let m = e.message;
        match e.code {
            ErrorCode::InvalidArgument => ApiError::Invalid(m),
            ErrorCode::NotFound => ApiError::NotFound(m),
            ErrorCode::AlreadyExists | ErrorCode::FailedPrecondition => {
                ApiError::FailedPrecondition(m)
            }
            ErrorCode::ResourceExhausted => ApiError::ResourceExhausted(m),
            ErrorCode::Unavailable => ApiError::Unavailable(m),
            ErrorCode::DeadlineExceeded => ApiError::DeadlineExceeded(m),
            ErrorCode::Unimplemented => ApiError::Unimplemented(m),
            ErrorCode::Internal => ApiError::Internal(m),
            ErrorCode::Cancelled => ApiError::Cancelled(m),
            ErrorCode::Aborted => ApiError::Aborted(m),
            ErrorCode::PermissionDenied => ApiError::PermissionDenied(m),
        }
    }
}

impl From<BusError> for ApiError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Remote(w) => w.into(),
            BusError::Timeout { .. } => ApiError::DeadlineExceeded(e.to_string()),
            BusError::Codec(_) => ApiError::Internal(e.to_string()),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            ApiError::Unimplemented(_) => Code::Unimplemented,
            ApiError::Internal(_) => Code::Internal,
            ApiError::Cancelled(_) => Code::Cancelled,
            ApiError::Aborted(_) => Code::Aborted,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
        };
        let message = e.to_string();
        if let ApiError::FailedPrecondition(m) = &e
            && let Some(d) = WireError::new(ErrorCode::FailedPrecondition, m.clone()).missing_blob()
        {
            let details = tonic_types::ErrorDetails::with_precondition_failure_violation(
                "MISSING",
                missing_subject(&d),
                "not in the CAS",
            );
            return <Status as tonic_types::StatusExt>::with_error_details(code, message, details);
        }
        Status::new(code, message)
    }
}

/// REAPI's way of saying which blob an execution lacks: a `PreconditionFailure` whose violation
/// has type `MISSING` and this subject, `blobs/{hash}/{size}` (`blobs/blake3/{hash}/{size}` for
/// BLAKE3). Bazel answers it by uploading the blob and executing again.
pub fn missing_subject(d: &BlobDigest) -> String {
    let function = match d.function {
        motorpool_messages::DigestFunction::Sha256 => String::new(),
        f => format!("{}/", f.name()),
    };
    format!("blobs/{function}{}/{}", d.hex(), d.size)
}

impl From<ApiError> for WireError {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::Invalid(_) => ErrorCode::InvalidArgument,
            ApiError::NotFound(_) => ErrorCode::NotFound,
            ApiError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            ApiError::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::DeadlineExceeded(_) => ErrorCode::DeadlineExceeded,
            ApiError::Unimplemented(_) => ErrorCode::Unimplemented,
            ApiError::Internal(_) => ErrorCode::Internal,
            ApiError::Cancelled(_) => ErrorCode::Cancelled,
            ApiError::Aborted(_) => ErrorCode::Aborted,
            // The bus has no identities yet: these never cross it from a gateway.
            ApiError::PermissionDenied(_) | ApiError::Unauthenticated(_) => {
                ErrorCode::FailedPrecondition
            }
        };
        WireError::new(code, e.to_string())
    }
}
