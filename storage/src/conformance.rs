//! Conformance suite. IN PROGRESS (helper owns this file).
