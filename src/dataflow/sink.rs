//! The ordered sink stage: hands each completed epoch of a stream, sorted by
//! source position, to a writer. A file's writer is on worker 0, which
//! gathers every worker's records; a Kafka writer is on every worker, which
//! writes its own (see `Sink::for_workers`).
//!
//! # Progress
//! The operator holds a capability for every epoch it has received but not
//! yet seen delivered, and its (empty) output is what the worker loop probes.
//! So a probe that has passed epoch `t` proves that epoch `t` was written and
//! delivered: only then may a checkpoint cover it.
//!
//! Every epoch that is complete when the operator runs is written in one
//! call. Delivery may come later ([`OrderedWriter::delivered_below`]): a
//! Kafka writer does not wait for the broker's acknowledgements on the worker
//! thread, and a file's writer thread formats and appends the records it is
//! handed; each wakes the operator when epochs are delivered, so that
//! delivery overlaps with computing the next epochs.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::Instant;

use timely::ExchangeData;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;
use timely::scheduling::SyncActivator;

use super::{SinkCounts, fail_output};
use crate::connectors::Sink;
use crate::observe::LatencyHistogram;
use crate::record::{DeadLetter, OutputDocument};

/// Where the ordered sink stage writes.
pub trait OrderedWriter<D>: 'static {
    /// Writes the completed epochs, in order, each with its records sorted by
    /// source position. May return before they are delivered.
    fn write(&mut self, epochs: Vec<(u64, Vec<D>)>);
    /// Of the epochs written so far, every one below the returned epoch is
    /// delivered. The default: `write` delivered them before it returned.
    fn delivered_below(&mut self) -> u64 {
        u64::MAX
    }
    /// Called once, before any write: the writer calls `waker.activate()`
    /// when `delivered_below` may have grown without a write.
    fn wake_with(&mut self, _waker: SyncActivator) {}
}

/// Writes every epoch of `stream` in order on worker `writer_worker` (0, or
/// this worker's own index when every worker writes its own records), sorted
/// by `order` (the source position), and releases each epoch once `writer`
/// reports it delivered.
pub fn write_in_epoch_order<'scope, D, W>(
    stream: Stream<'scope, u64, Vec<D>>,
    name: &str,
    order: fn(&D, &D) -> std::cmp::Ordering,
    writer_worker: u64,
    mut writer: W,
) -> Stream<'scope, u64, Vec<()>>
where
    D: ExchangeData,
    W: OrderedWriter<D>,
{
    let worker = stream.scope().worker().clone();
    stream.unary_frontier::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Exchange::new(move |_: &D| writer_worker),
        name,
        move |_capability, info| {
            writer.wake_with(worker.sync_activator_for(info.address.to_vec()));
            let mut pending: BTreeMap<u64, (Capability<u64>, Vec<D>)> = BTreeMap::new();
            // written, not yet delivered, in epoch order
            let mut in_flight: VecDeque<Capability<u64>> = VecDeque::new();
            move |(input, frontier), _output| {
                input.for_each_stamp(|capability, containers| {
                    let Some(capability) = capability.retain_least(0) else {
                        return;
                    };
                    let epoch = *capability.time();
                    let entry = pending
                        .entry(epoch)
                        .or_insert_with(|| (capability, Vec::new()));
                    crate::dataflow::take_or_append(&mut entry.1, containers);
                });
                let mut completed = Vec::new();
                while let Some(entry) = pending.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (epoch, (capability, mut records)) = entry.remove_entry();
                    records.sort_by(order);
                    completed.push((epoch, records));
                    in_flight.push_back(capability);
                }
                if !completed.is_empty() {
                    writer.write(completed);
                }
                // only once delivered may the probe pass an epoch
                let delivered_below = writer.delivered_below();
                while in_flight
                    .front()
                    .is_some_and(|capability| *capability.time() < delivered_below)
                {
                    in_flight.pop_front();
                }
            }
        },
    )
}

/// Read times of written records, per epoch, until their epoch is delivered:
/// a record's latency runs from reading its input to its delivery.
#[derive(Default)]
struct UndeliveredReadTimes(VecDeque<(u64, Vec<u64>)>);

impl UndeliveredReadTimes {
    fn record_delivered(
        &mut self,
        delivered_below: u64,
        latency: &mut LatencyHistogram,
        started: Instant,
    ) {
        let now = started.elapsed().as_nanos() as u64;
        while self
            .0
            .front()
            .is_some_and(|(epoch, _)| *epoch < delivered_below)
        {
            let (_, read_times) = self.0.pop_front().expect("checked");
            for read_at in read_times {
                latency.record(now.saturating_sub(read_at));
            }
        }
    }
}

/// A record kind an output stage writes: how it is counted and written.
pub(super) trait SinkRecord: Sized {
    /// What a failure says was being written.
    const WHAT: &'static str;
    /// Counts the record; returns its read time when its latency counts (a
    /// market document's read time is its listing's last event, not a new
    /// input).
    fn count(&self, counts: &mut SinkCounts) -> Option<u64>;
    /// Writes an epoch's records to `out`, which takes them: a file sink
    /// formats and writes them on its own thread.
    fn write_all(records: Vec<Self>, out: &mut Sink, source_binding: &str) -> Result<(), String>;
}

impl SinkRecord for OutputDocument {
    const WHAT: &'static str = "writing documents";
    fn count(&self, counts: &mut SinkCounts) -> Option<u64> {
        if self.body.is_some() {
            counts.upserts += 1
        } else {
            counts.tombstones += 1
        }
        if self.market {
            counts.market_documents += 1;
            None
        } else {
            Some(self.read_at_nanos)
        }
    }
    fn write_all(records: Vec<Self>, out: &mut Sink, _source_binding: &str) -> Result<(), String> {
        out.write_documents(records)
    }
}

impl SinkRecord for crate::dataflow::statistics::StatisticsRecord {
    const WHAT: &'static str = "writing statistics";
    fn count(&self, _counts: &mut SinkCounts) -> Option<u64> {
        // not a document of the search index, and no input's latency
        None
    }
    fn write_all(records: Vec<Self>, out: &mut Sink, _source_binding: &str) -> Result<(), String> {
        out.write_documents(records.into_iter().map(|record| record.0).collect())
    }
}

impl SinkRecord for DeadLetter {
    const WHAT: &'static str = "writing dead letters";
    fn count(&self, counts: &mut SinkCounts) -> Option<u64> {
        *counts.dead_letters.entry(self.reason.clone()).or_default() += 1;
        Some(self.read_at_nanos)
    }
    fn write_all(records: Vec<Self>, out: &mut Sink, source_binding: &str) -> Result<(), String> {
        out.write_dead_letters(records, source_binding)
    }
}

/// Worker 0's output of one record kind; the other workers build the stage
/// with `None`.
pub(super) struct SinkWriter {
    out: Option<Sink>,
    counts: Rc<RefCell<SinkCounts>>,
    started: Instant,
    /// the input binding, named in file dead letters
    source_binding: String,
    undelivered: UndeliveredReadTimes,
}

impl SinkWriter {
    pub fn new(
        out: Option<Sink>,
        counts: Rc<RefCell<SinkCounts>>,
        started: Instant,
        source_binding: String,
    ) -> Self {
        SinkWriter {
            out,
            counts,
            started,
            source_binding,
            undelivered: UndeliveredReadTimes::default(),
        }
    }
}

impl<D: SinkRecord + 'static> OrderedWriter<D> for SinkWriter {
    fn write(&mut self, epochs: Vec<(u64, Vec<D>)>) {
        let Some(out) = self.out.as_mut() else { return };
        let mut counts = self.counts.borrow_mut();
        for (epoch, records) in epochs {
            out.begin_epoch(epoch);
            let read_times: Vec<u64> = records
                .iter()
                .filter_map(|record| record.count(&mut counts))
                .collect();
            if let Err(e) = D::write_all(records, out, &self.source_binding) {
                fail_output(D::WHAT, &e);
            }
            self.undelivered.0.push_back((epoch, read_times));
        }
        if let Err(e) = out.hand_over() {
            fail_output(D::WHAT, &e);
        }
    }

    fn delivered_below(&mut self) -> u64 {
        let Some(out) = self.out.as_ref() else {
            return u64::MAX;
        };
        let below = out
            .delivered_below()
            .unwrap_or_else(|e| fail_output(D::WHAT, &e));
        self.undelivered.record_delivered(
            below,
            &mut self.counts.borrow_mut().latency,
            self.started,
        );
        below
    }

    fn wake_with(&mut self, waker: SyncActivator) {
        if let Some(out) = self.out.as_mut() {
            out.wake_with(waker);
        }
    }
}
