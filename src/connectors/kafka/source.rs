//! Kafka source: one consumer per worker, manually assigned the partitions
//! the worker owns (partition mod workers), starting at the offsets
//! checkpointed in RocksDB.
//!
//! # Positions
//! RocksDB holds the offsets recovery trusts; after each checkpoint they are
//! also committed to the consumer group, so standard lag tools show the real
//! lag. The group's own committed offsets are never read back.
//!
//! # Prefetch
//! librdkafka prefetches into a local queue; `queued.max.messages.kbytes`
//! (default here 16 MiB per consumer) bounds it, so memory does not grow when
//! the engine is slower than the topic. Beyond that, the source stops polling
//! while too many epochs are in flight (the worker loop's back-pressure).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::client_config;
use crate::config::{KafkaBinding, KafkaConfig};
use crate::observe::LatencyHistogram;
use crate::record::{RawRecord, SourcePosition};
use crate::state::CheckpointedPosition;

pub struct KafkaSource {
    consumer: BaseConsumer,
    topic: String,
    next_offsets: BTreeMap<u32, i64>,
    epoch_ms: u64,
    epoch_records: usize,
    /// the epoch being filled and how many records it has
    filling: (u64, usize),
    /// the clock's tick when the epoch being filled took its first record
    opened_tick: u64,
    /// The highest epoch any worker's source has moved to, shared by all of
    /// them: an idle source follows it (see `next_epoch`).
    highest_epoch: Arc<AtomicU64>,
    stop_when_idle: Option<Duration>,
    last_record_at: Instant,
    started: Instant,
    finished: bool,
    last_error_report: Option<Instant>,
    /// Records skipped because their offset was below the partition's position.
    pub redelivered: u64,
    /// Partitions assigned at a checkpointed offset whose first record has not arrived yet.
    just_seeked: std::collections::HashSet<u32>,
    /// Append (the record's timestamp) until read, per record: the queueing
    /// before the engine (broker fetch, librdkafka's queue, back-pressure),
    /// which read-to-acknowledged latency does not see.
    pub lag: LatencyHistogram,
}

impl KafkaSource {
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        kafka: &KafkaConfig,
        binding: &KafkaBinding,
        group_id: &str,
        owned: &[u32],
        checkpointed: &std::collections::HashMap<u32, CheckpointedPosition>,
        epoch_records: usize,
        started: Instant,
        highest_epoch: Arc<AtomicU64>,
    ) -> Result<KafkaSource, String> {
        let mut config = client_config(kafka, binding);
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        // Defaults of ours, unless the binding sets them (see "Prefetch" above).
        for (key, value) in [
            ("queued.max.messages.kbytes", "16384"),
            // Once the prefetch queue is full, librdkafka waits this long
            // before it fetches again, even if the queue drains at once; its
            // documentation advises lowering the 1 s default when the queue
            // thresholds are lowered, as above. (No change measured against
            // tansu, whose fetches are the slower part.)
            ("fetch.queue.backoff.ms", "10"),
        ] {
            if !binding.properties.contains_key(key) {
                config.set(key, value);
            }
        }
        // the binding's own properties win over ours
        for (key, value) in &binding.properties {
            config.set(key, value);
        }
        let consumer: BaseConsumer = config
            .create()
            .map_err(|e| format!("cannot create a consumer for `{}`: {e}", binding.topic))?;
        let mut assignment = TopicPartitionList::new();
        let mut next_offsets = BTreeMap::new();
        for partition in owned {
            let offset = match checkpointed.get(partition) {
                Some(position) => Offset::Offset(position.next_offset as i64),
                None => Offset::Beginning,
            };
            assignment
                .add_partition_offset(&binding.topic, *partition as i32, offset)
                .map_err(|e| e.to_string())?;
            next_offsets.insert(
                *partition,
                checkpointed
                    .get(partition)
                    .map(|p| p.next_offset as i64)
                    .unwrap_or(0),
            );
        }
        consumer
            .assign(&assignment)
            .map_err(|e| format!("cannot assign partitions of `{}`: {e}", binding.topic))?;
        Ok(KafkaSource {
            consumer,
            topic: binding.topic.clone(),
            next_offsets,
            epoch_ms: binding.epoch_ms.max(1),
            epoch_records,
            filling: (0, 0),
            opened_tick: 0,
            highest_epoch,
            stop_when_idle: (binding.stop_when_idle_ms > 0)
                .then(|| Duration::from_millis(binding.stop_when_idle_ms)),
            last_record_at: Instant::now(),
            started,
            finished: owned.is_empty() && binding.stop_when_idle_ms > 0,
            last_error_report: None,
            redelivered: 0,
            just_seeked: owned
                .iter()
                .copied()
                .filter(|p| checkpointed.get(p).is_some_and(|c| c.next_offset > 0))
                .collect(),
            lag: LatencyHistogram::default(),
        })
    }

    /// The clock's tick now: `epoch_ms` ticks since the engine started, the
    /// same on every worker.
    pub fn clock_tick(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 / self.epoch_ms
    }

    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Takes the records librdkafka has queued, without waiting, up to
    /// `epoch_records` for `epoch`, and returns the epoch the next records
    /// belong to (see `next_epoch`): `epoch` again while it is open, the next
    /// one once it is full or its time is up, and for an idle source the
    /// latest of the shared clock's tick and every worker's epoch.
    ///
    /// It never blocks: the worker steps the dataflow between calls (and
    /// parks briefly when there is nothing to do). Waiting in `poll` for a
    /// whole epoch kept the worker from moving earlier epochs through the
    /// market's lockstep, so small live epochs queued up behind each other.
    pub fn fill(&mut self, epoch: u64, out: &mut Vec<RawRecord>) -> u64 {
        if self.filling.0 != epoch {
            self.filling = (epoch, 0);
        }
        // the worker loop moves epochs too (a checkpoint closes an open one)
        self.highest_epoch.fetch_max(epoch, Ordering::Relaxed);
        let taken_before = out.len();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        // Records are stamped with the time they were read (for the latency
        // the summary reports), read from the clock once per 64 records: a
        // clock read per record, and another for the idle timer, were 0.8%
        // of the full topology's samples over Kafka (`perf`, bench-kafka's
        // max-rate run). 64 records are polled in microseconds, so a stamp
        // is early by at most that, and a latency reads that much longer.
        let mut read_at_nanos = 0;
        while self.filling.1 + (out.len() - taken_before) < self.epoch_records {
            match self.consumer.poll(Duration::ZERO) {
                Some(Ok(message)) => {
                    let partition = message.partition() as u32;
                    let offset = message.offset();
                    let expected = self.next_offsets.get(&partition).copied().unwrap_or(0);
                    if offset < expected {
                        // a re-delivery below our position (a broker that answered "offset out
                        // of range" made the client reset to the earliest offset): already
                        // processed, and taking it would move the checkpointed position back
                        self.redelivered += 1;
                        continue;
                    }
                    if offset > expected
                        && !self.just_seeked.is_empty()
                        && self.just_seeked.remove(&partition)
                    {
                        // Asked for `expected`, given a later offset right after the seek: the
                        // broker skipped the rest of the batch holding `expected`. (tansu 0.6.0
                        // does this when a fetch starts inside a batch; Kafka returns the whole
                        // batch.) Re-read the partition from its start once; the check above
                        // skips what was already processed.
                        eprintln!(
                            "warning: kafka source `{}`: partition {partition}: asked for offset {expected}, the broker answered from {offset}; re-reading the partition from its start so that nothing is skipped",
                            self.topic
                        );
                        if let Err(error) = self.consumer.seek(
                            &self.topic,
                            partition as i32,
                            Offset::Beginning,
                            Duration::from_secs(10),
                        ) {
                            eprintln!(
                                "warning: kafka source `{}`: seek failed: {error}",
                                self.topic
                            );
                        }
                        continue;
                    }
                    if !self.just_seeked.is_empty() {
                        self.just_seeked.remove(&partition);
                    }
                    self.next_offsets.insert(partition, offset + 1);
                    let timestamp_ms = message.timestamp().to_millis().unwrap_or(0);
                    if timestamp_ms > 0 {
                        // a producer's clock ahead of ours reads as no lag
                        self.lag
                            .record((now_ms - timestamp_ms).max(0) as u64 * 1_000_000);
                    }
                    if (out.len() - taken_before).is_multiple_of(64) {
                        read_at_nanos = self.started.elapsed().as_nanos() as u64;
                    }
                    out.push(RawRecord {
                        bytes: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                        position: SourcePosition {
                            partition,
                            offset: offset as u64,
                            byte_offset: 0,
                            timestamp_ms,
                        },
                        read_at_nanos,
                    });
                }
                Some(Err(error)) => {
                    // broker trouble: librdkafka reconnects by itself; say so, at most every 5 s
                    if self
                        .last_error_report
                        .map(|t| t.elapsed() > Duration::from_secs(5))
                        .unwrap_or(true)
                    {
                        eprintln!("warning: kafka source `{}`: {error} (retrying)", self.topic);
                        self.last_error_report = Some(Instant::now());
                    }
                }
                None => break,
            }
        }
        if out.len() > taken_before {
            self.last_record_at = Instant::now();
        }
        if self.redelivered > 0
            && self
                .last_error_report
                .map(|t| t.elapsed() > Duration::from_secs(5))
                .unwrap_or(true)
        {
            eprintln!(
                "warning: kafka source `{}`: skipped {} re-delivered record(s) below the consumed position",
                self.topic, self.redelivered
            );
            self.last_error_report = Some(Instant::now());
        }
        if let Some(idle) = self.stop_when_idle
            && out.is_empty()
            && self.last_record_at.elapsed() >= idle
        {
            self.finished = true;
        }
        let tick = self.clock_tick();
        if self.filling.1 == 0 && out.len() > taken_before {
            self.opened_tick = tick;
        }
        self.filling.1 += out.len() - taken_before;
        let next = next_epoch(
            epoch,
            self.filling.1,
            self.epoch_records,
            self.opened_tick,
            tick,
            self.highest_epoch.load(Ordering::Relaxed),
        );
        self.highest_epoch.fetch_max(next, Ordering::Relaxed);
        next
    }

    pub fn positions(&self) -> Vec<(u32, CheckpointedPosition)> {
        self.next_offsets
            .iter()
            .map(|(p, o)| {
                (
                    *p,
                    CheckpointedPosition {
                        next_offset: *o as u64,
                        next_byte: 0,
                    },
                )
            })
            .collect()
    }

    /// After a checkpoint: tell the consumer group, for lag monitoring.
    pub fn commit(&self, positions: &[(u32, CheckpointedPosition)]) {
        let mut list = TopicPartitionList::new();
        for (partition, position) in positions {
            if position.next_offset > 0 {
                let _ = list.add_partition_offset(
                    &self.topic,
                    *partition as i32,
                    Offset::Offset(position.next_offset as i64),
                );
            }
        }
        if list.count() > 0
            && let Err(error) = self.consumer.commit(&list, CommitMode::Async)
        {
            eprintln!(
                "warning: committing offsets of `{}` to the consumer group failed: {error} (recovery uses the checkpoint, not these)",
                self.topic
            );
        }
    }
}

/// The epoch a source's next records belong to, after it has taken `taken`
/// records into `epoch`; `opened_tick` is the clock's tick when the epoch took
/// its first, `tick` the clock's tick now (ticks of `epoch_ms` since the
/// engine started, the same clock on every worker), and `highest` the highest
/// epoch any worker's source has moved to.
///
/// - An epoch with records moves on by one once it is full, or once the tick
///   it took its first record in (or its own tick, if earlier) has ended: a
///   record waits at most one tick for its epoch to close.
///   - Never to the clock: after a wait (back-pressure, a long step) the clock
///     is many ticks ahead, and jumping there left the epochs between empty.
///     Back-pressure counts epoch numbers, so only one epoch with records was
///     then in flight, and a source behind its input read in stop-and-wait
///     (one epoch, then a wait for its delivery): the full topology fell
///     seconds behind at half its maximum rate.
///   - Not when the clock reaches it: epochs that fill up before their tick
///     ends (more than `epoch_records` per tick: a backlog, a burst) run
///     ahead of the clock, and an epoch ahead of the clock used to stay open
///     until the clock caught up with it. After a backlog that was seconds
///     (the last records of `bench-kafka`'s pass-through latency run, at 125k
///     records/s: 255 ms).
/// - An idle source follows the clock, so that the workers' epochs line up,
///   and the other workers' epochs: the sinks write an epoch only once every
///   worker has moved past it, so an idle worker left on the clock held back
///   a busy worker's epochs that ran ahead of it.
fn next_epoch(
    epoch: u64,
    taken: usize,
    epoch_records: usize,
    opened_tick: u64,
    tick: u64,
    highest: u64,
) -> u64 {
    if taken >= epoch_records || (taken > 0 && tick > epoch.min(opened_tick)) {
        epoch + 1
    } else if taken > 0 {
        epoch
    } else {
        tick.max(epoch).max(highest)
    }
}

#[cfg(test)]
mod tests {
    use super::next_epoch;

    const RECORDS: usize = 1024;

    #[test]
    fn an_epoch_on_the_clock_closes_when_its_tick_ends_or_it_is_full() {
        // epoch 10, first record in tick 10
        assert_eq!(next_epoch(10, 5, RECORDS, 10, 10, 10), 10);
        assert_eq!(next_epoch(10, 5, RECORDS, 10, 11, 10), 11);
        assert_eq!(next_epoch(10, RECORDS, RECORDS, 10, 10, 10), 11);
        // closed late (a long step): by one, not to the clock
        assert_eq!(next_epoch(10, 5, RECORDS, 10, 40, 10), 11);
    }

    #[test]
    fn an_epoch_behind_the_clock_closes_at_once() {
        // after a wait the clock is at 40: epoch 12 took its first record at tick 40
        assert_eq!(next_epoch(12, 1, RECORDS, 40, 40, 12), 13);
    }

    #[test]
    fn an_epoch_ahead_of_the_clock_closes_one_tick_after_its_first_record() {
        // a backlog filled epochs faster than the clock ticked: epoch 300 at tick 100
        assert_eq!(next_epoch(300, 7, RECORDS, 100, 100, 300), 300);
        assert_eq!(next_epoch(300, 7, RECORDS, 100, 101, 300), 301);
        // not when the clock reaches 300
        assert_ne!(next_epoch(300, 7, RECORDS, 100, 101, 300), 300);
    }

    #[test]
    fn an_idle_source_follows_the_clock_and_the_other_workers() {
        assert_eq!(next_epoch(10, 0, RECORDS, 0, 15, 10), 15);
        assert_eq!(next_epoch(10, 0, RECORDS, 0, 15, 40), 40);
        // never back
        assert_eq!(next_epoch(50, 0, RECORDS, 0, 15, 40), 50);
    }
}
