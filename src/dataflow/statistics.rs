//! The statistics output: every change of an aggregate's exact statistics,
//! per epoch, on worker 0 (`[output] statistics`). A changelog keyed by
//! segment: an upsert with the new statistics, or a tombstone when the
//! segment has no live listing left. Operators read it to see the market the
//! documents were computed against; the oracle test checks it against a
//! from-scratch recomputation.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;

use crate::dataflow::market::{StatisticBits, from_bits};
use crate::record::{OutputDocument, SourcePosition};
use crate::topology::{MEASURE_STATISTICS, Plan};

/// Each epoch's statistics changes as changelog records (in segment order),
/// on worker 0, at the epoch's time: the ordered sink stage writes them and
/// holds the epoch until they are delivered.
pub fn statistics_changelog<'scope>(
    changes: StreamVec<'scope, u64, ((u64, StatisticBits), u64, isize)>,
    labels: StreamVec<'scope, u64, (u64, String)>,
    plan: Arc<Plan>,
    skip_epoch: Option<u64>,
) -> StreamVec<'scope, u64, StatisticsRecord> {
    type Pending = (Capability<u64>, Vec<((u64, StatisticBits), u64, isize)>);
    changes.binary_frontier::<_, timely::container::CapacityContainerBuilder<Vec<StatisticsRecord>>, _, _, _, _>(
        labels,
        Exchange::new(|_: &((u64, StatisticBits), u64, isize)| 0u64),
        Exchange::new(|_: &(u64, String)| 0u64),
        "StatisticsSink",
        move |_, _| {
            let mut names: HashMap<u64, String> = HashMap::new();
            let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
            move |(changes, changes_frontier), (labels, labels_frontier), output| {
                labels.for_each(|_, containers| {
                    for (segment, label) in containers.drain(..) {
                        names.entry(segment).or_insert(label);
                    }
                });
                // by each update's own time: differential may send an update with an
                // earlier capability than its time (see the evaluator's market input)
                changes.for_each_stamp(|capability, containers| {
                    let Some(capability) = capability.retain_least(0) else { return };
                    for container in containers {
                        for update in container.drain(..) {
                            let time = update.1;
                            pending.entry(time).or_insert_with(|| (capability.delayed(&time), Vec::new())).1.push(update);
                        }
                    }
                });
                while let Some(entry) = pending.first_entry() {
                    let epoch = *entry.key();
                    if changes_frontier.less_equal(&epoch) || labels_frontier.less_equal(&epoch) {
                        break;
                    }
                    let (capability, mut updates) = entry.remove();
                    // the rebuild of statistics the changelog already holds
                    if skip_epoch == Some(epoch) {
                        continue;
                    }
                    // dataflow times are input epochs + 1 (the rebuild has its own time)
                    let epoch = epoch.saturating_sub(1);
                    updates.sort();
                    let mut documents = Vec::new();
                    let mut index = 0;
                    while index < updates.len() {
                        let segment = updates[index].0 .0;
                        let mut inserted: Option<&StatisticBits> = None;
                        while index < updates.len() && updates[index].0 .0 == segment {
                            if updates[index].2 > 0 {
                                inserted = Some(&updates[index].0 .1);
                            }
                            index += 1;
                        }
                        let aggregate = &plan.aggregates[(segment >> 56) as usize];
                        let label = names.get(&segment).cloned().unwrap_or_else(|| format!("{{\"segment_id\":{segment}}}"));
                        let body = inserted.map(|bits| {
                            let values = from_bits(bits);
                            let mut body = format!("{{\"epoch\":{epoch},\"aggregate\":{:?},\"segment\":{label},\"count\":{}", aggregate.name, values[0]);
                            for (j, measure) in aggregate.measures.iter().enumerate() {
                                let _ = write!(body, ",{:?}:{{", plan.fields[*measure].name);
                                for (k, statistic) in MEASURE_STATISTICS.iter().enumerate() {
                                    let value = values[1 + j * MEASURE_STATISTICS.len() + k];
                                    let value = if value.is_finite() { ryu::Buffer::new().format_finite(value).trim_end_matches(".0").to_string() } else { "null".into() };
                                    let _ = write!(body, "{}\"{statistic}\":{value}", if k > 0 { "," } else { "" });
                                }
                                body.push('}');
                            }
                            body.push('}');
                            body
                        });
                        documents.push(OutputDocument {
                            key: format!("{}/{label}", aggregate.name),
                            version: epoch,
                            body,
                            position: SourcePosition { partition: 0, offset: 0, byte_offset: 0, timestamp_ms: 0 },
                            read_at_nanos: 0,
                            market: true,
                        });
                    }
                    documents.sort_by(|a, b| a.key.cmp(&b.key));
                    output.session(&capability).give_iterator(documents.into_iter().map(StatisticsRecord));
                }
            }
        },
    )
}

/// A record of the statistics changelog: written like a document (keyed by
/// segment, a tombstone when the segment empties), counted as none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatisticsRecord(pub OutputDocument);

/// Records of one epoch in segment order, as `statistics_changelog` made them.
pub fn changelog_order(a: &StatisticsRecord, b: &StatisticsRecord) -> std::cmp::Ordering {
    a.0.key.cmp(&b.0.key)
}
