//! The ordered sink stage: gathers a stream on worker 0 and hands each
//! completed epoch, sorted by source position, to a writer.
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
//! thread, it wakes the operator when they arrive, so the round trips of
//! several epochs overlap with computing the next ones.

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

/// Writes every epoch of `stream` in order on worker 0, sorted by `order`
/// (the source position), and releases each epoch once `writer` reports it
/// delivered.
pub fn write_in_epoch_order<'scope, D, W>(
    stream: Stream<'scope, u64, Vec<D>>,
    name: &str,
    order: fn(&D, &D) -> std::cmp::Ordering,
    mut writer: W,
) -> Stream<'scope, u64, Vec<()>>
where
    D: ExchangeData,
    W: OrderedWriter<D>,
{
    let worker = stream.scope().worker().clone();
    stream.unary_frontier::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Exchange::new(|_: &D| 0u64),
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
                    for container in containers {
                        entry.1.append(container);
                    }
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

/// Worker 0's document output; the other workers build the stage with `None`.
pub(super) struct DocumentWriter {
    pub out: Option<Sink>,
    pub counts: Rc<RefCell<SinkCounts>>,
    pub started: Instant,
    undelivered: UndeliveredReadTimes,
}

impl DocumentWriter {
    pub fn new(out: Option<Sink>, counts: Rc<RefCell<SinkCounts>>, started: Instant) -> Self {
        DocumentWriter {
            out,
            counts,
            started,
            undelivered: UndeliveredReadTimes::default(),
        }
    }
}

impl OrderedWriter<OutputDocument> for DocumentWriter {
    fn write(&mut self, epochs: Vec<(u64, Vec<OutputDocument>)>) {
        let Some(out) = self.out.as_mut() else { return };
        let mut counts = self.counts.borrow_mut();
        for (epoch, documents) in &epochs {
            out.begin_epoch(*epoch);
            let mut read_times = Vec::new();
            for document in documents {
                if let Err(e) = out.write_document(document) {
                    fail_output("writing documents", &e);
                }
                if document.body.is_some() {
                    counts.upserts += 1
                } else {
                    counts.tombstones += 1
                }
                // a market document's read time is its listing's last event, not a new input
                if document.market {
                    counts.market_documents += 1;
                } else {
                    read_times.push(document.read_at_nanos);
                }
            }
            self.undelivered.0.push_back((*epoch, read_times));
        }
        if let Err(e) = out.hand_over() {
            fail_output("writing documents", &e);
        }
    }

    fn delivered_below(&mut self) -> u64 {
        let Some(out) = self.out.as_ref() else {
            return u64::MAX;
        };
        let below = out
            .delivered_below()
            .unwrap_or_else(|e| fail_output("writing documents", &e));
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

/// Worker 0's dead-letter output; the other workers build the stage with `None`.
pub(super) struct DeadLetterWriter {
    pub out: Option<Sink>,
    pub counts: Rc<RefCell<SinkCounts>>,
    pub started: Instant,
    /// the input binding, named in file dead letters
    pub source_binding: String,
    undelivered: UndeliveredReadTimes,
}

impl DeadLetterWriter {
    pub fn new(
        out: Option<Sink>,
        counts: Rc<RefCell<SinkCounts>>,
        started: Instant,
        source_binding: String,
    ) -> Self {
        DeadLetterWriter {
            out,
            counts,
            started,
            source_binding,
            undelivered: UndeliveredReadTimes::default(),
        }
    }
}

impl OrderedWriter<DeadLetter> for DeadLetterWriter {
    fn write(&mut self, epochs: Vec<(u64, Vec<DeadLetter>)>) {
        let Some(out) = self.out.as_mut() else { return };
        let mut counts = self.counts.borrow_mut();
        for (epoch, letters) in &epochs {
            out.begin_epoch(*epoch);
            for letter in letters {
                if let Err(e) = out.write_dead_letter(letter, &self.source_binding) {
                    fail_output("writing dead letters", &e);
                }
                *counts
                    .dead_letters
                    .entry(letter.reason.clone())
                    .or_default() += 1;
            }
            self.undelivered
                .0
                .push_back((*epoch, letters.iter().map(|l| l.read_at_nanos).collect()));
        }
        if let Err(e) = out.hand_over() {
            fail_output("writing dead letters", &e);
        }
    }

    fn delivered_below(&mut self) -> u64 {
        let Some(out) = self.out.as_ref() else {
            return u64::MAX;
        };
        let below = out
            .delivered_below()
            .unwrap_or_else(|e| fail_output("writing dead letters", &e));
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
