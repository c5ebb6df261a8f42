//! Write-behind for an output file: the kernel writes each window of
//! appended bytes back to disk soon after it is written, and the window
//! leaves the page cache once it is on disk.
//!
//! # Why
//! A sink appends gigabytes that nothing reads back (a full replay of the
//! bench's 1M events writes 1.5 GB of documents). Left to the kernel, every
//! byte stays in the page cache as a dirty page until the flusher gets to it
//! (30 s, or the dirty ratio), and every page the file grows by is a page
//! the kernel has not used lately. On this kind of VM that is what costs:
//! `copy_folio_from_iter_atomic` was 17.6% of the samples of a full run on 2
//! workers, on the sink's thread, while writing 1.5 GB into pages that had
//! been free a while took 2.4-2.9 s of system time and writing it again at
//! once 0.3 s (`docs/benchmarks.md`, stop 34). Written back and dropped a
//! window at a time, the file reuses the same few megabytes of page cache
//! over and over. It is what RocksDB's `bytes_per_sync` and PostgreSQL's
//! `*_flush_after` settings do, with the drop added, since nobody reads the
//! file back here.
//!
//! # How
//! Once a window of `window_bytes` is appended, its writeback starts
//! (`sync_file_range(WRITE)`, which does not wait), and the window before it
//! is waited for and dropped (`posix_fadvise(DONTNEED)`): the disk has a
//! window's time to write each one. The sink's thread does the waiting, not
//! a worker; a disk slower than the output holds the thread back, and the
//! sink's bounded hand-over holds the worker back, as a full page cache would.
//!
//! It changes nothing that is written or when an epoch counts as delivered
//! (handed to the OS), and it is not durability: no `fsync`. A file that
//! cannot do it (a pipe, `/dev/null`, a file system without the calls)
//! turns it off at the first refusal and is written as before.

use std::fs::File;
use std::os::fd::AsRawFd;

pub struct WriteBehind {
    /// 0: off.
    window_bytes: u64,
    /// The file's length so far, as this writer appended to it.
    end: u64,
    /// Where the window being filled starts.
    window_start: u64,
    /// The window whose writeback was started last: waited for and dropped
    /// once the next one is full.
    in_writeback: Option<(u64, u64)>,
}

impl WriteBehind {
    /// For a file whose next byte goes at `end` (its length).
    pub fn new(end: u64, window_bytes: u64) -> WriteBehind {
        WriteBehind {
            window_bytes,
            end,
            // the file's earlier bytes (a resumed run's) are left to the kernel
            window_start: end,
            in_writeback: None,
        }
    }

    pub fn is_on(&self) -> bool {
        self.window_bytes > 0
    }

    /// `bytes` more were appended to `file`. Starts the writeback of every
    /// window they completed, and waits for and drops the one before.
    /// Fails only when the disk does (the write's bytes are then not on
    /// disk, and a later read or `fsync` would fail too).
    pub fn appended(&mut self, file: &File, bytes: u64) -> std::io::Result<()> {
        self.end += bytes;
        while self.is_on() && self.end - self.window_start >= self.window_bytes {
            let window = (self.window_start, self.window_bytes);
            self.window_start += self.window_bytes;
            if !self.start_writeback(file, window)? {
                return Ok(());
            }
            if let Some(previous) = self.in_writeback.replace(window) {
                self.wait_and_drop(file, previous)?;
            }
        }
        Ok(())
    }

    /// Ok(false): the file cannot do it, and write-behind is now off.
    fn start_writeback(&mut self, file: &File, (offset, len): (u64, u64)) -> std::io::Result<bool> {
        self.call(file, |fd| unsafe {
            // SAFETY: a plain syscall on an open descriptor; no memory is passed
            libc::sync_file_range(
                fd,
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        })
    }

    fn wait_and_drop(&mut self, file: &File, (offset, len): (u64, u64)) -> std::io::Result<()> {
        let waited = self.call(file, |fd| unsafe {
            // SAFETY: as above
            libc::sync_file_range(
                fd,
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        })?;
        if waited {
            // (returns the error number itself, and cannot fail on a file it
            // could write back: advice is not checked further)
            // SAFETY: as above
            unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    offset as libc::off64_t,
                    len as libc::off64_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
        Ok(())
    }

    /// Runs a call that returns -1 and sets errno on failure. Ok(false) and
    /// off when the file does not support it (a pipe, a character device,
    /// a file system without it); Err for anything else (EIO: the disk).
    fn call(&mut self, file: &File, call: impl FnOnce(i32) -> i32) -> std::io::Result<bool> {
        if call(file.as_raw_fd()) == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::ESPIPE | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                self.window_bytes = 0;
                self.in_writeback = None;
                Ok(false)
            }
            _ => Err(error),
        }
    }
}
