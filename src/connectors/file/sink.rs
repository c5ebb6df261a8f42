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
        serde_json::to_writer(&mut self.buffer, &document.key).expect("a string serializes");
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
        let line = DeadLetterLine {
            reason: &letter.reason,
            stage: &letter.stage,
            detail: &letter.detail,
            source: SourceLine {
                binding,
                partition: letter.position.partition,
                offset: letter.position.offset,
                byte_offset: letter.position.byte_offset,
            },
            bytes_base64: base64::engine::general_purpose::STANDARD.encode(&letter.bytes),
        };
        self.buffer.clear();
        serde_json::to_writer(&mut self.buffer, &line).expect("json serializes");
        self.buffer.push(b'\n');
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

/// A dead letter as written: fields in this order, for people reading the file.
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
