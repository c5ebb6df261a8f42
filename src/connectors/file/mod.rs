//! JSONL files: the embedded default binding.

pub mod sink;
pub mod source;
pub mod write_behind;
