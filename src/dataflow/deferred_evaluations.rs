//! The market re-evaluations that wait for a later epoch
//! (`runtime.market_evaluations_per_epoch_and_partition`; live inputs only):
//! first in, first out, and checkpointed with the state, one value per
//! partition.
//!
//! # Why a queue
//! A market window's end moves many segments' statistics at one epoch, and
//! every neighbour whose signature moved is re-evaluated in it: thousands of
//! states read, features, shaping and documents in one epoch, which every
//! later epoch's documents wait for (sinks write in epoch order). With a
//! limit per epoch, the evaluator takes the oldest waiting listings first and
//! leaves the rest for the next epochs, so the records read meanwhile wait
//! for a chunk, not for the whole window end.
//!
//! A waiting listing is evaluated with the statistics of the epoch it comes
//! out at, which are at least as new as those of its move. An own event of
//! the listing takes it out of the queue: its own evaluation sees the
//! current statistics.
//!
//! # Checkpoints
//! A checkpoint covers an epoch whose documents are written and whose state
//! is stored; a listing still waiting has neither its document nor its state
//! updated for the move. So the queue is written with the checkpoint's
//! changes (the stage snapshots it when it seals them, as it stood at the
//! end of the checkpoint's epoch), and a restart puts the listings back
//! where they were.
//!
//! # Live inputs only
//! Every epoch that passes takes a chunk; over Kafka, which epochs pass
//! while listings wait follows the clock. A file input would make its bytes
//! depend on that timing, so `dataflow::run` sets no limit for one.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::state::StateError;

/// A re-evaluated listing's segment per aggregate, where the join named it.
pub type NamedSegments = SmallVec<[Option<u64>; 2]>;

/// Per input partition, so that which epoch a listing comes out at does not
/// depend on how partitions are spread over workers.
#[derive(Default)]
pub struct DeferredEvaluations {
    /// Arrival order per partition, each entry with its arrival number; an
    /// entry whose listing no longer waits under that number (taken out by
    /// an own event, and maybe queued again since, further back) is skipped
    /// when it comes up.
    order: std::collections::BTreeMap<u32, VecDeque<(Box<str>, u64)>>,
    waiting: FxHashMap<(u32, Box<str>), (NamedSegments, u64)>,
    arrivals: u64,
    /// Listings `take` gave out that had arrived before its `arrived_by`
    /// (waited for a later epoch than their move's).
    pub waited: u64,
}

impl DeferredEvaluations {
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The arrival number of the last listing queued: `take` counts those
    /// at or below it as having waited.
    pub fn arrivals(&self) -> u64 {
        self.arrivals
    }

    /// Queues a listing at the back of its partition's queue, or, when it
    /// waits already, keeps its place and takes the newer segment where this
    /// move names one (a listing that waits has had no event, so its
    /// segments are the same; another aggregate's move may name one the
    /// first did not).
    pub fn push(&mut self, partition: u32, key: &str, named: &NamedSegments) {
        if let Some((waiting, _)) = self.waiting.get_mut(&(partition, Box::from(key))) {
            for (old, new) in waiting.iter_mut().zip(named) {
                *old = new.or(*old);
            }
            return;
        }
        let key: Box<str> = key.into();
        self.arrivals += 1;
        self.order
            .entry(partition)
            .or_default()
            .push_back((key.clone(), self.arrivals));
        self.waiting
            .insert((partition, key), (named.clone(), self.arrivals));
    }

    pub fn contains(&self, partition: u32, key: &str) -> bool {
        !self.waiting.is_empty() && self.waiting.contains_key(&(partition, Box::from(key)))
    }

    /// Takes a listing out (its own event evaluates it now).
    pub fn remove(&mut self, partition: u32, key: &str) {
        if !self.waiting.is_empty() {
            self.waiting.remove(&(partition, Box::from(key)));
        }
    }

    /// Up to `limit` listings of every partition, each partition's that
    /// waited longest, in partition order; those that arrived by
    /// `arrived_by` (an earlier epoch's) count in `waited`.
    pub fn take(&mut self, limit: usize, arrived_by: u64) -> Vec<((u32, Box<str>), NamedSegments)> {
        let mut taken = Vec::new();
        for (partition, order) in self.order.iter_mut() {
            let mut from_partition = 0;
            while from_partition < limit
                && let Some((key, arrival)) = order.pop_front()
            {
                let listing = (*partition, key);
                if self
                    .waiting
                    .get(&listing)
                    .is_some_and(|(_, a)| *a == arrival)
                {
                    let (named, _) = self.waiting.remove(&listing).expect("looked up");
                    self.waited += (arrival <= arrived_by) as u64;
                    taken.push((listing, named));
                    from_partition += 1;
                }
            }
        }
        self.order.retain(|_, order| !order.is_empty());
        taken
    }

    /// The queue as stored: for each of `partitions`, its listings in queue
    /// order (empty: nothing waits, the stored value is deleted).
    pub fn encode(&self, partitions: &[u32]) -> Vec<(u32, Vec<u8>)> {
        let mut encoded = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let mut bytes = Vec::new();
            for (key, arrival) in self.order.get(partition).into_iter().flatten() {
                let Some((named, _)) = self
                    .waiting
                    .get(&(*partition, key.clone()))
                    .filter(|(_, a)| a == arrival)
                else {
                    continue;
                };
                bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
                bytes.extend_from_slice(key.as_bytes());
                bytes.push(named.len() as u8);
                for segment in named {
                    match segment {
                        Some(segment) => {
                            bytes.push(1);
                            bytes.extend_from_slice(&segment.to_le_bytes());
                        }
                        None => bytes.push(0),
                    }
                }
            }
            encoded.push((*partition, bytes));
        }
        encoded
    }

    /// Queues a partition's stored listings (from `encode`), in their order.
    pub fn decode_into(&mut self, partition: u32, bytes: &[u8]) -> Result<(), StateError> {
        let corrupt = || StateError::Corrupt {
            format: 0,
            detail: format!("the waiting market re-evaluations of partition {partition}"),
        };
        let mut at = 0;
        let take = |at: &mut usize, n: usize| -> Result<&[u8], StateError> {
            let taken = bytes.get(*at..*at + n).ok_or_else(corrupt)?;
            *at += n;
            Ok(taken)
        };
        let mut listings = Vec::new();
        while at < bytes.len() {
            let len = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4 bytes")) as usize;
            let key = std::str::from_utf8(take(&mut at, len)?)
                .map_err(|_| corrupt())?
                .to_string();
            let aggregates = take(&mut at, 1)?[0] as usize;
            let mut named = NamedSegments::new();
            for _ in 0..aggregates {
                named.push(match take(&mut at, 1)?[0] {
                    0 => None,
                    1 => Some(u64::from_le_bytes(
                        take(&mut at, 8)?.try_into().expect("8 bytes"),
                    )),
                    _ => return Err(corrupt()),
                });
            }
            listings.push((key, named));
        }
        // (whole or not at all)
        for (key, named) in listings {
            self.push(partition, &key, &named);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(segments: &[Option<u64>]) -> NamedSegments {
        segments.iter().copied().collect()
    }

    fn listing(
        partition: u32,
        key: &str,
        segments: &[Option<u64>],
    ) -> ((u32, Box<str>), NamedSegments) {
        ((partition, key.into()), named(segments))
    }

    #[test]
    fn each_partition_oldest_first_an_own_event_takes_a_listing_out_and_a_second_move_keeps_its_place()
     {
        let mut queue = DeferredEvaluations::default();
        queue.push(1, "a", &named(&[Some(10), None]));
        queue.push(0, "b", &named(&[Some(20), None]));
        queue.push(1, "c", &named(&[Some(30), None]));
        queue.push(1, "a", &named(&[None, Some(11)]));
        queue.push(0, "d", &named(&[Some(40), None]));
        queue.push(1, "e", &named(&[Some(50), None]));
        queue.remove(0, "b");
        assert_eq!(queue.len(), 4);
        assert_eq!(
            queue.take(1, 4),
            [
                listing(0, "d", &[Some(40), None]),
                listing(1, "a", &[Some(10), Some(11)])
            ]
        );
        assert_eq!(
            queue.take(5, 4),
            [
                listing(1, "c", &[Some(30), None]),
                listing(1, "e", &[Some(50), None])
            ]
        );
        assert!(queue.take(5, 4).is_empty());
        assert!(queue.is_empty());
        // arrivals 1 (a), 3 (c) and 4 (d) had arrived by 4; e arrived 5th
        assert_eq!(queue.waited, 3);
    }

    #[test]
    fn a_stored_queue_comes_back_in_the_same_order() {
        let mut queue = DeferredEvaluations::default();
        queue.push(3, "x", &named(&[Some(u64::MAX), None]));
        queue.push(5, "ünïcode key", &named(&[None]));
        queue.push(3, "y", &named(&[Some(7), Some(8)]));
        queue.remove(3, "x");
        queue.push(3, "x", &named(&[Some(1), None]));
        queue.push(3, "z", &named(&[None, None]));
        queue.remove(3, "z");
        let stored = queue.encode(&[3, 5, 7]);
        assert_eq!(
            stored.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            [3, 5, 7]
        );
        assert!(stored[2].1.is_empty(), "nothing waits in partition 7");
        let mut back = DeferredEvaluations::default();
        for (partition, bytes) in &stored {
            back.decode_into(*partition, bytes).unwrap();
        }
        // and each queue, taken and queued again alike, gives the same order
        for q in [&mut queue, &mut back] {
            q.push(3, "z", &named(&[Some(2), None]));
        }
        let taken = queue.take(usize::MAX, 0);
        assert_eq!(back.take(usize::MAX, 0), taken);
        let keys: Vec<&str> = taken.iter().map(|((_, key), _)| &**key).collect();
        assert_eq!(
            keys,
            ["y", "x", "z", "ünïcode key"],
            "x went to the back when queued again"
        );
        for cut in [1, stored[0].1.len() - 1] {
            let cut = &stored[0].1[..cut];
            assert!(
                DeferredEvaluations::default().decode_into(3, cut).is_err(),
                "{cut:?}"
            );
        }
    }
}
