//! File sink: appends JSONL records, one per line.
//!
//! Documents are written as an envelope that mirrors a Kafka record:
//! `{"key":…,"version":…,"op":"upsert","doc":{…}}` or `"op":"delete","doc":null`.
//! Dead letters as `{"reason":…,"stage":…,"detail":…,"source":{…},"bytes_base64":…}`.
//!
//! # Durability
//! Each completed epoch is written and flushed to the OS before the epoch is
//! released downstream, so a checkpoint never covers output that a `kill -9`
//! could lose. (A power loss could; the sink does not fsync.) On open, a
//! trailing partial line left by a crash mid-write is cut off.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use base64::Engine;

use crate::record::{DeadLetter, OutputDocument};

#[derive(Debug, thiserror::Error)]
#[error("cannot write output file {path}: {detail}")]
pub struct FileSinkError {
    pub path: String,
    pub detail: String,
}

pub struct FileSink {
    writer: BufWriter<File>,
    path: String,
    buffer: Vec<u8>,
}

impl FileSink {
    /// Opens for appending; `truncate` starts the file afresh.
    pub fn open(path: &Path, truncate: bool) -> Result<FileSink, FileSinkError> {
        let error = |detail: String| FileSinkError {
            path: path.display().to_string(),
            detail,
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| error(e.to_string()))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(truncate)
            .open(path)
            .map_err(|e| error(e.to_string()))?;
        cut_partial_last_line(&mut file).map_err(|e| error(e.to_string()))?;
        file.seek(SeekFrom::End(0))
            .map_err(|e| error(e.to_string()))?;
        Ok(FileSink {
            writer: BufWriter::with_capacity(1 << 20, file),
            path: path.display().to_string(),
            buffer: Vec::with_capacity(4096),
        })
    }

    pub fn write_document(&mut self, document: &OutputDocument) -> Result<(), FileSinkError> {
        self.buffer.clear();
        self.buffer.extend_from_slice(b"{\"key\":");
        write_json_string(&mut self.buffer, &document.key);
        self.buffer.extend_from_slice(b",\"version\":");
        self.buffer
            .extend_from_slice(itoa::Buffer::new().format(document.version).as_bytes());
        match &document.body {
            Some(body) => {
                self.buffer
                    .extend_from_slice(b",\"op\":\"upsert\",\"doc\":");
                self.buffer.extend_from_slice(body.as_bytes());
            }
            None => self
                .buffer
                .extend_from_slice(b",\"op\":\"delete\",\"doc\":null"),
        }
        self.buffer.extend_from_slice(b"}\n");
        self.write_buffer()
    }

    pub fn write_dead_letter(
        &mut self,
        letter: &DeadLetter,
        binding: &str,
    ) -> Result<(), FileSinkError> {
        // written field by field, as serde wrote `DeadLetterLine` (the unit
        // test below compares the two): the base64 text, most of the line,
        // goes straight into the buffer, without a String of its own and
        // without a scan for characters to escape that base64 never has
        self.buffer.clear();
        self.buffer.extend_from_slice(b"{\"reason\":");
        write_json_string(&mut self.buffer, &letter.reason);
        self.buffer.extend_from_slice(b",\"stage\":");
        write_json_string(&mut self.buffer, &letter.stage);
        self.buffer.extend_from_slice(b",\"detail\":");
        write_json_string(&mut self.buffer, &letter.detail);
        self.buffer.extend_from_slice(b",\"source\":{\"binding\":");
        write_json_string(&mut self.buffer, binding);
        let mut number = itoa::Buffer::new();
        self.buffer.extend_from_slice(b",\"partition\":");
        self.buffer
            .extend_from_slice(number.format(letter.position.partition).as_bytes());
        self.buffer.extend_from_slice(b",\"offset\":");
        self.buffer
            .extend_from_slice(number.format(letter.position.offset).as_bytes());
        self.buffer.extend_from_slice(b",\"byte_offset\":");
        self.buffer
            .extend_from_slice(number.format(letter.position.byte_offset).as_bytes());
        self.buffer.extend_from_slice(b"},\"bytes_base64\":\"");
        let start = self.buffer.len();
        let encoded =
            base64::encoded_len(letter.bytes.len(), true).expect("a record's length fits");
        self.buffer.resize(start + encoded, 0);
        base64::engine::general_purpose::STANDARD
            .encode_slice(&letter.bytes, &mut self.buffer[start..])
            .expect("the buffer was sized for the encoding");
        self.buffer.extend_from_slice(b"\"}\n");
        self.write_buffer()
    }

    fn write_buffer(&mut self) -> Result<(), FileSinkError> {
        self.writer
            .write_all(&self.buffer)
            .map_err(|e| FileSinkError {
                path: self.path.clone(),
                detail: e.to_string(),
            })
    }

    /// Hands everything written so far to the OS.
    pub fn flush(&mut self) -> Result<(), FileSinkError> {
        self.writer.flush().map_err(|e| FileSinkError {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }
}

/// `text` as a JSON string, as serde_json writes it: most keys and reasons
/// need no escaping (no quote, backslash or control byte, the only bytes
/// serde_json escapes) and are copied between quotes; serde_json's own
/// writer took about 150 instructions for a ten-byte key. The shaper's
/// `write_string` is its twin for a `String`; it checks with a byte table
/// instead, because document values are shorter than the word this search
/// reads (the word search there cost 0.4%, `docs/benchmarks.md`, stop 30).
fn write_json_string(buffer: &mut Vec<u8>, text: &str) {
    if crate::scan::string_stop(text.as_bytes(), 0).is_none() {
        buffer.reserve(text.len() + 2);
        buffer.push(b'"');
        buffer.extend_from_slice(text.as_bytes());
        buffer.push(b'"');
    } else {
        serde_json::to_writer(&mut *buffer, text).expect("a string serializes");
    }
}

fn cut_partial_last_line(file: &mut File) -> std::io::Result<()> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    // look back for the last newline in chunks
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let start = end.saturating_sub(chunk.len() as u64);
        let size = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..size])?;
        if let Some(i) = chunk[..size].iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep != len {
                file.set_len(keep)?;
            }
            return Ok(());
        }
        if start == 0 {
            file.set_len(0)?;
            return Ok(());
        }
        end = start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead letter as serde wrote it before `write_dead_letter` wrote it
    /// field by field: fields in this order, for people reading the file.
    #[derive(serde::Serialize)]
    struct DeadLetterLine<'a> {
        reason: &'a str,
        stage: &'a str,
        detail: &'a str,
        source: SourceLine<'a>,
        bytes_base64: String,
    }

    #[derive(serde::Serialize)]
    struct SourceLine<'a> {
        binding: &'a str,
        partition: u32,
        offset: u64,
        byte_offset: u64,
    }

    #[test]
    fn a_dead_letter_line_is_what_serde_writes_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dead.jsonl");
        let mut sink = FileSink::open(&path, true).unwrap();
        let mut expected = Vec::new();
        let texts = [
            "",
            "out_of_range",
            "a \"quote\", a \\ and a\ttab\n",
            "\u{1}\u{7f}é😀",
        ];
        let payloads: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"{".to_vec(),
            b"ab".to_vec(),
            b"abc".to_vec(),
            vec![0xff, 0xfe, 0x00, b'"', b'\\'],
            (0..=255u8).cycle().take(10 * 1024 * 1024 + 1).collect(),
        ];
        for (i, bytes) in payloads.into_iter().enumerate() {
            for text in texts {
                let letter = DeadLetter {
                    bytes: bytes.clone(),
                    position: crate::record::SourcePosition {
                        partition: i as u32 * 7,
                        offset: u64::MAX - i as u64,
                        byte_offset: i as u64 * 1000,
                        timestamp_ms: 0,
                    },
                    reason: text.to_string(),
                    detail: format!("{text} in record {i}"),
                    stage: text.chars().rev().collect(),
                    read_at_nanos: 0,
                };
                sink.write_dead_letter(&letter, text).unwrap();
                let line = DeadLetterLine {
                    reason: &letter.reason,
                    stage: &letter.stage,
                    detail: &letter.detail,
                    source: SourceLine {
                        binding: text,
                        partition: letter.position.partition,
                        offset: letter.position.offset,
                        byte_offset: letter.position.byte_offset,
                    },
                    bytes_base64: base64::engine::general_purpose::STANDARD.encode(&letter.bytes),
                };
                serde_json::to_writer(&mut expected, &line).unwrap();
                expected.push(b'\n');
            }
        }
        sink.flush().unwrap();
        assert!(
            std::fs::read(&path).unwrap() == expected,
            "the lines differ"
        );
    }

    #[test]
    fn a_document_line_is_what_serde_writes_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("documents.jsonl");
        let mut sink = FileSink::open(&path, true).unwrap();
        let mut expected = String::new();
        let keys = [
            "g-00000001",
            "",
            "a \"quote\" and a \\",
            "tab\there",
            "\u{1}\u{1f}\u{7f}é😀",
        ];
        for (i, key) in keys.iter().enumerate() {
            for body in [Some("{\"price\":1}".to_string()), None] {
                let document = OutputDocument {
                    key: key.to_string(),
                    version: (i as u64) << 32 | 7,
                    body: body.clone(),
                    position: crate::record::SourcePosition {
                        partition: 0,
                        offset: 0,
                        byte_offset: 0,
                        timestamp_ms: 0,
                    },
                    read_at_nanos: 0,
                    market: false,
                };
                sink.write_document(&document).unwrap();
                let (op, doc) = match &body {
                    Some(body) => ("upsert", body.as_str()),
                    None => ("delete", "null"),
                };
                expected.push_str(&format!(
                    "{{\"key\":{},\"version\":{},\"op\":\"{op}\",\"doc\":{doc}}}\n",
                    serde_json::to_string(key).unwrap(),
                    document.version
                ));
            }
        }
        sink.flush().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), expected);
    }

    #[test]
    fn a_partial_last_line_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        let mut sink = FileSink::open(&path, false).unwrap();
        sink.flush().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n"
        );
        std::fs::write(&path, "no newline at all").unwrap();
        FileSink::open(&path, false).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
