//! Values and records that travel between stages.

use serde::{Deserialize, Serialize};

/// A field value after decoding. Integers stay integers so that documents
/// print them as the producer sent them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Int(i64),
    Num(f64),
    /// Inline up to 23 bytes, shared beyond: listing states are cloned
    /// several times per event, and a `String` per field made that a malloc each.
    Str(smol_str::SmolStr),
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Num(n) => Some(*n),
            Value::Str(_) => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// Where a record came from: enough to find it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SourcePosition {
    pub partition: u32,
    /// Line number for files (0-based), offset for Kafka.
    pub offset: u64,
    /// Byte offset of the record's first byte, for files.
    pub byte_offset: u64,
    /// Kafka: the record's timestamp (ms since the epoch) as the broker gave it; 0 for files.
    /// Carried to the output headers so end-to-end latency can be measured.
    pub timestamp_ms: i64,
}

/// Bytes as read from a source, before decoding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RawRecord {
    pub bytes: Vec<u8>,
    pub position: SourcePosition,
    /// Nanoseconds since the run started, when the source read it: for latency only.
    pub read_at_nanos: u64,
}

/// A record that failed somewhere, with everything needed to find and replay it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub bytes: Vec<u8>,
    pub position: SourcePosition,
    /// Short, stable, machine-readable: counted per reason in the summary.
    pub reason: String,
    pub detail: String,
    pub stage: String,
    pub read_at_nanos: u64,
}

/// One output record for the search index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputDocument {
    pub key: String,
    /// Monotone per listing: the indexer's external version.
    pub version: u64,
    /// The document as JSON, or `None` for a tombstone.
    pub body: Option<String>,
    pub position: SourcePosition,
    pub read_at_nanos: u64,
    /// Emitted because the listing's market statistics moved, not for an
    /// event of its own (`position` then holds only the partition).
    pub market: bool,
}

#[cfg(test)]
impl OutputDocument {
    /// A small upsert of `key` at version 1, for the sinks' tests.
    pub fn for_test(key: &str) -> Self {
        OutputDocument {
            key: key.to_string(),
            version: 1,
            body: Some("{\"price\":1}".to_string()),
            position: SourcePosition {
                partition: 0,
                offset: 0,
                byte_offset: 0,
                timestamp_ms: 0,
            },
            read_at_nanos: 0,
            market: false,
        }
    }
}
