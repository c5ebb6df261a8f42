//! Sources and sinks, one folder per system, behind two small enums so that
//! the worker loop does not care where records come from or go.

pub mod file;
pub mod kafka;

use crate::record::{DeadLetter, OutputDocument, RawRecord};
use crate::state::CheckpointedPosition;

pub enum Source {
    File(file::source::FileSource),
    Kafka(kafka::source::KafkaSource),
}

impl Source {
    /// The epoch the first records will carry.
    pub fn first_epoch(&self, epoch_records: u64) -> u64 {
        match self {
            // epochs of a file are a pure function of line numbers
            Source::File(file) => file.next_line() / epoch_records,
            Source::Kafka(_) => 0,
        }
    }

    /// Reads the records of epoch `epoch` that are available now into `out`;
    /// returns the epoch the next records belong to (`epoch` again while it
    /// is not complete).
    pub fn fill(
        &mut self,
        epoch: u64,
        epoch_records: u64,
        out: &mut Vec<RawRecord>,
    ) -> Result<u64, String> {
        match self {
            Source::File(file) => {
                let end = (epoch + 1) * epoch_records;
                file.read_until(end, out).map_err(|e| e.to_string())?;
                Ok(if file.reached(end) { epoch + 1 } else { epoch })
            }
            Source::Kafka(kafka) => Ok(kafka.fill(epoch, out)),
        }
    }

    /// A Kafka source's shared clock: ticks of `epoch_ms` since the start.
    pub fn clock_tick(&self) -> Option<u64> {
        match self {
            Source::File(_) => None,
            Source::Kafka(kafka) => Some(kafka.clock_tick()),
        }
    }

    pub fn finished(&self) -> bool {
        match self {
            Source::File(file) => file.finished(),
            Source::Kafka(kafka) => kafka.finished(),
        }
    }

    pub fn positions(&self) -> Vec<(u32, CheckpointedPosition)> {
        match self {
            Source::File(file) => file.positions(),
            Source::Kafka(kafka) => kafka.positions(),
        }
    }

    /// Called after a checkpoint with the positions it wrote.
    pub fn checkpointed(&self, positions: &[(u32, CheckpointedPosition)]) {
        if let Source::Kafka(kafka) = self {
            kafka.commit(positions);
        }
    }

    /// How long records waited between their append to the input and their
    /// read, when the source knows the append time (Kafka's record timestamp).
    pub fn lag(&self) -> Option<&crate::observe::LatencyHistogram> {
        match self {
            Source::File(_) => None,
            Source::Kafka(kafka) => Some(&kafka.lag),
        }
    }

    /// (done, total) bytes, when the source has an end.
    pub fn progress(&self) -> Option<(u64, u64)> {
        match self {
            Source::File(file) => Some(file.progress()),
            Source::Kafka(_) => None,
        }
    }

    pub fn resume_offset(&self) -> u64 {
        match self {
            Source::File(file) => file.next_line(),
            Source::Kafka(_) => 0,
        }
    }
}

pub enum Sink {
    File(file::sink::FileSink),
    Kafka(kafka::sink::KafkaSink),
}

impl Sink {
    /// The sink each worker writes through, by worker index. A Kafka sink
    /// is shared (one producer), so every worker writes the records it made;
    /// a file is written by worker 0 alone, in one order whatever the worker
    /// count (its bytes are deterministic), and the others get `None`.
    pub fn for_workers(self, workers: usize) -> Vec<Option<Sink>> {
        let shared: Vec<Option<Sink>> = (1..workers)
            .map(|_| match &self {
                Sink::File(_) => None,
                Sink::Kafka(kafka) => Some(Sink::Kafka(kafka.share())),
            })
            .collect();
        std::iter::once(Some(self)).chain(shared).collect()
    }

    /// Whether every worker writes its own records (see `for_workers`).
    pub fn written_by_every_worker(&self) -> bool {
        matches!(self, Sink::Kafka(_))
    }

    /// Writes documents of the epoch begun last (`begin_epoch`).
    pub fn write_documents(&mut self, documents: Vec<OutputDocument>) -> Result<(), String> {
        match self {
            Sink::File(file) => file.write_documents(documents).map_err(|e| e.to_string()),
            Sink::Kafka(kafka) => documents
                .iter()
                .try_for_each(|document| kafka.write_document(document))
                .map_err(|e| e.to_string()),
        }
    }

    /// Writes dead letters of the epoch begun last, read from `source_binding`.
    pub fn write_dead_letters(
        &mut self,
        letters: Vec<DeadLetter>,
        source_binding: &str,
    ) -> Result<(), String> {
        match self {
            Sink::File(file) => file
                .write_dead_letters(letters, source_binding)
                .map_err(|e| e.to_string()),
            Sink::Kafka(kafka) => letters
                .iter()
                .try_for_each(|letter| kafka.write_dead_letter(letter))
                .map_err(|e| e.to_string()),
        }
    }

    /// The records written from now on belong to `epoch` (a sink reports
    /// delivery per epoch).
    pub fn begin_epoch(&mut self, epoch: u64) {
        match self {
            Sink::File(file) => file.begin_epoch(epoch),
            Sink::Kafka(kafka) => kafka.begin_epoch(epoch),
        }
    }

    /// Ends a write without waiting for it to be delivered: a file's lines go
    /// to its writer thread, Kafka records to the broker; see
    /// `delivered_below`.
    pub fn hand_over(&mut self) -> Result<(), String> {
        match self {
            Sink::File(file) => file.hand_over().map_err(|e| e.to_string()),
            Sink::Kafka(kafka) => {
                kafka.hand_over();
                Ok(())
            }
        }
    }

    /// Every epoch below the returned one, of those written, is delivered.
    pub fn delivered_below(&self) -> Result<u64, String> {
        match self {
            Sink::File(file) => file.delivered_below().map_err(|e| e.to_string()),
            Sink::Kafka(kafka) => kafka.delivered_below().map_err(|e| e.to_string()),
        }
    }

    /// Wake the sink stage through `waker` when an epoch is delivered.
    pub fn wake_with(&mut self, waker: timely::scheduling::SyncActivator) {
        match self {
            Sink::File(file) => file.wake_with(waker),
            Sink::Kafka(kafka) => kafka.wake_with(waker),
        }
    }
}
