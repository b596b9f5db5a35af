//! The error a request fails with: a client-visible code and a safe message.

use chorus_protocol::ErrorCode;
use chorus_storage::{ErrorKind, StorageError};

/// A request failure as the client sees it. Never carries server internals.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{code:?}: {message}")]
pub struct Fail {
    pub code: ErrorCode,
    pub message: String,
}

impl Fail {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Fail {
        Fail {
            code,
            message: message.into(),
        }
    }
}

impl From<StorageError> for Fail {
    fn from(e: StorageError) -> Fail {
        match e.kind {
            ErrorKind::Unavailable => {
                tracing::warn!(error = %e, "store unavailable");
                Fail::new(ErrorCode::StoreUnavailable, "storage unavailable, retry")
            }
            ErrorKind::Conflict => Fail::new(ErrorCode::Conflict, "write conflict, retry"),
            ErrorKind::NotFound => Fail::new(ErrorCode::MessageNotFound, "not found"),
            ErrorKind::Corrupt | ErrorKind::Internal => {
                tracing::error!(error = %e, "store error");
                Fail::new(ErrorCode::Internal, "internal error")
            }
        }
    }
}

impl From<(ErrorCode, String)> for Fail {
    fn from((code, message): (ErrorCode, String)) -> Fail {
        Fail { code, message }
    }
}
