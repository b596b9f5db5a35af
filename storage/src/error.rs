//! Storage errors, with a kind that says whether retrying may help.

/// What went wrong, as far as a caller needs to decide what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The backend is down, overloaded or timed out; nothing was written, retrying may help.
    Unavailable,
    /// Another writer already holds an offset this append wanted; reload the head.
    Conflict,
    /// The thing to update does not exist.
    NotFound,
    /// Stored data could not be decoded, or the request was invalid; retrying will not help.
    Corrupt,
    /// Anything else; retrying will not help.
    Internal,
}

#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct StorageError {
    pub kind: ErrorKind,
    pub message: String,
}

impl StorageError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> StorageError {
        StorageError {
            kind,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> StorageError {
        StorageError::new(ErrorKind::Unavailable, message)
    }

    pub fn conflict(message: impl Into<String>) -> StorageError {
        StorageError::new(ErrorKind::Conflict, message)
    }

    pub fn not_found(message: impl Into<String>) -> StorageError {
        StorageError::new(ErrorKind::NotFound, message)
    }

    pub fn corrupt(message: impl Into<String>) -> StorageError {
        StorageError::new(ErrorKind::Corrupt, message)
    }

    pub fn internal(message: impl Into<String>) -> StorageError {
        StorageError::new(ErrorKind::Internal, message)
    }

    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self.kind, ErrorKind::Unavailable | ErrorKind::Conflict)
    }
}
