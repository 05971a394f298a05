//! The gateway's one error type; it maps once to `tonic::Status`.

use motorpool_bus::BusError;
use motorpool_messages::{ErrorCode, WireError};
use tonic::{Code, Status};

/// Every error a gateway handler can return.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
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
}

impl From<WireError> for GatewayError {
    fn from(e: WireError) -> Self {
        let m = e.message;
        match e.code {
            ErrorCode::InvalidArgument => GatewayError::Invalid(m),
            ErrorCode::NotFound => GatewayError::NotFound(m),
            ErrorCode::AlreadyExists | ErrorCode::FailedPrecondition => {
                GatewayError::FailedPrecondition(m)
            }
            ErrorCode::ResourceExhausted => GatewayError::ResourceExhausted(m),
            ErrorCode::Unavailable => GatewayError::Unavailable(m),
            ErrorCode::DeadlineExceeded => GatewayError::DeadlineExceeded(m),
            ErrorCode::Unimplemented => GatewayError::Unimplemented(m),
            ErrorCode::Internal => GatewayError::Internal(m),
        }
    }
}

impl From<BusError> for GatewayError {
    fn from(e: BusError) -> Self {
        match e {
            BusError::Remote(w) => w.into(),
            BusError::Timeout { .. } => GatewayError::DeadlineExceeded(e.to_string()),
            BusError::Codec(_) => GatewayError::Internal(e.to_string()),
            other => GatewayError::Unavailable(other.to_string()),
        }
    }
}

impl From<GatewayError> for Status {
    fn from(e: GatewayError) -> Self {
        let code = match &e {
            GatewayError::Invalid(_) => Code::InvalidArgument,
            GatewayError::NotFound(_) => Code::NotFound,
            GatewayError::FailedPrecondition(_) => Code::FailedPrecondition,
            GatewayError::ResourceExhausted(_) => Code::ResourceExhausted,
            GatewayError::Unavailable(_) => Code::Unavailable,
            GatewayError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            GatewayError::Unimplemented(_) => Code::Unimplemented,
            GatewayError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

impl From<GatewayError> for WireError {
    fn from(e: GatewayError) -> Self {
        let code = match &e {
            GatewayError::Invalid(_) => ErrorCode::InvalidArgument,
            GatewayError::NotFound(_) => ErrorCode::NotFound,
            GatewayError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            GatewayError::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
            GatewayError::Unavailable(_) => ErrorCode::Unavailable,
            GatewayError::DeadlineExceeded(_) => ErrorCode::DeadlineExceeded,
            GatewayError::Unimplemented(_) => ErrorCode::Unimplemented,
            GatewayError::Internal(_) => ErrorCode::Internal,
        };
        WireError::new(code, e.to_string())
    }
}
