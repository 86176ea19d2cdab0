//! One bad field of a request and why: the leaf that ids and errors both build on.
//!
//! Imports nothing of the crate.

/// One bad field of a request and why it is bad.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}
