//! The ordered sink stage: gathers a stream on worker 0 and hands each
//! completed epoch, sorted by source position, to a writer.
//!
//! # Progress
//! The operator holds a capability for every epoch it has received but not
//! yet written, and its (empty) output is what the worker loop probes. So a
//! probe that has passed epoch `t` proves that epoch `t` was written and
//! flushed: only then may a checkpoint cover it.
//!
//! Every epoch that is complete when the operator runs is written in one
//! call, so the writer flushes once for all of them: a Kafka flush waits for
//! the broker's acknowledgements, and one round trip per (5 ms) epoch bounded
//! the Kafka throughput by the broker's latency.

use std::collections::BTreeMap;

use timely::ExchangeData;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;

/// Writes every epoch of `stream` in order on worker 0; `write` gets the
/// completed epochs, in order, each with its records sorted by `order` (the
/// source position), and must have flushed them when it returns.
pub fn write_in_epoch_order<'scope, D, W>(
    stream: Stream<'scope, u64, Vec<D>>,
    name: &str,
    order: fn(&D, &D) -> std::cmp::Ordering,
    mut write: W,
) -> Stream<'scope, u64, Vec<()>>
where
    D: ExchangeData,
    W: FnMut(Vec<(u64, Vec<D>)>) + 'static,
{
    stream.unary_frontier::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Exchange::new(|_: &D| 0u64),
        name,
        move |_capability, _info| {
            let mut pending: BTreeMap<u64, (Capability<u64>, Vec<D>)> = BTreeMap::new();
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
                let mut capabilities = Vec::new();
                while let Some(entry) = pending.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (epoch, (capability, mut records)) = entry.remove_entry();
                    records.sort_by(order);
                    completed.push((epoch, records));
                    capabilities.push(capability);
                }
                if !completed.is_empty() {
                    write(completed);
                }
                // only now may the probe pass these epochs
                drop(capabilities);
            }
        },
    )
}
