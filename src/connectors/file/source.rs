//! File source: a JSONL file read as a keyed, partitioned stream.
//!
//! A line's partition is `fnv1a(key) mod partitions`, where the key is the
//! top-level key field found by a small scanner (no full parse). Every worker
//! scans the whole file and keeps the lines of the partitions it owns, so a
//! listing's events stay on one worker in file order, as with a keyed Kafka
//! topic. Lines whose key cannot be found are assigned by line number; decode
//! dead-letters them.
//!
//! # Positions
//! Per partition: the next line and byte to read. A worker resumes at the
//! smallest position of its partitions and skips lines of a partition below
//! that partition's own position, so a different worker count resumes
//! correctly too.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;
use std::time::Instant;

use crate::record::{RawRecord, SourcePosition};
use crate::state::CheckpointedPosition;

#[derive(Debug, thiserror::Error)]
#[error("cannot read input file {path}: {detail}")]
pub struct FileSourceError {
    pub path: String,
    pub detail: String,
}

pub struct FileSource {
    reader: BufReader<File>,
    path: String,
    key_field: Vec<u8>,
    partitions: u32,
    owned: Vec<bool>,
    resume_at: HashMap<u32, u64>,
    next_line: u64,
    next_byte: u64,
    total_bytes: u64,
    finished: bool,
    started: Instant,
    records_per_second: u64,
    records_emitted: u64,
    /// When the first read came (nanoseconds since `started`): the pace counts
    /// from there, not from the start of the process (models and state load
    /// first), or the first records would all be late.
    pace_from_nanos: Option<u64>,
    line: Vec<u8>,
}

impl FileSource {
    pub fn open(
        path: &Path,
        key_field: &str,
        partitions: u32,
        owned: &[u32],
        checkpointed: &HashMap<u32, CheckpointedPosition>,
        records_per_second: u64,
        started: Instant,
    ) -> Result<FileSource, FileSourceError> {
        let error = |detail: String| FileSourceError {
            path: path.display().to_string(),
            detail,
        };
        let file = File::open(path).map_err(|e| error(e.to_string()))?;
        let total_bytes = file.metadata().map_err(|e| error(e.to_string()))?.len();
        let mut owned_flags = vec![false; partitions as usize];
        for p in owned {
            owned_flags[*p as usize] = true;
        }
        // start at the least advanced owned partition
        let start = owned
            .iter()
            .map(|p| checkpointed.get(p).copied().unwrap_or_default())
            .min_by_key(|p| p.next_offset)
            .unwrap_or_default();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        reader
            .seek(SeekFrom::Start(start.next_byte))
            .map_err(|e| error(e.to_string()))?;
        let resume_at = owned
            .iter()
            .map(|p| (*p, checkpointed.get(p).map(|c| c.next_offset).unwrap_or(0)))
            .collect();
        Ok(FileSource {
            reader,
            path: path.display().to_string(),
            key_field: format!("\"{key_field}\"").into_bytes(),
            partitions,
            owned: owned_flags,
            resume_at,
            next_line: start.next_offset,
            next_byte: start.next_byte,
            total_bytes,
            finished: owned.is_empty(),
            started,
            records_per_second,
            records_emitted: 0,
            pace_from_nanos: None,
            line: Vec::with_capacity(1024),
        })
    }

    /// The line number the next read starts at.
    pub fn next_line(&self) -> u64 {
        self.next_line
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    /// (bytes read, file size), for the progress bar.
    pub fn progress(&self) -> (u64, u64) {
        (self.next_byte, self.total_bytes)
    }

    /// The position every owned partition has reached.
    pub fn positions(&self) -> Vec<(u32, CheckpointedPosition)> {
        self.resume_at
            .keys()
            .map(|p| {
                (
                    *p,
                    CheckpointedPosition {
                        next_offset: self.next_line.max(self.resume_at[p]),
                        next_byte: self.next_byte,
                    },
                )
            })
            .collect()
    }

    /// Reads up to (not including) line `until_line`, appending owned records.
    /// A paced replay (`records_per_second`) stops early at the first record
    /// that is not due yet, like a live source with nothing new, so that the
    /// worker goes on stepping the dataflow instead of sleeping in here; call
    /// again until `reached(until_line)`.
    pub fn read_until(
        &mut self,
        until_line: u64,
        out: &mut Vec<RawRecord>,
    ) -> Result<(), FileSourceError> {
        if self.pace_from_nanos.is_none() {
            self.pace_from_nanos = Some(self.started.elapsed().as_nanos() as u64);
        }
        while !self.finished && self.next_line < until_line {
            let due_nanos = self.due_nanos();
            // (an unpaced replay is always due: no clock read per line)
            if self.records_per_second > 0 && due_nanos > self.started.elapsed().as_nanos() as u64 {
                break;
            }
            self.line.clear();
            let read = self.read_line().map_err(|e| FileSourceError {
                path: self.path.clone(),
                detail: e.to_string(),
            })?;
            if read == 0 {
                self.finished = true;
                break;
            }
            let line_number = self.next_line;
            let byte_offset = self.next_byte;
            self.next_line += 1;
            self.next_byte += read as u64;
            let mut bytes = &self.line[..];
            if bytes.ends_with(b"\n") {
                bytes = &bytes[..bytes.len() - 1];
            }
            if bytes.ends_with(b"\r") {
                bytes = &bytes[..bytes.len() - 1];
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines are not records
            }
            let partition = match find_top_level_key(bytes, &self.key_field) {
                Some(key) => (fnv1a(key) % self.partitions as u64) as u32,
                None => (line_number % self.partitions as u64) as u32,
            };
            if !self.owned[partition as usize] || line_number < self.resume_at[&partition] {
                continue;
            }
            out.push(RawRecord {
                bytes: bytes.to_vec(),
                position: SourcePosition {
                    partition,
                    offset: line_number,
                    byte_offset,
                    timestamp_ms: 0,
                },
                // A paced record "arrives" when it is due, as a live record is
                // appended to its topic: a worker that falls behind reads it
                // late, and its latency shows the wait.
                read_at_nanos: if self.records_per_second == 0 {
                    self.started.elapsed().as_nanos() as u64
                } else {
                    due_nanos
                },
            });
            self.records_emitted += 1;
        }
        Ok(())
    }

    /// Appends the next line, with its newline if it has one, to `self.line`,
    /// and gives the bytes read (0 at the end of the file): `BufRead::read_until`,
    /// with `memchr`'s vectorized search for the newline instead of std's
    /// word-at-a-time one (0.5% of a run's instructions on one worker; every
    /// worker reads every line).
    fn read_line(&mut self) -> std::io::Result<usize> {
        let mut read = 0;
        loop {
            let available = match self.reader.fill_buf() {
                Ok(available) => available,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            };
            if available.is_empty() {
                return Ok(read);
            }
            match memchr::memchr(b'\n', available) {
                Some(newline) => {
                    self.line.extend_from_slice(&available[..=newline]);
                    self.reader.consume(newline + 1);
                    return Ok(read + newline + 1);
                }
                None => {
                    let length = available.len();
                    self.line.extend_from_slice(available);
                    self.reader.consume(length);
                    read += length;
                }
            }
        }
    }

    /// Whether every line before `until_line` has been read (or the file ended).
    pub fn reached(&self, until_line: u64) -> bool {
        self.finished || self.next_line >= until_line
    }

    /// When the next owned record is due, in nanoseconds since the start; 0
    /// (always due) for an unpaced replay.
    fn due_nanos(&self) -> u64 {
        if self.records_per_second == 0 {
            return 0;
        }
        self.pace_from_nanos.unwrap_or(0)
            + (self.records_emitted as u128 * 1_000_000_000 / self.records_per_second as u128)
                as u64
    }
}

pub use crate::hash::fnv1a;

/// The raw bytes of the value of `"key"` at the top level of a JSON object:
/// a string's contents (without quotes; escapes left as written) or a
/// number's digits. Skips nested values and strings correctly; gives `None`
/// when the key is absent or the text is not an object.
pub fn find_top_level_key<'a>(text: &'a [u8], quoted_key: &[u8]) -> Option<&'a [u8]> {
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < text.len() && text[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    let string_end = |start: usize| -> Option<usize> {
        // start is at the opening quote; returns the index of the closing quote
        let mut j = start + 1;
        loop {
            j = crate::scan::quote_or_backslash(text, j);
            match text.get(j)? {
                b'\\' => j += 2,
                _ => return Some(j),
            }
        }
    };
    skip_ws(&mut i);
    if text.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        skip_ws(&mut i);
        if text.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(i)?;
        let is_wanted = &text[i..=key_end] == quoted_key;
        i = key_end + 1;
        skip_ws(&mut i);
        if text.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        skip_ws(&mut i);
        let value_start = i;
        // skip the value
        match text.get(i)? {
            b'"' => {
                let end = string_end(i)?;
                if is_wanted {
                    return Some(&text[value_start + 1..end]);
                }
                i = end + 1;
            }
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match text.get(i)? {
                        b'"' => {
                            i = string_end(i)?;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                i += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    i += 1;
                }
            }
            _ => {
                while i < text.len()
                    && !matches!(text[i], b',' | b'}')
                    && !text[i].is_ascii_whitespace()
                {
                    i += 1;
                }
                if is_wanted {
                    return Some(&text[value_start..i]);
                }
            }
        }
        skip_ws(&mut i);
        match text.get(i)? {
            b',' => i += 1,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_top_level_keys() {
        let key = b"\"id\"";
        assert_eq!(
            find_top_level_key(br#"{"id":"a1","x":2}"#, key),
            Some(&b"a1"[..])
        );
        assert_eq!(
            find_top_level_key(br#"{"x":{"id":"inner"},"id":"outer"}"#, key),
            Some(&b"outer"[..])
        );
        assert_eq!(
            find_top_level_key(br#"{"x":"say \"id\":\"no\"","id":7}"#, key),
            Some(&b"7"[..])
        );
        assert_eq!(find_top_level_key(br#"{"x":[1,{"id":2}]}"#, key), None);
        assert_eq!(find_top_level_key(br#"{"id":"trunc"#, key), None);
        assert_eq!(find_top_level_key(b"[1,2]", key), None);
        assert_eq!(find_top_level_key(b"", key), None);
    }

    #[test]
    fn the_scanner_agrees_with_a_json_parser() {
        // keys extracted by the scanner equal the parsed key, on the committed sample
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/listings/data/listing_changes.jsonl"
        ))
        .unwrap();
        for line in text.lines().take(2000) {
            let parsed: serde_json::Value = serde_json::from_str(line).unwrap();
            let found = find_top_level_key(line.as_bytes(), b"\"listing_id\"").unwrap();
            assert_eq!(
                std::str::from_utf8(found).unwrap(),
                parsed["listing_id"].as_str().unwrap()
            );
        }
    }
}
