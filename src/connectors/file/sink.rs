//! File sink: appends JSONL records, one per line.
//!
//! Documents are written as an envelope that mirrors a Kafka record:
//! `{"key":…,"version":…,"op":"upsert","doc":{…}}` or `"op":"delete","doc":null`.
//! Dead letters as `{"reason":…,"stage":…,"detail":…,"source":{…},"bytes_base64":…}`.
//!
//! # Writing on a thread of its own
//! The worker hands each epoch's records over by value to the sink's writer
//! thread, which formats them into lines, appends them and, at each
//! hand-over (`hand_over`: the end of a write of complete epochs), reports
//! the epochs delivered (`delivered_below`, and a wake-up of the sink stage),
//! as a Kafka sink reports acknowledgements. Copying a document file into the
//! page cache was 13.5% of the worker's samples in a `perf` run of the full
//! topology on 1 worker, and formatting and freeing the documents another 3%
//! of its instructions (`docs/benchmarks.md`, stop 31): the worker now spends
//! that on the next epochs while another core writes. At most `MESSAGES_IN_FLIGHT`
//! messages wait for the thread: a slow disk holds the worker back rather
//! than filling memory.
//!
//! # Durability
//! An epoch is delivered once the thread has handed its lines to the OS, and
//! only a delivered epoch is released downstream, so a checkpoint never
//! covers output that a `kill -9` could lose. (A power loss could; the sink
//! does not fsync.) On open, a trailing partial line left by a crash
//! mid-write is cut off.
//!
//! # Page cache
//! The thread writes each window of `write_behind_bytes` back as soon as it
//! is full and drops it from the page cache once it is on disk
//! (`write_behind.rs`): a run's gigabytes of output do not sit in memory as
//! dirty pages, and the file keeps reusing the same few megabytes of cache.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use base64::Engine;
use timely::scheduling::SyncActivator;

use super::write_behind::WriteBehind;
use crate::record::{DeadLetter, OutputDocument};

#[derive(Debug, thiserror::Error)]
#[error("cannot write output file {path}: {detail}")]
pub struct FileSinkError {
    pub path: String,
    pub detail: String,
}

/// Messages (an epoch's records, a hand-over) sent and not yet taken by the
/// thread, at most: four epochs' records, two in a steady run (one epoch and
/// its hand-over per write).
const MESSAGES_IN_FLIGHT: usize = 4;

/// The thread appends its lines to the file once they fill this much: a
/// write per megabyte, whatever an epoch's size.
const CHUNK_BYTES: usize = 1 << 20;

/// The thread's buffer is made this much larger than `CHUNK_BYTES`, so that
/// the line that fills it does not double it (a `Vec` grows by doubling).
const LINE_ROOM: usize = 64 << 10;

pub struct FileSink {
    path: String,
    /// Every epoch below this one has begun (`begin_epoch`): the epochs a
    /// hand-over completes.
    epochs_below: u64,
    /// To the writer thread; `None` once closed (on drop).
    messages: Option<SyncSender<Message>>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Message {
    Documents(Vec<OutputDocument>),
    /// Dead letters, and the input binding they were read from.
    DeadLetters(Vec<DeadLetter>, Arc<str>),
    /// Every epoch below this one is complete: write what is buffered, then
    /// report them delivered.
    HandOver(u64),
    /// Answered once everything sent before it is handled.
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
    /// Opens for appending; `truncate` starts the file afresh. Every
    /// `write_behind_bytes` appended are written back and dropped from the
    /// page cache (0: left to the kernel; see `write_behind.rs`).
    pub fn open(
        path: &Path,
        truncate: bool,
        write_behind_bytes: u64,
    ) -> Result<FileSink, FileSinkError> {
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
        let end = file
            .seek(SeekFrom::End(0))
            .map_err(|e| error(e.to_string()))?;
        let output = Output {
            file,
            behind: WriteBehind::new(end, write_behind_bytes),
        };
        let shared = Arc::new(Shared {
            delivered_below: AtomicU64::new(0),
            failure: Mutex::new(None),
            waker: Mutex::new(None),
        });
        let (messages, to_handle) = std::sync::mpsc::sync_channel(MESSAGES_IN_FLIGHT);
        let thread = std::thread::Builder::new()
            .name("assay:file-sink".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || write_lines(output, to_handle, &shared)
            })
            .map_err(|e| error(e.to_string()))?;
        Ok(FileSink {
            path: path.display().to_string(),
            epochs_below: 0,
            messages: Some(messages),
            shared,
            thread: Some(thread),
        })
    }

    /// The records written from now on belong to `epoch`.
    pub fn begin_epoch(&mut self, epoch: u64) {
        self.epochs_below = self.epochs_below.max(epoch + 1);
    }

    /// Hands documents of the epoch begun last to the writer thread.
    pub fn write_documents(&mut self, documents: Vec<OutputDocument>) -> Result<(), FileSinkError> {
        self.send(Message::Documents(documents))
    }

    /// Hands dead letters of the epoch begun last, read from `binding`, to
    /// the writer thread.
    pub fn write_dead_letters(
        &mut self,
        letters: Vec<DeadLetter>,
        binding: &str,
    ) -> Result<(), FileSinkError> {
        self.send(Message::DeadLetters(letters, binding.into()))
    }

    /// Every epoch begun so far is complete: the thread reports them
    /// delivered once their lines are written. Waits only when
    /// `MESSAGES_IN_FLIGHT` messages are waiting already.
    pub fn hand_over(&mut self) -> Result<(), FileSinkError> {
        self.send(Message::HandOver(self.epochs_below))
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
        self.wait_handled()
    }

    /// Waits until the thread has handled every message sent so far.
    fn wait_handled(&mut self) -> Result<(), FileSinkError> {
        let (answer, answered) = std::sync::mpsc::channel();
        self.send(Message::Sync(answer))?;
        // (no answer: the thread stopped on a failure, which `check` reports)
        let _ = answered.recv();
        self.check()
    }

    fn send(&mut self, message: Message) -> Result<(), FileSinkError> {
        self.check()?;
        let sent = self
            .messages
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
}

impl Drop for FileSink {
    /// Writes what was handed over (a run's end; on a failure the process
    /// stops without waiting) and ends the thread.
    fn drop(&mut self) {
        self.messages = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: formats the records it is handed into lines, in the
/// order they come, appends them a chunk at a time, and at each hand-over
/// writes the rest and marks its epochs delivered. On a failure it records
/// the error and stops; the sink reports it on its next call.
fn write_lines(mut file: Output, to_handle: Receiver<Message>, shared: &Shared) {
    let mut lines: Vec<u8> = Vec::with_capacity(CHUNK_BYTES + LINE_ROOM);
    let fail = |error: std::io::Error| {
        *shared.failure.lock().expect("not poisoned") = Some(error.to_string());
        shared.wake();
    };
    for message in to_handle {
        match message {
            Message::Documents(documents) => {
                for document in &documents {
                    write_document(&mut lines, document);
                    if let Err(e) = write_full_chunk(&mut file, &mut lines) {
                        return fail(e);
                    }
                }
            }
            Message::DeadLetters(letters, binding) => {
                for letter in &letters {
                    write_dead_letter(&mut lines, letter, &binding);
                    if let Err(e) = write_full_chunk(&mut file, &mut lines) {
                        return fail(e);
                    }
                }
            }
            Message::HandOver(epochs_below) => {
                if let Err(e) = file.append(&lines) {
                    return fail(e);
                }
                lines.clear();
                // (a buffer grown by one huge line is not kept)
                lines.shrink_to(CHUNK_BYTES + LINE_ROOM);
                shared
                    .delivered_below
                    .fetch_max(epochs_below, Ordering::Release);
                shared.wake();
            }
            Message::Sync(answer) => {
                let _ = answer.send(());
            }
        }
    }
    // the sink closed: lines not handed over yet go out too, as a buffered
    // writer's would on drop. Their epochs were never reported delivered,
    // so a restart may write them again (duplicates of identical lines),
    // and a failure here has nobody left to tell.
    let _ = file.append(&lines);
}

/// The file the thread appends to, and its write-behind.
struct Output {
    file: File,
    behind: WriteBehind,
}

impl Output {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.file.write_all(bytes)?;
        self.behind.appended(&self.file, bytes.len() as u64)
    }
}

/// Appends `lines` to the file once they fill a chunk.
fn write_full_chunk(file: &mut Output, lines: &mut Vec<u8>) -> std::io::Result<()> {
    if lines.len() >= CHUNK_BYTES {
        file.append(lines)?;
        lines.clear();
    }
    Ok(())
}

/// Appends a document's line: `{"key":…,"version":…,"op":…,"doc":…}`.
fn write_document(lines: &mut Vec<u8>, document: &OutputDocument) {
    lines.extend_from_slice(b"{\"key\":");
    write_json_string(lines, &document.key);
    lines.extend_from_slice(b",\"version\":");
    lines.extend_from_slice(itoa::Buffer::new().format(document.version).as_bytes());
    match &document.body {
        Some(body) => {
            lines.extend_from_slice(b",\"op\":\"upsert\",\"doc\":");
            lines.extend_from_slice(body.as_bytes());
        }
        None => lines.extend_from_slice(b",\"op\":\"delete\",\"doc\":null"),
    }
    lines.extend_from_slice(b"}\n");
}

/// Appends a dead letter's line, field by field, as serde wrote
/// `DeadLetterLine` (the unit test below compares the two): the base64
/// text, most of the line, goes straight into the buffer, without a String
/// of its own and without a scan for characters to escape that base64 never
/// has.
fn write_dead_letter(lines: &mut Vec<u8>, letter: &DeadLetter, binding: &str) {
    lines.extend_from_slice(b"{\"reason\":");
    write_json_string(lines, &letter.reason);
    lines.extend_from_slice(b",\"stage\":");
    write_json_string(lines, &letter.stage);
    lines.extend_from_slice(b",\"detail\":");
    write_json_string(lines, &letter.detail);
    lines.extend_from_slice(b",\"source\":{\"binding\":");
    write_json_string(lines, binding);
    let mut number = itoa::Buffer::new();
    lines.extend_from_slice(b",\"partition\":");
    lines.extend_from_slice(number.format(letter.position.partition).as_bytes());
    lines.extend_from_slice(b",\"offset\":");
    lines.extend_from_slice(number.format(letter.position.offset).as_bytes());
    lines.extend_from_slice(b",\"byte_offset\":");
    lines.extend_from_slice(number.format(letter.position.byte_offset).as_bytes());
    lines.extend_from_slice(b"},\"bytes_base64\":\"");
    let start = lines.len();
    let encoded = base64::encoded_len(letter.bytes.len(), true).expect("a record's length fits");
    lines.resize(start + encoded, 0);
    base64::engine::general_purpose::STANDARD
        .encode_slice(&letter.bytes, &mut lines[start..])
        .expect("the buffer was sized for the encoding");
    lines.extend_from_slice(b"\"}\n");
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
        let mut sink = FileSink::open(&path, true, 0).unwrap();
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
                sink.write_dead_letters(vec![letter.clone()], text).unwrap();
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
        let mut sink = FileSink::open(&path, true, 0).unwrap();
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
                    version: (i as u64) << 32 | 7,
                    body: body.clone(),
                    ..document(key)
                };
                sink.write_documents(vec![document.clone()]).unwrap();
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
        OutputDocument::for_test(key)
    }

    /// The writer thread reports an epoch delivered only once its lines are
    /// in the file, and reports every epoch handed over.
    #[test]
    fn an_epoch_is_delivered_once_its_lines_are_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("documents.jsonl");
        let mut sink = FileSink::open(&path, true, 0).unwrap();
        // file length after each epoch's lines
        let mut ends = Vec::new();
        let mut lines = Vec::new();
        for epoch in 0..300u64 {
            sink.begin_epoch(epoch);
            let documents: Vec<OutputDocument> = (0..=epoch % 7 * 20)
                .map(|i| document(&format!("{epoch}-{i:0>100}")))
                .collect();
            for document in &documents {
                write_document(&mut lines, document);
            }
            ends.push(lines.len() as u64);
            sink.write_documents(documents).unwrap();
            sink.hand_over().unwrap();
            // looked at repeatedly while the thread writes
            for _ in 0..20 {
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
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while sink.delivered_below().unwrap() < 300 {
            assert!(std::time::Instant::now() < deadline, "never delivered");
            std::thread::yield_now();
        }
        assert_eq!(std::fs::read(&path).unwrap(), lines);
    }

    /// An epoch larger than a chunk is written in parts, and delivered only
    /// when it is handed over whole.
    #[test]
    fn an_epoch_written_in_parts_is_delivered_only_when_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("documents.jsonl");
        let mut sink = FileSink::open(&path, true, 0).unwrap();
        sink.begin_epoch(0);
        sink.write_documents(vec![document("first")]).unwrap();
        sink.hand_over().unwrap();
        sink.begin_epoch(1);
        let big: Vec<OutputDocument> = (0..2 * CHUNK_BYTES / 200)
            .map(|i| document(&format!("{i:0>200}")))
            .collect();
        sink.write_documents(big).unwrap();
        sink.wait_handled().unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() >= CHUNK_BYTES as u64);
        assert_eq!(
            sink.delivered_below().unwrap(),
            1,
            "epoch 1 is not handed over"
        );
        sink.flush().unwrap();
        assert_eq!(sink.delivered_below().unwrap(), 2);
    }

    /// With write-behind, the file's bytes are the same and its early
    /// windows leave the page cache once written; without it they stay
    /// (which shows that the residency check can tell the two apart).
    #[test]
    fn write_behind_drops_written_windows_from_the_page_cache_and_changes_no_byte() {
        let dir = tempfile::tempdir().unwrap();
        let window = 1usize << 20;
        let documents: Vec<OutputDocument> = (0..5 * window / 1000)
            .map(|i| document(&format!("{i:0>1000}")))
            .collect();
        let mut expected = Vec::new();
        for document in &documents {
            write_document(&mut expected, document);
        }
        assert!(expected.len() > 5 * window);
        for write_behind_bytes in [window as u64, 0] {
            let path = dir
                .path()
                .join(format!("documents-{write_behind_bytes}.jsonl"));
            let mut sink = FileSink::open(&path, true, write_behind_bytes).unwrap();
            sink.begin_epoch(0);
            sink.write_documents(documents.clone()).unwrap();
            sink.flush().unwrap();
            drop(sink);
            // before reading the file back, which loads its pages again
            let resident = resident_pages(&path);
            let first_three_windows = &resident[..3 * window / 4096];
            let cached = first_three_windows.iter().filter(|r| **r).count();
            if write_behind_bytes > 0 {
                assert_eq!(cached, 0, "pages of written windows still cached");
            } else {
                assert_eq!(
                    cached,
                    first_three_windows.len(),
                    "the kernel dropped pages itself"
                );
            }
            assert!(
                std::fs::read(&path).unwrap() == expected,
                "the bytes differ"
            );
        }
    }

    /// Whether each page of the file is in the page cache (`mincore` of a
    /// mapping, which maps without reading).
    fn resident_pages(path: &Path) -> Vec<bool> {
        use std::os::fd::AsRawFd;
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let page = 4096;
        let mut flags = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of a file nobody truncates
        // meanwhile, unmapped before return; `flags` has a byte per page
        unsafe {
            let address = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(address, libc::MAP_FAILED);
            assert_eq!(libc::mincore(address, len, flags.as_mut_ptr()), 0);
            libc::munmap(address, len);
        }
        flags.iter().map(|f| f & 1 == 1).collect()
    }

    /// Lines not handed over when the sink closes are written, as a
    /// buffered writer's are on drop.
    #[test]
    fn closing_the_sink_writes_what_was_not_handed_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("documents.jsonl");
        let mut sink = FileSink::open(&path, true, 0).unwrap();
        sink.begin_epoch(0);
        sink.write_documents(vec![document("a")]).unwrap();
        drop(sink);
        let mut expected = Vec::new();
        write_document(&mut expected, &document("a"));
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    /// A write that fails on the thread is not lost: the sink reports it.
    #[test]
    fn a_failed_write_is_reported_not_dropped() {
        let full = Path::new("/dev/full");
        if !full.exists() {
            panic!("/dev/full is needed: writes there fail with ENOSPC");
        }
        let mut sink = FileSink::open(full, false, 0).unwrap();
        sink.begin_epoch(0);
        sink.write_documents(vec![document("a")]).unwrap();
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
        let mut sink = FileSink::open(&path, false, 0).unwrap();
        sink.flush().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"b\":2}\n"
        );
        std::fs::write(&path, "no newline at all").unwrap();
        FileSink::open(&path, false, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
