//! Segment statistics: count, mean and quartiles of each measure over a
//! segment's live members, maintained incrementally.
//!
//! # Why not differential's `reduce`
//! `reduce` recomputes a changed group from all of its values: for a segment
//! of 100,000 listings, every epoch that touches it walks 100,000 members
//! through the trace's cursors (it was a third of the engine's time in
//! `assay bench-market`). Quartiles need the values in order, but not a
//! recomputation: this operator keeps each segment's values of each measure
//! sorted, in chunks of about a thousand (an insertion or a retraction moves
//! one chunk), and reads the quartiles by rank. Its input and output are
//! still differential collections: members (`±1` per listing and segment)
//! in, and `(segment, statistics)` changes out (the old statistics
//! retracted, the new inserted), so the rest of the market (the seen
//! statistics, the bucket views, the join, the statistics changelog) is
//! unchanged, and the oracle test compares it with a from-scratch
//! recomputation after every epoch.
//!
//! # Means that do not depend on arrival order
//! A float sum depends on the order of its additions, and retractions leave
//! rounding residue behind: a segment rebuilt after a restart would get a
//! different mean in the last bits than the same segment maintained through
//! the run, and a rounded statistic could flip. Sums are therefore kept in
//! fixed point, as integers of 2^-32 (each value is rounded to that grid
//! first), which makes them exact and the mean a function of the live
//! members alone.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::operator::Operator;

use crate::dataflow::market::{Member, MemberUpdate, StatisticBits, member_measure, to_bits};
use crate::topology::Plan;

/// Fractional bits of the fixed-point sums.
const FRACTION_BITS: i32 = 32;

/// A measure value on the fixed-point grid (saturating far beyond any price or distance).
pub fn fixed_point(value: f64) -> i128 {
    crate::features::round(value * 2f64.powi(FRACTION_BITS)) as i128
}

/// The mean of `count` values whose fixed-point sum is `sum`.
pub fn fixed_point_mean(sum: i128, count: usize) -> f64 {
    if count == 0 {
        return f64::NAN;
    }
    (sum as f64 / 2f64.powi(FRACTION_BITS)) / count as f64
}

/// Values per chunk of a measure's sorted values, at most twice this. An
/// insertion or retraction moves half a chunk on average (with 1,024 that
/// memmove was a tenth of bench-market's time); a rank lookup walks the
/// chunks, a few hundred in a segment of 100,000.
const CHUNK: usize = 256;

/// One measure of one segment: its values in order (absent ones are not
/// kept), in chunks so that an insertion or a retraction moves at most a
/// chunk, not the whole segment, and their sum.
#[derive(Debug, Default, Clone)]
pub struct MeasureIndex {
    chunks: Vec<Vec<f64>>,
    len: usize,
    sum: i128,
}

impl MeasureIndex {
    /// Inserts, then retracts, an epoch's values: a listing created and
    /// changed in one epoch retracts a value inserted in the same epoch.
    fn apply(&mut self, inserts: &[f64], removes: &[f64]) {
        for value in inserts {
            self.insert(*value);
        }
        for value in removes {
            self.remove(*value);
        }
    }

    /// The first chunk whose last value is at or above `value` (the last chunk when none is).
    fn chunk_for(&self, value: f64) -> usize {
        self.chunks
            .partition_point(|chunk| {
                chunk
                    .last()
                    .is_some_and(|last| last.total_cmp(&value).is_lt())
            })
            .min(self.chunks.len().saturating_sub(1))
    }

    fn insert(&mut self, value: f64) {
        self.sum += fixed_point(value);
        self.len += 1;
        if self.chunks.is_empty() {
            // most segments are small: let the first chunk grow as needed
            self.chunks.push(Vec::new());
        }
        let index = self.chunk_for(value);
        let chunk = &mut self.chunks[index];
        let at = chunk.partition_point(|x| x.total_cmp(&value).is_lt());
        chunk.insert(at, value);
        if chunk.len() > 2 * CHUNK {
            let upper = chunk.split_off(CHUNK);
            chunk.shrink_to(CHUNK + CHUNK / 2);
            self.chunks.insert(index + 1, upper);
        }
    }

    fn remove(&mut self, value: f64) {
        if self.chunks.is_empty() {
            return;
        }
        // every value before this chunk is below `value`: its first copy is here
        let index = self.chunk_for(value);
        let chunk = &mut self.chunks[index];
        let at = chunk.partition_point(|x| x.total_cmp(&value).is_lt());
        if chunk.get(at).is_some_and(|x| x.total_cmp(&value).is_eq()) {
            chunk.remove(at);
            self.sum -= fixed_point(value);
            self.len -= 1;
            if chunk.is_empty() {
                self.chunks.remove(index);
            }
        }
    }

    /// The value of rank `rank` (0-based) in order.
    fn at(&self, mut rank: usize) -> f64 {
        for chunk in &self.chunks {
            if rank < chunk.len() {
                return chunk[rank];
            }
            rank -= chunk.len();
        }
        f64::NAN
    }

    /// Linear interpolation between closest ranks, as `market::quantile`.
    fn quantile(&self, q: f64) -> f64 {
        if self.len == 0 {
            return f64::NAN;
        }
        let position = (self.len - 1) as f64 * q;
        let (low, high) = (position.floor() as usize, position.ceil() as usize);
        let (a, b) = (self.at(low), self.at(high));
        a + (b - a) * (position - low as f64)
    }

    fn bytes(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| c.capacity() * 8 + 24)
            .sum::<usize>()
            + self.chunks.capacity() * 24
            + std::mem::size_of::<Self>()
    }

    #[cfg(test)]
    fn values(&self) -> Vec<f64> {
        self.chunks.concat()
    }
}

/// A segment's live members, as the statistics need them.
#[derive(Debug, Default)]
struct SegmentIndex {
    count: i64,
    measures: Vec<MeasureIndex>,
    /// What was last sent for this segment (to retract it when it changes).
    statistics: Option<StatisticBits>,
}

impl SegmentIndex {
    /// count, then mean, p25, median, p75 per measure (NaN when no member has the measure).
    fn statistics(&self) -> StatisticBits {
        let mut values = Vec::with_capacity(1 + self.measures.len() * 4);
        values.push(self.count as f64);
        for measure in &self.measures {
            values.extend([
                fixed_point_mean(measure.sum, measure.len),
                measure.quantile(0.25),
                measure.quantile(0.5),
                measure.quantile(0.75),
            ]);
        }
        to_bits(&values)
    }
}

/// The operator: member changes in, exact statistics changes out. `memory`
/// receives the bytes its indexes hold, after every epoch.
#[expect(
    clippy::type_complexity,
    reason = "the pending epochs' type spells out what is held: capability and member updates"
)]
pub fn build<'scope>(
    plan: Arc<Plan>,
    members: StreamVec<'scope, u64, MemberUpdate>,
    memory: Rc<Cell<usize>>,
) -> StreamVec<'scope, u64, ((u64, StatisticBits), u64, isize)> {
    members.unary_frontier::<timely::container::CapacityContainerBuilder<Vec<((u64, StatisticBits), u64, isize)>>, _, _, _>(
        Exchange::new(|((segment, _), _, _): &MemberUpdate| *segment),
        "SegmentStatistics",
        move |_, _| {
            let mut pending: BTreeMap<u64, (Capability<u64>, Vec<(u64, Member, isize)>)> = BTreeMap::new();
            let mut segments: FxHashMap<u64, SegmentIndex> = FxHashMap::default();
            move |(input, frontier), output| {
                input.for_each_stamp(|capability, containers| {
                    let Some(capability) = capability.retain_least(0) else { return };
                    for container in containers {
                        for ((segment, member), time, diff) in container.drain(..) {
                            pending
                                .entry(time)
                                .or_insert_with(|| (capability.delayed(&time), Vec::new()))
                                .1
                                .push((segment, member, diff));
                        }
                    }
                });
                while let Some(entry) = pending.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (capability, mut updates) = entry.remove();
                    updates.sort_unstable_by_key(|(segment, _, _)| *segment);
                    let mut session = output.session(&capability);
                    let time = *capability.time();
                    let mut inserts: Vec<Vec<f64>> = Vec::new();
                    let mut removes: Vec<Vec<f64>> = Vec::new();
                    for group in updates.chunk_by(|a, b| a.0 == b.0) {
                        let segment = group[0].0;
                        let aggregate = &plan.aggregates[(segment >> 56) as usize];
                        let measures = aggregate.measures.len();
                        inserts.resize_with(measures, Vec::new);
                        removes.resize_with(measures, Vec::new);
                        inserts.iter_mut().chain(removes.iter_mut()).for_each(Vec::clear);
                        let index = segments.entry(segment).or_insert_with(|| SegmentIndex {
                            measures: vec![MeasureIndex::default(); measures],
                            ..SegmentIndex::default()
                        });
                        for (_, member, diff) in group {
                            index.count += *diff as i64;
                            for j in 0..measures {
                                let value = member_measure(member, j);
                                if value.is_nan() {
                                    continue;
                                }
                                let side = if *diff > 0 { &mut inserts[j] } else { &mut removes[j] };
                                side.extend(std::iter::repeat_n(value, diff.unsigned_abs()));
                            }
                        }
                        for j in 0..measures {
                            index.measures[j].apply(&inserts[j], &removes[j]);
                        }
                        let statistics = (index.count > 0).then(|| index.statistics());
                        if statistics != index.statistics {
                            if let Some(old) = index.statistics.take() {
                                session.give(((segment, old), time, -1));
                            }
                            if let Some(new) = &statistics {
                                session.give(((segment, new.clone()), time, 1));
                            }
                            index.statistics = statistics;
                        }
                        if index.count <= 0 {
                            segments.remove(&segment);
                        }
                    }
                    memory.set(segments.values().map(|s| s.measures.iter().map(MeasureIndex::bytes).sum::<usize>() + 64).sum());
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_of(values: &[f64]) -> MeasureIndex {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mut index = MeasureIndex::default();
        index.apply(&sorted, &[]);
        index
    }

    #[test]
    fn statistics_count_mean_and_quartiles_per_measure() {
        let segment = SegmentIndex {
            count: 3,
            measures: vec![index_of(&[30.0, 10.0, 20.0]), index_of(&[])],
            statistics: None,
        };
        let stats: Vec<f64> = segment
            .statistics()
            .into_iter()
            .map(f64::from_bits)
            .collect();
        assert_eq!(stats[..5], [3.0, 20.0, 15.0, 20.0, 25.0]);
        assert!(
            stats[5..].iter().all(|x| x.is_nan()),
            "a measure no member has gives no statistics"
        );
    }

    #[test]
    fn a_value_inserted_and_retracted_in_one_epoch_is_gone() {
        let mut index = index_of(&[1.0]);
        index.apply(&[2.0, 3.0], &[2.0]);
        assert_eq!(index.values(), [1.0, 3.0]);
    }

    #[test]
    fn insertions_and_retractions_keep_the_values_sorted() {
        let mut index = index_of(&[5.0, 1.0, 3.0, 3.0, 9.0]);
        assert_eq!(index.values(), [1.0, 3.0, 3.0, 5.0, 9.0]);
        index.apply(&[2.0, 3.0, 10.0], &[3.0, 9.0]);
        assert_eq!(index.values(), [1.0, 2.0, 3.0, 3.0, 5.0, 10.0]);
        assert_eq!(index.sum, fixed_point(24.0));
        index.apply(&[], &[1.0, 2.0, 3.0, 3.0, 5.0, 10.0]);
        assert!(index.values().is_empty());
        assert_eq!(index.sum, 0);
    }

    #[test]
    fn chunked_values_answer_quantiles_as_a_sorted_vector_does() {
        let mut rng = crate::bench::Rng::new(11);
        let mut index = MeasureIndex::default();
        let mut naive: Vec<f64> = Vec::new();
        for step in 0..20_000 {
            if naive.is_empty() || rng.below(3) > 0 {
                let value = (rng.below(500) * 10) as f64; // many duplicates across chunks
                index.insert(value);
                naive.push(value);
            } else {
                let value = naive.swap_remove(rng.below(naive.len()));
                index.remove(value);
            }
            if step % 997 == 0 {
                naive.sort_by(f64::total_cmp);
                assert_eq!(index.values(), naive);
                for q in [0.25, 0.5, 0.75] {
                    assert_eq!(
                        index.quantile(q),
                        crate::dataflow::market::quantile(&naive, q)
                    );
                }
            }
        }
        assert!(index.chunks.len() > 2, "the test crossed chunk boundaries");
    }

    #[test]
    fn fixed_point_sums_do_not_depend_on_the_order_values_came_and_went() {
        let values = [0.1, 1e9 + 0.3, 12_345.67, 0.2, 7.0];
        let mut forward = MeasureIndex::default();
        for value in values {
            forward.apply(&[value], &[]);
        }
        forward.apply(&[], &[1e9 + 0.3]);
        let rebuilt = index_of(&[0.1, 12_345.67, 0.2, 7.0]);
        assert_eq!(forward.sum, rebuilt.sum);
        assert_eq!(forward.values(), rebuilt.values());
        let mean = fixed_point_mean(rebuilt.sum, 4);
        assert!(
            (mean - (0.1 + 12_345.67 + 0.2 + 7.0) / 4.0).abs() < 1e-9,
            "{mean}"
        );
    }
}
