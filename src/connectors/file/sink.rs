//! File sink: appends JSONL records, one per line.
//!
//! Documents are written as an envelope that mirrors a Kafka record:
//! `{"key":…,"version":…,"op":"upsert","doc":{…}}` or `"op":"delete","doc":null`.
//! Dead letters as `{"reason":…,"stage":…,"detail":…,"source":{…},"bytes_base64":…}`.
//!
//! # Writing on a thread of its own
//! The worker formats lines into a chunk; `hand_over` passes the chunk, with
//! the epochs it completes, to the sink's writer thread, which writes it and
//! then reports those epochs delivered (`delivered_below`, and a wake-up of
//! the sink stage), as a Kafka sink reports acknowledgements. Copying a
//! document file into the page cache was about 13% of the worker's time in
//! a 1-worker run of the full topology (`perf`, `docs/benchmarks.md`, stop
//! 31), time the worker now spends on the next epochs while another core
//! writes. At most `CHUNKS_IN_FLIGHT` chunks wait for the thread: a slow
//! disk holds the worker back rather than filling memory.
//!
//! # Durability
//! An epoch is delivered once the thread has handed its lines to the OS, and
//! only a delivered epoch is released downstream, so a checkpoint never
//! covers output that a `kill -9` could lose. (A power loss could; the sink
//! does not fsync.) On open, a trailing partial line left by a crash
//! mid-write is cut off.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use base64::Engine;
use timely::scheduling::SyncActivator;

use crate::record::{DeadLetter, OutputDocument};

#[derive(Debug, thiserror::Error)]
#[error("cannot write output file {path}: {detail}")]
pub struct FileSinkError {
    pub path: String,
    pub detail: String,
}

/// Chunks handed over and not yet written, at most.
const CHUNKS_IN_FLIGHT: usize = 2;

/// A chunk goes to the thread once it holds this much, even mid-epoch: the
/// buffers in flight and kept for reuse then hold a few megabytes, whatever
/// an epoch's size (a hand-over can hold several epochs of documents).
const CHUNK_BYTES: usize = 1 << 20;

/// A chunk's buffer is made this much larger than `CHUNK_BYTES`, so that the
/// line that fills it does not double it (a `Vec` grows by doubling).
const LINE_ROOM: usize = 64 << 10;

pub struct FileSink {
    path: String,
    /// Lines written since the last hand-over: what the thread gets next.
    buffer: Vec<u8>,
    /// Every epoch below this one has begun (`begin_epoch`): the epochs a
    /// hand-over completes.
    epochs_below: u64,
    /// Every epoch below this one is wholly in `buffer` or handed over: what
    /// a chunk sent mid-epoch completes.
    finished_below: u64,
    /// To the writer thread; `None` once closed (on drop).
    chunks: Option<SyncSender<Message>>,
    /// Written chunks, back from the thread empty, to be filled again: a
    /// fresh buffer per hand-over would be fresh pages, each faulted in.
    spare: Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Message {
    /// Lines to append, and the epoch below which every epoch is then written.
    Write(Vec<u8>, u64),
    /// Answered once everything sent before it is written.
    Sync(Sender<()>),
}

/// What the writer thread tells the sink.
struct Shared {
    delivered_below: AtomicU64,
    failure: Mutex<Option<String>>,
    /// The sink stage, woken when epochs are delivered.
    waker: Mutex<Option<SyncActivator>>,
}

impl Shared {
    fn wake(&self) {
        if let Some(waker) = self.waker.lock().expect("not poisoned").as_ref() {
            // (fails only when the worker is gone)
            let _ = waker.activate();
        }
    }
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
        let shared = Arc::new(Shared {
            delivered_below: AtomicU64::new(0),
            failure: Mutex::new(None),
            waker: Mutex::new(None),
        });
        let (chunks, to_write) = std::sync::mpsc::sync_channel(CHUNKS_IN_FLIGHT);
        let (give_back, spare) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("assay:file-sink".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || write_chunks(file, to_write, give_back, &shared)
            })
            .map_err(|e| error(e.to_string()))?;
        Ok(FileSink {
            path: path.display().to_string(),
            buffer: Vec::with_capacity(CHUNK_BYTES + LINE_ROOM),
            epochs_below: 0,
            finished_below: 0,
            chunks: Some(chunks),
            spare,
            shared,
            thread: Some(thread),
        })
    }

    /// The records written from now on belong to `epoch` (epochs are written
    /// one after another: the ones begun before it are finished).
    pub fn begin_epoch(&mut self, epoch: u64) {
        self.finished_below = self.epochs_below;
        self.epochs_below = self.epochs_below.max(epoch + 1);
    }

    /// Passes the lines written since the last hand-over to the writer
    /// thread, with the epochs they complete (every epoch begun); waits only
    /// when `CHUNKS_IN_FLIGHT` chunks are waiting already.
    pub fn hand_over(&mut self) -> Result<(), FileSinkError> {
        self.send_chunk(self.epochs_below)
    }

    /// Sends the buffer once it is a chunk's worth, completing only the
    /// epochs before the one being written.
    fn line_written(&mut self) -> Result<(), FileSinkError> {
        if self.buffer.len() >= CHUNK_BYTES {
            self.send_chunk(self.finished_below)?;
        }
        Ok(())
    }

    fn send_chunk(&mut self, epochs_below: u64) -> Result<(), FileSinkError> {
        self.check()?;
        let spare = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(CHUNK_BYTES + LINE_ROOM));
        let chunk = std::mem::replace(&mut self.buffer, spare);
        self.send(Message::Write(chunk, epochs_below))
    }

    /// Every epoch below the returned one, of those handed over, is written.
    pub fn delivered_below(&self) -> Result<u64, FileSinkError> {
        self.check()?;
        Ok(self.shared.delivered_below.load(Ordering::Acquire))
    }

    /// The sink stage to wake when epochs are delivered.
    pub fn wake_with(&mut self, waker: SyncActivator) {
        *self.shared.waker.lock().expect("not poisoned") = Some(waker);
    }

    /// Hands everything written so far to the OS, and waits until it is.
    pub fn flush(&mut self) -> Result<(), FileSinkError> {
        self.hand_over()?;
        self.wait_written()
    }

    /// Waits until the thread has written every chunk sent so far.
    fn wait_written(&mut self) -> Result<(), FileSinkError> {
        let (answer, answered) = std::sync::mpsc::channel();
        self.send(Message::Sync(answer))?;
        // (no answer: the thread stopped on a failure, which `check` reports)
        let _ = answered.recv();
        self.check()
    }

    fn send(&mut self, message: Message) -> Result<(), FileSinkError> {
        let sent = self
            .chunks
            .as_ref()
            .expect("open until dropped")
            .send(message);
        match sent {
            Ok(()) => Ok(()),
            // the thread ends early only on a failure
            Err(_) => self
                .check()
                .and(Err(self.failure("the writer thread stopped".into()))),
        }
    }

    fn check(&self) -> Result<(), FileSinkError> {
        match self.shared.failure.lock().expect("not poisoned").as_ref() {
            Some(detail) => Err(self.failure(detail.clone())),
            None => Ok(()),
        }
    }

    fn failure(&self, detail: String) -> FileSinkError {
        FileSinkError {
            path: self.path.clone(),
            detail,
        }
    }

    pub fn write_document(&mut self, document: &OutputDocument) -> Result<(), FileSinkError> {
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
        self.line_written()
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
        self.line_written()
    }
}

impl Drop for FileSink {
    /// Writes what was handed over (a run's end; on a failure the process
    /// stops without waiting) and ends the thread.
    fn drop(&mut self) {
        self.chunks = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: appends each chunk in order, then marks its epochs
/// delivered and gives the emptied chunk back. On a failure it records the
/// error and stops; the sink reports it on its next call.
fn write_chunks(
    mut file: File,
    to_write: Receiver<Message>,
    give_back: Sender<Vec<u8>>,
    shared: &Shared,
) {
    for message in to_write {
        match message {
            Message::Write(mut chunk, epochs_below) => {
                if let Err(e) = file.write_all(&chunk) {
                    *shared.failure.lock().expect("not poisoned") = Some(e.to_string());
                    shared.wake();
                    return;
                }
                shared
                    .delivered_below
                    .fetch_max(epochs_below, Ordering::Release);
                shared.wake();
                // (a chunk grown by one huge line is not kept)
                if chunk.capacity() <= 2 * CHUNK_BYTES {
                    chunk.clear();
                    let _ = give_back.send(chunk);
                }
            }
            Message::Sync(answer) => {
                let _ = answer.send(());
            }
        }
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

    fn document(key: &str) -> OutputDocument {
        OutputDocument {
            key: key.to_string(),
            version: 1,
            body: Some("{\"price\":1}".to_string()),
            position: crate::record::SourcePosition {
                partition: 0,
                offset: 0,
                byte_offset: 0,
                timestamp_ms: 0,
            },
            read_at_nanos: 0,
            market: false,
        }
    }

    /// The writer thread reports an epoch delivered only once its lines are
    /// in the file, and reports every epoch handed over.
    #[test]
    fn an_epoch_is_delivered_once_its_lines_are_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("documents.jsonl");
        let mut sink = FileSink::open(&path, true).unwrap();
        // file length after each epoch's lines
        let mut ends = Vec::new();
        let mut written = 0;
        for epoch in 0..300u64 {
            sink.begin_epoch(epoch);
            for i in 0..=epoch % 7 {
                let before = sink.buffer.len();
                sink.write_document(&document(&format!("{epoch}-{i}")))
                    .unwrap();
                written += (sink.buffer.len() - before) as u64;
            }
            ends.push(written);
            sink.hand_over().unwrap();
            let delivered = sink.delivered_below().unwrap();
            assert!(delivered <= epoch + 1, "epoch {epoch}: {delivered}");
            if delivered > 0 {
                let len = std::fs::metadata(&path).unwrap().len();
                assert!(
                    len >= ends[delivered as usize - 1],
                    "epoch {} reported delivered with {len} of its {} bytes in the file",
                    delivered - 1,
                    ends[delivered as usize - 1]
                );
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while sink.delivered_below().unwrap() < 300 {
            assert!(std::time::Instant::now() < deadline, "never delivered");
            std::thread::yield_now();
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), written);
    }

    /// A chunk sent because it is full, in the middle of an epoch, reports
    /// delivered only the epochs before that one.
    #[test]
    fn a_chunk_sent_mid_epoch_completes_only_the_epochs_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("documents.jsonl");
        let mut sink = FileSink::open(&path, true).unwrap();
        sink.begin_epoch(0);
        sink.write_document(&document("first")).unwrap();
        sink.hand_over().unwrap();
        sink.begin_epoch(1);
        let mut sent_mid_epoch = false;
        for i in 0.. {
            let before = sink.buffer.len();
            sink.write_document(&document(&format!("{i:0>200}")))
                .unwrap();
            if sink.buffer.len() < before {
                sent_mid_epoch = true;
                break;
            }
        }
        assert!(sent_mid_epoch);
        sink.wait_written().unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() >= CHUNK_BYTES as u64);
        assert_eq!(
            sink.delivered_below().unwrap(),
            1,
            "epoch 1 is not finished"
        );
        sink.flush().unwrap();
        assert_eq!(sink.delivered_below().unwrap(), 2);
    }

    /// A write that fails on the thread is not lost: the sink reports it.
    #[test]
    fn a_failed_write_is_reported_not_dropped() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            panic!("/dev/full is needed: writes there fail with ENOSPC");
        }
        let mut sink = FileSink::open(full, false).unwrap();
        sink.begin_epoch(0);
        sink.write_document(&document("a")).unwrap();
        let error = sink.flush().expect_err("a write to /dev/full fails");
        assert!(error.to_string().contains("/dev/full"), "{error}");
        assert!(sink.delivered_below().is_err());
        assert!(sink.hand_over().is_err());
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
