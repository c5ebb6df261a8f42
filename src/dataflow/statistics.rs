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
use crate::features::as_whole;
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
            let quoted = QuotedNames::new(&plan);
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
                            let mut body = String::with_capacity(256);
                            let _ = write!(body, "{{\"epoch\":{epoch},\"aggregate\":{},\"segment\":{label},\"count\":", quoted.aggregates[(segment >> 56) as usize]);
                            write_count(&mut body, values[0]);
                            for (j, measure) in aggregate.measures.iter().enumerate() {
                                body.push(',');
                                body.push_str(&quoted.fields[*measure]);
                                body.push_str(":{");
                                for (k, statistic) in MEASURE_STATISTICS.iter().enumerate() {
                                    if k > 0 {
                                        body.push(',');
                                    }
                                    body.push('"');
                                    body.push_str(statistic);
                                    body.push_str("\":");
                                    write_statistic(&mut body, values[1 + j * MEASURE_STATISTICS.len() + k]);
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

/// Aggregate and field names as the changelog writes them (Rust's `{:?}`,
/// which is JSON's quoting for the names a topology admits), made once
/// instead of per record.
struct QuotedNames {
    aggregates: Vec<String>,
    fields: Vec<String>,
}

impl QuotedNames {
    fn new(plan: &Plan) -> Self {
        QuotedNames {
            aggregates: plan
                .aggregates
                .iter()
                .map(|a| format!("{:?}", a.name))
                .collect(),
            fields: plan
                .fields
                .iter()
                .map(|f| format!("{:?}", f.name))
                .collect(),
        }
    }
}

/// A whole value as both f64 printers below show it, digits only: below
/// 9e15 (ryu switches to exponents only from 1e16), and not -0, which both
/// print with its sign.
fn printed_whole(value: f64) -> Option<i64> {
    as_whole(value).filter(|_| !(value == 0.0 && value.is_sign_negative()))
}

/// A segment's count as `{}` prints an f64: whole counts without a fraction.
fn write_count(out: &mut String, count: f64) {
    match printed_whole(count) {
        Some(whole) => out.push_str(itoa::Buffer::new().format(whole)),
        None => {
            let _ = write!(out, "{count}");
        }
    }
}

/// A statistic as ryu prints it with a trailing `.0` cut (`null` when not
/// finite). Most statistics are whole (prices, odometers, their quantiles):
/// those go through itoa, which prints the same digits, at a fraction of
/// ryu's and the trim's cost. Formatting through `format!`, ryu, a trim
/// and a `String` per value was 15,000 instructions a record (callgrind,
/// the 100k-event harness with the changelog bound).
fn write_statistic(out: &mut String, value: f64) {
    if !value.is_finite() {
        out.push_str("null");
    } else if let Some(whole) = printed_whole(value) {
        out.push_str(itoa::Buffer::new().format(whole));
    } else {
        let mut buffer = ryu::Buffer::new();
        out.push_str(buffer.format_finite(value).trim_end_matches(".0"));
    }
}

/// A record of the statistics changelog: written like a document (keyed by
/// segment, a tombstone when the segment empties), counted as none.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatisticsRecord(pub OutputDocument);

/// Records of one epoch in segment order, as `statistics_changelog` made them.
pub fn changelog_order(a: &StatisticsRecord, b: &StatisticsRecord) -> std::cmp::Ordering {
    a.0.key.cmp(&b.0.key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the changelog wrote before `write_statistic`: ryu, then the
    /// trailing `.0` trimmed.
    fn as_ryu_trimmed(value: f64) -> String {
        if value.is_finite() {
            ryu::Buffer::new()
                .format_finite(value)
                .trim_end_matches(".0")
                .to_string()
        } else {
            "null".into()
        }
    }

    #[test]
    fn statistics_print_as_ryu_with_the_trailing_zero_cut() {
        let mut values = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            -0.5,
            19990.0,
            11951.5,
            1e15,
            8.999e15,
            9e15,
            9.5e15,
            1e16,
            1e17,
            1e300,
            -1e16,
            3e9,
            1e-7,
            123.456,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MIN_POSITIVE,
            f64::MAX,
            (1u64 << 53) as f64,
        ];
        let mut rng = crate::bench::Rng::new(11);
        for i in 0..200_000 {
            let bits = rng.next_u64();
            values.push(match i % 4 {
                0 => (bits % 10_000_000) as f64,
                1 => (bits % 10_000_000) as f64 / 4.0,
                2 => -((bits % (1u64 << 54)) as f64),
                _ => f64::from_bits(bits),
            });
        }
        for value in values {
            let mut ours = String::new();
            write_statistic(&mut ours, value);
            assert_eq!(
                ours,
                as_ryu_trimmed(value),
                "{value:e} ({:#x})",
                value.to_bits()
            );
            let mut count = String::new();
            write_count(&mut count, value);
            assert_eq!(count, format!("{value}"), "count {value:e}");
        }
    }
}
