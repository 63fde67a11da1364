//! vmvault capture (in progress).
