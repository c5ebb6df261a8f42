//! Bucket views: what the join hands each bucket of a segment's members.
//!
//! # Why
//! The join re-visits every member of a segment whose statistics moved: in a
//! segment of 100,000 listings, each move of its rounded median walked
//! 100,000 members to find the few whose price position changed. Members are
//! therefore keyed by (segment, bucket), a bucket being a narrow log-spaced
//! range of the value their projection reads (`market::member_bucket`), and
//! the join is fed one *view* of the statistics per populated bucket instead
//! of one per segment.
//!
//! # The invariant
//! A bucket's view is statistics under which every member of the bucket has
//! the signature it has under the segment's current statistics. When the
//! statistics move, a bucket keeps its view if `market::bucket_unaffected`
//! proves that nothing its members show can change (interval arithmetic over
//! the bucket's range); otherwise its view becomes the current statistics,
//! and the join re-visits that bucket's members only. A bucket that gains its
//! first member gets the current statistics. The evaluator never reads a
//! view: documents use the segment's current statistics, which give the same
//! output fields for exactly those members.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use crate::dataflow::market::{StatisticBits, bucket_unaffected, net_statistics_changes};
use crate::topology::Plan;

/// A change of one bucket's view.
pub type ViewUpdate = (((u64, u16), StatisticBits), u64, isize);

#[derive(Default)]
struct Segment {
    /// The current seen statistics (none once the segment is empty).
    statistics: Option<StatisticBits>,
    /// Per populated bucket: its member count and its view.
    buckets: BTreeMap<u16, (i64, StatisticBits)>,
}

type Pending = (
    Capability<u64>,
    Vec<(u64, u16, isize)>,
    Vec<(u64, StatisticBits, isize)>,
);

/// Members' (segment, bucket) changes and the seen statistics' changes in,
/// bucket views' changes out. `plan` is read for the projections.
pub fn build<'scope>(
    plan: Arc<Plan>,
    members: StreamVec<'scope, u64, ((u64, u16), u64, isize)>,
    seen: StreamVec<'scope, u64, ((u64, StatisticBits), u64, isize)>,
) -> StreamVec<'scope, u64, ViewUpdate> {
    members.binary_frontier::<_, timely::container::CapacityContainerBuilder<Vec<ViewUpdate>>, _, _, _, _>(
        seen,
        Exchange::new(|((segment, _), _, _): &((u64, u16), u64, isize)| *segment),
        Exchange::new(|((segment, _), _, _): &((u64, StatisticBits), u64, isize)| *segment),
        "BucketViews",
        move |_, _| {
            let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
            let mut segments: FxHashMap<u64, Segment> = FxHashMap::default();
            move |(members, members_frontier), (seen, seen_frontier), output| {
                members.for_each_stamp(|capability, containers| {
                    let Some(capability) = capability.retain_least(0) else { return };
                    for container in containers {
                        for ((segment, bucket), time, diff) in container.drain(..) {
                            pending
                                .entry(time)
                                .or_insert_with(|| (capability.delayed(&time), Vec::new(), Vec::new()))
                                .1
                                .push((segment, bucket, diff));
                        }
                    }
                });
                seen.for_each_stamp(|capability, containers| {
                    let Some(capability) = capability.retain_least(0) else { return };
                    for container in containers {
                        for ((segment, statistics), time, diff) in container.drain(..) {
                            pending
                                .entry(time)
                                .or_insert_with(|| (capability.delayed(&time), Vec::new(), Vec::new()))
                                .2
                                .push((segment, statistics, diff));
                        }
                    }
                });
                while let Some(entry) = pending.first_entry() {
                    let time = *entry.key();
                    if members_frontier.less_equal(&time) || seen_frontier.less_equal(&time) {
                        break;
                    }
                    let (capability, member_changes, statistics_changes) = entry.remove();
                    let mut session = output.session(&capability);
                    // Segments whose statistics moved: every bucket's view is checked.
                    // Elsewhere only buckets whose member count changed can need a new
                    // view (their first, or none once emptied): the others' views were
                    // checked against these same statistics when they last moved.
                    let mut moved: Vec<u64> = Vec::new();
                    for (segment, statistics) in net_statistics_changes(statistics_changes) {
                        segments.entry(segment).or_default().statistics = statistics;
                        moved.push(segment);
                    }
                    moved.sort_unstable();
                    let mut counted: Vec<(u64, u16)> = Vec::with_capacity(member_changes.len());
                    for (segment, bucket, diff) in member_changes {
                        let state = segments.entry(segment).or_default();
                        state.buckets.entry(bucket).or_insert((0, Vec::new())).0 += diff as i64;
                        if moved.binary_search(&segment).is_err() {
                            counted.push((segment, bucket));
                        }
                    }
                    counted.sort_unstable();
                    counted.dedup();
                    let mut touched: Vec<u64> = moved.clone();
                    touched.extend(counted.iter().map(|(segment, _)| *segment));
                    touched.sort_unstable();
                    touched.dedup();
                    let mut counted = counted.into_iter().peekable();
                    for segment in touched {
                        let aggregate = (segment >> 56) as usize;
                        let state = segments.get_mut(&segment).expect("touched segments exist");
                        let current = state.statistics.clone();
                        let mut visit = |bucket: u16, (count, view): &mut (i64, StatisticBits)| -> bool {
                            let had_view = !view.is_empty();
                            match (&current, *count > 0) {
                                (Some(statistics), true) => {
                                    if !had_view {
                                        *view = statistics.clone();
                                        session.give((((segment, bucket), view.clone()), time, 1));
                                    } else if !bucket_unaffected(&plan, aggregate, bucket, view, statistics) {
                                        session.give((((segment, bucket), std::mem::take(view)), time, -1));
                                        *view = statistics.clone();
                                        session.give((((segment, bucket), view.clone()), time, 1));
                                    }
                                    true
                                }
                                _ => {
                                    // emptied (or, transiently, without statistics): no view
                                    if had_view {
                                        session.give((((segment, bucket), std::mem::take(view)), time, -1));
                                    }
                                    *count > 0
                                }
                            }
                        };
                        if moved.binary_search(&segment).is_ok() {
                            state.buckets.retain(|bucket, entry| visit(*bucket, entry));
                        } else {
                            while let Some((_, bucket)) = counted.next_if(|(s, _)| *s == segment) {
                                let entry = state.buckets.get_mut(&bucket).expect("counted buckets exist");
                                if !visit(bucket, entry) {
                                    state.buckets.remove(&bucket);
                                }
                            }
                        }
                        if state.buckets.is_empty() && state.statistics.is_none() {
                            segments.remove(&segment);
                        }
                    }
                }
            }
        },
    )
}
