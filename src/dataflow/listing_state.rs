//! Per-listing state: the version gate, merging changes, state features.
//!
//! # Lifecycle
//! - `process`: one message of events, in order. Reads the listings it has not
//!   seen since the last checkpoint with one `multi_get`, then applies each
//!   event against the freshest state (dirty map first, then the store).
//! - `begin_checkpoint`: the worker loop calls it when every epoch it has sent
//!   is complete; dirty states and source positions go to RocksDB in one
//!   batch, written on a thread of its own while the worker goes on (the
//!   write was the largest stall of a live run's tail latency). Until the
//!   write is done, its states stay readable here (dirty map, then the states
//!   being written, then the store); `finished_checkpoint` hands back the
//!   positions once they are durable, and only then may a source commit them.
//! - `rebuild`: at start, every live listing of the worker's partitions as a
//!   member of its segments, so the market arrangements are rebuilt.
//!
//! # Market members
//! With `[[aggregate]]` blocks, every accepted event also yields member
//! updates: the listing's old member of each aggregate is retracted and its
//! new one inserted (see `market`). A delete only retracts.
//!
//! # Version gate
//! An event whose version is not above the listing's stored version is
//! dropped: equal is a duplicate, lower is stale. A removed listing keeps a
//! tombstone state holding its last version, so a late event cannot bring it
//! back.

use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;
use std::sync::Arc;

use crate::dataflow::decode::ChangeEvent;
use crate::dataflow::deferred_evaluations::DeferredEvaluations;
use crate::dataflow::market::{self, MemberUpdate};
use crate::features;
use crate::record::{DeadLetter, SourcePosition, Value};
use crate::state::{CheckpointedPosition, ListingState, StateError, Store};
use crate::topology::{Function, KindAction, Plan, ValueRef};

pub const STAGE: &str = "state";

/// Why a document is being evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The listing's own event.
    Event,
    /// The listing's market statistics moved.
    Market,
}

/// A listing to evaluate: its state at the event (or now, for a market
/// re-evaluation), later joined with its market statistics.
#[derive(Debug, Clone)]
pub struct Enriched {
    pub key: String,
    pub version: u64,
    pub event_time: i64,
    pub deleted: bool,
    /// Shared with the stage's unwritten changes, not copied (a copy per
    /// event was 2% of the core pipeline's worker time). Nothing changes a state
    /// while a row holds it: the evaluator records its decision on the
    /// stage's copy once the listing's last row has let go of it, and
    /// `Arc::make_mut` copies it only if a row were still alive.
    pub state: Arc<ListingState>,
    /// Filled by the evaluator: features in declaration order.
    pub features: Vec<Option<f64>>,
    /// Filled by the evaluator: rounded statistics of every aggregate, flattened.
    pub market: Vec<f64>,
    /// The listing's segment in each aggregate (`None`: a group-by value is
    /// missing), as the state stage computed it for the member update of a
    /// live state; empty when deleted, without aggregates, and on a market
    /// re-evaluation's row (the evaluator hashes that one's group-by values
    /// itself). The evaluator reads an own row's statistics by it instead
    /// of hashing the group-by values again.
    pub segments: SmallVec<[Option<u64>; 2]>,
    pub position: SourcePosition,
    pub read_at_nanos: u64,
    pub cause: Cause,
}

/// What the state stage sends on, a vector per kind: each goes whole to its
/// own output of the stage's operator. (One stream of an enum, split by
/// timely's `partition` and unwrapped by a map per kind, copied every
/// 300-byte row three more times.)
#[derive(Debug, Default)]
pub struct StateOutputs {
    pub events: Vec<Enriched>,
    pub dead: Vec<DeadLetter>,
    pub members: Vec<MemberUpdate>,
    /// Segments seen for the first time on this worker: (segment id, label).
    pub labels: Vec<(u64, String)>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct GateCounts {
    pub stale: u64,
    pub duplicates: u64,
}

/// A checkpoint on its way to RocksDB (see `begin_checkpoint`).
struct CheckpointWrite {
    states: Arc<StateMap>,
    positions: Vec<(u32, CheckpointedPosition)>,
    thread: std::thread::JoinHandle<Result<usize, StateError>>,
}

/// States by state key; each shared with the rows that carry it downstream.
type StateMap = FxHashMap<Vec<u8>, Arc<ListingState>>;

pub struct ListingStateStage {
    plan: Arc<Plan>,
    store: Store,
    dirty: StateMap,
    /// The changes through a checkpoint's epoch, set aside by `seal` until
    /// the sinks have written that epoch's documents and the write can begin
    /// (read between `dirty` and `writing`). Meanwhile later epochs go on into
    /// `dirty`: the source never stops for a checkpoint.
    sealed: Option<Arc<StateMap>>,
    /// The epoch a checkpoint covers, from `seal_after` until the seal: the
    /// first thing of a later epoch to reach this stage (an event applied, or
    /// the evaluator entering that epoch) seals the changes first.
    seal_after: Option<u64>,
    /// The checkpoint being written, at most one: its states (read between
    /// `sealed` and the store) and the thread writing them.
    writing: Option<CheckpointWrite>,
    pub counts: GateCounts,
    /// Segments this worker has labelled already.
    labelled: FxHashSet<u64>,
    /// Where `rebuild_step` continues: (index into its partitions, key).
    rebuild_cursor: Option<(usize, Option<Vec<u8>>)>,
    /// Market re-evaluations waiting for a later epoch; the evaluator queues
    /// and takes them (`runtime.market_evaluations_per_epoch_and_partition`).
    pub deferred: DeferredEvaluations,
    /// The partitions whose waiting re-evaluations each checkpoint writes
    /// (this worker's), when a limit is set or the last run left some
    /// waiting; `None`: checkpoints write none.
    deferred_partitions: Option<Vec<u32>>,
    /// The queue as of the seal, for the checkpoint (see `seal`).
    sealed_deferred: Vec<(u32, Vec<u8>)>,
}

/// A listing's current state, if it has one, and whether `take_current` took
/// it out of the changes since the last checkpoint (it must be handed back).
pub type CurrentState = (Option<Arc<ListingState>>, bool);

impl ListingStateStage {
    pub fn new(plan: Arc<Plan>, store: Store) -> Self {
        ListingStateStage {
            plan,
            store,
            dirty: FxHashMap::default(),
            sealed: None,
            seal_after: None,
            writing: None,
            counts: GateCounts::default(),
            labelled: FxHashSet::default(),
            rebuild_cursor: None,
            deferred: DeferredEvaluations::default(),
            deferred_partitions: None,
            sealed_deferred: Vec::new(),
        }
    }

    /// Puts back the market re-evaluations the last checkpoint left waiting
    /// in `partitions` (this worker's), and has checkpoints write the queue
    /// from now on when `limited` (a limit per epoch is set) or some waited.
    pub fn load_deferred(
        &mut self,
        binding: &str,
        partitions: &[u32],
        limited: bool,
    ) -> Result<(), StateError> {
        let mut loaded = false;
        for partition in partitions {
            if let Some(stored) = self.store.deferred_evaluations(binding, *partition)? {
                self.deferred.decode_into(*partition, &stored)?;
                loaded = true;
            }
        }
        if limited || loaded {
            self.deferred_partitions = Some(partitions.to_vec());
        }
        Ok(())
    }

    /// The segments of a live state in every aggregate, in order (`None`
    /// where a group-by value is missing); empty for a deleted state.
    fn segments_of(plan: &Plan, state: &ListingState) -> SmallVec<[Option<u64>; 2]> {
        if state.deleted {
            return SmallVec::new();
        }
        market::segments_of(plan, &state.fields).collect()
    }

    /// Member updates for a listing going from `old` to `new` (either may be
    /// absent or deleted); `new` comes with its `segments_of`, which the
    /// evaluator reads too. `labelled`: the segments this worker has
    /// labelled already.
    fn member_updates(
        plan: &Plan,
        labelled: &mut FxHashSet<u64>,
        (partition, key): (u32, &str),
        old: Option<&ListingState>,
        (new, new_segments): (&ListingState, &[Option<u64>]),
        time: u64,
        out: &mut StateOutputs,
    ) {
        for aggregate_index in 0..plan.aggregates.len() {
            for (state, diff) in [(old, -1isize), (Some(new), 1)] {
                let Some(state) = state.filter(|s| !s.deleted) else {
                    continue;
                };
                let segment = if diff > 0 {
                    // (a live state has one per aggregate)
                    new_segments.get(aggregate_index).copied().flatten()
                } else {
                    market::segment_of(plan, aggregate_index, &state.fields)
                };
                let Some(segment) = segment else {
                    continue;
                };
                if diff > 0
                    && labelled.insert(segment)
                    && let Some(label) = market::segment_label(plan, aggregate_index, &state.fields)
                {
                    out.labels.push((segment, label));
                }
                let member =
                    market::encode_member(plan, aggregate_index, &state.fields, partition, key);
                out.members.push(((segment, member), time, diff));
            }
        }
    }

    /// One step of rebuilding the market arrangements after a restart: the
    /// next live listings of `partitions` (at most `limit` states read) as
    /// members at `time`, into `out`. Returns `true` when every partition is
    /// done.
    ///
    /// In steps, so that the worker hands each step's members on before it
    /// reads more: reading every live state first held a million decoded
    /// states and their members at once, and a restart peaked at three times
    /// the memory of the run that wrote the state.
    pub fn rebuild_step(
        &mut self,
        partitions: &[u32],
        time: u64,
        limit: usize,
        out: &mut StateOutputs,
    ) -> Result<bool, StateError> {
        if self.plan.aggregates.is_empty() {
            return Ok(true);
        }
        let (partition_index, from) = self.rebuild_cursor.take().unwrap_or((0, None));
        let Some(&partition) = partitions.get(partition_index) else {
            return Ok(true);
        };
        let (plan, labelled) = (&self.plan, &mut self.labelled);
        let next = self
            .store
            .scan_partition(partition, from.as_deref(), limit, |key, state| {
                if !state.deleted {
                    Self::member_updates(
                        plan,
                        labelled,
                        (partition, key),
                        None,
                        (&state, &Self::segments_of(plan, &state)),
                        time,
                        out,
                    );
                }
            })?;
        let partition_done = next.is_none();
        self.rebuild_cursor = Some(match next {
            Some(key) => (partition_index, Some(key)),
            None => (partition_index + 1, None),
        });
        Ok(partition_done && partition_index + 1 == partitions.len())
    }

    /// Current states (as of the last processed event) of many listings, for
    /// market re-evaluations, each with whether it was taken out of the
    /// changes since the last checkpoint. Those are moved, not copied (a
    /// copy of each was 4% of the full pipeline's time); the caller hands
    /// each one back, through `record_market_evaluation` or `restore`, before
    /// anything else reads this stage.
    /// The evaluator has entered its epoch first (`enter_epoch`), so that
    /// the decisions recorded on these states stay out of an earlier
    /// checkpoint.
    pub fn take_current(&mut self, keys: &[Vec<u8>]) -> Result<Vec<CurrentState>, StateError> {
        // one lookup per key in memory; the rest in one RocksDB multi-get
        let mut current: Vec<CurrentState> = Vec::with_capacity(keys.len());
        let mut missing: Vec<usize> = Vec::new();
        for (index, key) in keys.iter().enumerate() {
            if let Some(state) = self.dirty.remove(key.as_slice()) {
                current.push((Some(state), true));
            } else if let Some(state) =
                held_for_checkpoint(self.sealed.as_deref(), self.writing.as_ref(), key)
            {
                current.push((Some(Arc::clone(state)), false));
            } else {
                missing.push(index);
                current.push((None, false));
            }
        }
        let wanted: Vec<&[u8]> = missing
            .iter()
            .map(|index| keys[*index].as_slice())
            .collect();
        for (index, state) in missing.into_iter().zip(self.store.get_many(&wanted)?) {
            current[index].0 = state.map(Arc::new);
        }
        Ok(current)
    }

    /// Puts back a state `take_current` took out of the changes, unchanged.
    pub fn restore(&mut self, key: Vec<u8>, state: Arc<ListingState>) {
        self.dirty.insert(key, state);
    }

    /// Records what the evaluator decided for a listing with an event of its
    /// own in the epoch: the gate's memory, the market view and, when given,
    /// the model outputs with their stamp. The stage holds that listing's
    /// state unwritten (it applied the event); only those parts change.
    pub fn record_own_evaluation(
        &mut self,
        key: &[u8],
        emitted_hash: u64,
        revision: u32,
        market: Vec<f64>,
        scores: Option<(u64, &[f32])>,
    ) {
        // looked up by slice: an owned key per lookup was an allocation per document
        if let Some(entry) = self.dirty.get_mut(key) {
            record_on(Arc::make_mut(entry), emitted_hash, revision, market, scores);
        }
    }

    /// Records a market re-evaluation's decision on the state `take_current`
    /// gave for it, and holds that state unwritten under its (owned) key: one
    /// hash of the key and no copy of it. Should the stage hold a state for
    /// the key already, that one is kept and recorded on.
    pub fn record_market_evaluation(
        &mut self,
        key: Vec<u8>,
        base: Arc<ListingState>,
        emitted_hash: u64,
        revision: u32,
        market: Vec<f64>,
        scores: Option<(u64, &[f32])>,
    ) {
        let entry = self.dirty.entry(key).or_insert(base);
        record_on(Arc::make_mut(entry), emitted_hash, revision, market, scores);
    }

    pub fn process(
        &mut self,
        events: Vec<ChangeEvent>,
        time: u64,
        out: &mut StateOutputs,
    ) -> Result<(), StateError> {
        self.enter_epoch(time);
        let keys: Vec<Vec<u8>> = events
            .iter()
            .map(|e| Store::state_key(e.position.partition, &e.key))
            .collect();
        // borrowed from `keys`: a copy of each key per map was an allocation
        // per event twice over
        let mut wanted: Vec<&[u8]> = keys
            .iter()
            .map(Vec::as_slice)
            .filter(|k| self.held(k).is_none())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut fetched: FxHashMap<&[u8], ListingState> =
            FxHashMap::with_capacity_and_hasher(wanted.len(), Default::default());
        for (key, state) in wanted.iter().zip(self.store.get_many(&wanted)?) {
            if let Some(state) = state {
                fetched.insert(key, state);
            }
        }
        for (mut event, key) in events.into_iter().zip(&keys) {
            let key = key.as_slice();
            // borrows only the maps: `self.labelled` is borrowed mutably below
            let current = held_in(
                &self.dirty,
                self.sealed.as_deref(),
                self.writing.as_ref(),
                key,
            )
            .map(|state| &**state)
            .or_else(|| fetched.get(key));
            if let Some(current) = current {
                if event.version == current.version {
                    self.counts.duplicates += 1;
                    continue;
                }
                if event.version < current.version {
                    self.counts.stale += 1;
                    continue;
                }
            }
            let live = current.filter(|c| !c.deleted);
            let kind = &self.plan.kinds[event.kind];
            let next = match kind.action {
                KindAction::Delete => ListingState {
                    version: event.version,
                    deleted: true,
                    first_seen: live.map(|c| c.first_seen).unwrap_or(event.event_time),
                    last_event_time: event.event_time,
                    initial_price: None,
                    price_change_count: 0,
                    last_price_change: None,
                    fields: Vec::new(),
                    market: Vec::new(),
                    emitted_hash: 0,
                    revision: 0,
                    scores: smallvec::SmallVec::new(),
                    scores_stamp: 0,
                },
                KindAction::Upsert => match live {
                    Some(current) => merge(&self.plan, current, &mut event, kind.complete),
                    None if kind.complete => create(&self.plan, &mut event),
                    None => {
                        let detail = format!(
                            "kind `{}` for listing `{}`, which has no live state (never created, or removed)",
                            kind.name, event.key
                        );
                        out.dead.push(DeadLetter {
                            bytes: event.bytes,
                            position: event.position,
                            reason: "unknown_listing".into(),
                            detail,
                            stage: STAGE.into(),
                            read_at_nanos: event.read_at_nanos,
                        });
                        continue;
                    }
                },
            };
            let mut segments = SmallVec::new();
            if !self.plan.aggregates.is_empty() {
                segments = Self::segments_of(&self.plan, &next);
                Self::member_updates(
                    &self.plan,
                    &mut self.labelled,
                    (event.position.partition, &event.key),
                    current,
                    (&next, &segments),
                    time,
                    out,
                );
            }
            let next = Arc::new(next);
            out.events.push(Enriched {
                key: event.key,
                version: event.version,
                event_time: event.event_time,
                deleted: next.deleted,
                state: Arc::clone(&next),
                features: Vec::new(),
                market: Vec::new(),
                segments,
                position: event.position,
                read_at_nanos: event.read_at_nanos,
                cause: Cause::Event,
            });
            match self.dirty.get_mut(key) {
                Some(held) => *held = next,
                None => {
                    self.dirty.insert(key.to_vec(), next);
                }
            }
        }
        Ok(())
    }

    /// Listings changed since the last checkpoint (held in memory until it).
    pub fn dirty_listings(&self) -> usize {
        self.dirty.len()
    }

    /// The freshest state this stage holds in memory: changed since the last
    /// seal, sealed for the next checkpoint, or in the checkpoint being written.
    fn held(&self, key: &[u8]) -> Option<&Arc<ListingState>> {
        held_in(
            &self.dirty,
            self.sealed.as_deref(),
            self.writing.as_ref(),
            key,
        )
    }

    /// The next checkpoint covers the epochs through `epoch`: the changes are
    /// sealed before anything of a later epoch reaches this stage, whichever
    /// operator brings it. The state stage applies epoch e only once the
    /// evaluator is done with e - 1, and the evaluator goes in epoch order,
    /// so at that moment every decision through `epoch` has been recorded
    /// and nothing later has.
    ///
    /// Both doors matter. A worker whose partitions had no event in an
    /// epoch past the checkpoint's still re-evaluates its listings there
    /// when another worker's events move their segments; sealed only by the
    /// state stage, those decisions went into the earlier checkpoint, whose
    /// positions replay the events that caused them. After a crash the
    /// replay found each neighbour's stored view already moved, evaluated
    /// nothing, and a document that was never delivered stayed lost.
    pub fn seal_after(&mut self, epoch: u64) {
        self.seal_after = Some(epoch);
    }

    /// Seals the changes when `time` is past the pending checkpoint's epoch;
    /// the evaluator calls it before it touches anything of an epoch (the
    /// queue of waiting re-evaluations included, which the seal snapshots).
    pub fn enter_epoch(&mut self, time: u64) {
        if self.seal_after.is_some_and(|through| time > through) {
            self.seal();
        }
    }

    /// Sets the changes so far aside as the next checkpoint's (see `sealed`).
    /// A second call before `begin_checkpoint` keeps the first seal.
    fn seal(&mut self) {
        self.seal_after = None;
        if self.sealed.is_some() {
            return;
        }
        // sized like the last interval's: growing from empty rehashed it
        // over and over in every interval
        let capacity = self.dirty.len();
        self.sealed = Some(Arc::new(std::mem::replace(
            &mut self.dirty,
            FxHashMap::with_capacity_and_hasher(capacity, Default::default()),
        )));
        // the listings still waiting for their re-evaluation: their states
        // and documents do not show their moves yet (deferred_evaluations.rs)
        if let Some(partitions) = &self.deferred_partitions {
            self.sealed_deferred = self.deferred.encode(partitions);
        }
    }

    /// Starts writing the sealed changes (or, without a seal, every change
    /// since the last checkpoint) with the positions, in one batch, on a
    /// thread of its own. A checkpoint still being written is finished first
    /// (at most one is in flight); its positions are returned then, as by
    /// `finished_checkpoint`.
    pub fn begin_checkpoint(
        &mut self,
        binding: &str,
        positions: Vec<(u32, CheckpointedPosition)>,
    ) -> Result<Option<Vec<(u32, CheckpointedPosition)>>, StateError> {
        let previous = self.wait_checkpoint()?;
        // unless something later sealed them already, nothing past the
        // checkpoint's epoch has reached the stage: these are its changes
        self.seal();
        let states = self.sealed.take().expect("sealed just now or before");
        let deferred = std::mem::take(&mut self.sealed_deferred);
        let (store, binding, written_states, written_positions) = (
            self.store.clone(),
            binding.to_string(),
            states.clone(),
            positions.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("assay:checkpoint".to_string())
            .spawn(move || {
                // in key order: RocksDB's memtable then inserts each key next to
                // the last one instead of searching its skip list from the top
                // (the search was two thirds of this thread's time)
                let mut changes: Vec<(&[u8], Option<&ListingState>)> = written_states
                    .iter()
                    .map(|(k, v)| (k.as_slice(), Some(&**v)))
                    .collect();
                changes.sort_unstable_by_key(|(key, _)| *key);
                store.checkpoint(changes.into_iter(), &binding, &written_positions, &deferred)
            })
            .map_err(|e| StateError::Io(e.to_string()))?;
        self.writing = Some(CheckpointWrite {
            states,
            positions,
            thread,
        });
        Ok(previous)
    }

    /// The positions of the checkpoint being written, once the write is done
    /// (durable: a restart resumes there); `None` while it is still writing or
    /// when none is.
    pub fn finished_checkpoint(
        &mut self,
    ) -> Result<Option<Vec<(u32, CheckpointedPosition)>>, StateError> {
        match &self.writing {
            Some(write) if write.thread.is_finished() => self.wait_checkpoint(),
            _ => Ok(None),
        }
    }

    /// Waits for the checkpoint being written, if any, and returns its positions.
    pub fn wait_checkpoint(
        &mut self,
    ) -> Result<Option<Vec<(u32, CheckpointedPosition)>>, StateError> {
        let Some(write) = self.writing.take() else {
            return Ok(None);
        };
        write
            .thread
            .join()
            .map_err(|_| StateError::Io("the checkpoint writer panicked".to_string()))??;
        // The written states hold the last references to most of them, and
        // they are cold by now (a checkpoint interval old): freed here, on
        // the worker, they were 7% of the core topology's last-level cache
        // misses (callgrind's cache model, 1M stream, 1 worker) and evicted
        // what the worker was using. A thread of their own frees them (if it
        // cannot start, the closure is dropped here and frees them itself).
        let states = write.states;
        let _ = std::thread::Builder::new()
            .name("assay:checkpoint-free".to_string())
            .spawn(move || drop(states));
        Ok(Some(write.positions))
    }
}

/// The evaluator's decision on a held state: the gate's memory, the market
/// view and, when given, the model outputs with their stamp (a removed
/// listing keeps its tombstone state as it is).
fn record_on(
    entry: &mut ListingState,
    emitted_hash: u64,
    revision: u32,
    market: Vec<f64>,
    scores: Option<(u64, &[f32])>,
) {
    if entry.deleted {
        return;
    }
    entry.emitted_hash = emitted_hash;
    entry.revision = revision;
    entry.market = market;
    if let Some((stamp, scores)) = scores {
        entry.scores_stamp = stamp;
        entry.scores.clear();
        entry.scores.extend_from_slice(scores);
    }
}

/// `ListingStateStage::held` over the stage's maps alone, so that a caller
/// can hold other fields of the stage mutably meanwhile.
fn held_in<'a>(
    dirty: &'a StateMap,
    sealed: Option<&'a StateMap>,
    writing: Option<&'a CheckpointWrite>,
    key: &[u8],
) -> Option<&'a Arc<ListingState>> {
    dirty
        .get(key)
        .or_else(|| held_for_checkpoint(sealed, writing, key))
}

/// A state set aside for a checkpoint: sealed, or in the batch being written.
fn held_for_checkpoint<'a>(
    sealed: Option<&'a StateMap>,
    writing: Option<&'a CheckpointWrite>,
    key: &[u8],
) -> Option<&'a Arc<ListingState>> {
    sealed
        .and_then(|s| s.get(key))
        .or_else(|| writing.and_then(|w| w.states.get(key)))
}

fn price_of(plan: &Plan, fields: &[Option<Value>]) -> Option<f64> {
    plan.price_field
        .and_then(|i| fields[i].as_ref())
        .and_then(Value::as_f64)
}

/// Takes the event's fields (it is not read again, apart from its bytes for a
/// dead letter): a state is cloned once more to go downstream, not twice.
fn create(plan: &Plan, event: &mut ChangeEvent) -> ListingState {
    ListingState {
        version: event.version,
        deleted: false,
        first_seen: event.event_time,
        last_event_time: event.event_time,
        initial_price: price_of(plan, &event.fields),
        price_change_count: 0,
        last_price_change: None,
        fields: std::mem::take(&mut event.fields),
        market: Vec::new(),
        emitted_hash: 0,
        revision: 0,
        scores: smallvec::SmallVec::new(),
        scores_stamp: 0,
    }
}

/// Takes the event's fields, like `create`. A complete record replaces the
/// fields whole, so the current ones are not copied first.
fn merge(
    plan: &Plan,
    current: &ListingState,
    event: &mut ChangeEvent,
    complete: bool,
) -> ListingState {
    let fields = if complete {
        // a complete record is the whole listing: absent fields are cleared
        std::mem::take(&mut event.fields)
    } else {
        let mut fields = current.fields.clone();
        for (slot, value) in fields.iter_mut().zip(&mut event.fields) {
            if value.is_some() {
                *slot = value.take();
            }
        }
        fields
    };
    let mut next = ListingState {
        version: event.version,
        deleted: current.deleted,
        first_seen: current.first_seen,
        last_event_time: event.event_time,
        initial_price: current.initial_price,
        price_change_count: current.price_change_count,
        last_price_change: current.last_price_change,
        fields,
        market: current.market.clone(),
        emitted_hash: current.emitted_hash,
        revision: current.revision,
        // (SmallVec's clone copies a value at a time)
        scores: SmallVec::from_slice(&current.scores),
        scores_stamp: current.scores_stamp,
    };
    let old_price = price_of(plan, &current.fields);
    let new_price = price_of(plan, &next.fields);
    if old_price.is_some() && new_price.is_some() && old_price != new_price {
        next.price_change_count += 1;
        next.last_price_change = Some(event.event_time);
    }
    if next.initial_price.is_none() {
        next.initial_price = new_price;
    }
    next
}

/// The topology's features for a listing at an event, in declaration order.
/// `market` is the listing's flattened statistics (NaN: none).
pub fn compute_features(
    plan: &Plan,
    state: &ListingState,
    event_time: i64,
    market: &[f64],
) -> Vec<Option<f64>> {
    // a function, not a closure, so that it inlines (1.4 million calls
    // per 200k events as a closure)
    #[inline(always)]
    fn lookup(
        plan: &Plan,
        state: &ListingState,
        market: &[f64],
        r: ValueRef,
        values: &[Option<f64>],
    ) -> Option<f64> {
        match r {
            ValueRef::Field(i) => state.fields[i].as_ref().and_then(Value::as_f64),
            ValueRef::Feature(i) => values.get(i).copied().flatten(),
            ValueRef::Lookup(i) => {
                market::lookup_value(plan, i, &state.fields, &mut false).and_then(Value::as_f64)
            }
            ValueRef::Statistic {
                aggregate,
                statistic,
            } => market
                .get(plan.statistic_offset(aggregate, statistic))
                .copied()
                .filter(|x| !x.is_nan()),
            _ => None, // later stages; compile forbids it
        }
    }
    let mut values: Vec<Option<f64>> = Vec::with_capacity(plan.features.len());
    for feature in &plan.features {
        let value = match &feature.function {
            Function::DaysOnMarket => Some(features::days_on_market(state.first_seen, event_time)),
            Function::PriceChangeCount => Some(state.price_change_count as f64),
            Function::PriceDropPercent => {
                features::price_drop_percent(state.initial_price, price_of(plan, &state.fields))
            }
            Function::DaysSincePriceChange => Some(features::days_since_price_change(
                state.first_seen,
                state.last_price_change,
                event_time,
            )),
            Function::YearsSince { field } => {
                features::years_since(lookup(plan, state, market, *field, &values), event_time)
            }
            Function::Ratio {
                numerator,
                denominator,
                min_denominator,
            } => features::ratio(
                lookup(plan, state, market, *numerator, &values),
                lookup(plan, state, market, *denominator, &values),
                *min_denominator,
            ),
        };
        values.push(value);
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataflow::decode;
    use crate::record::RawRecord;
    use crate::state::StoreTuning;
    use std::path::Path;

    fn stage(dir: &Path) -> ListingStateStage {
        let topology = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/listings.toml");
        let plan = crate::topology::load(&topology).expect("the shipped topology is valid");
        let tuning = StoreTuning {
            block_cache_bytes: 1 << 20,
            write_buffer_bytes: 1 << 20,
        };
        let store = Store::open(dir, &plan.field_fingerprint(), tuning).unwrap();
        ListingStateStage::new(Arc::new(plan), store)
    }

    fn event(plan: &Plan, line: &str) -> ChangeEvent {
        let raw = RawRecord {
            bytes: line.as_bytes().to_vec(),
            position: SourcePosition {
                partition: 0,
                offset: 0,
                byte_offset: 0,
                timestamp_ms: 0,
            },
            read_at_nanos: 0,
        };
        decode::decode(plan, &decode::Slots::new(plan), 1 << 20, raw).expect("a valid event")
    }

    /// A listing created by an event of `epoch` (as the state stage
    /// applies it): its state key, and the rows the stage sent on.
    fn created(stage: &mut ListingStateStage, listing: &str, epoch: u64) -> (Vec<u8>, usize) {
        let plan = stage.plan.clone();
        let line = format!(
            r#"{{"kind":"create","listing_id":"{listing}","version":1,"event_time":1640995618,"price":25990,"model":"e-class","year":2017,"state":"ca"}}"#
        );
        let mut out = StateOutputs::default();
        stage
            .process(vec![event(&plan, &line)], epoch, &mut out)
            .unwrap();
        (Store::state_key(0, listing), out.events.len())
    }

    /// The state the stage holds for `key`, taken as a market
    /// re-evaluation takes it.
    fn taken(stage: &mut ListingStateStage, key: &[u8]) -> Arc<ListingState> {
        let mut current = stage.take_current(&[key.to_vec()]).unwrap();
        let (Some(state), _) = current.remove(0) else {
            panic!("the listing is held")
        };
        state
    }

    fn stored(stage: &ListingStateStage, key: &[u8]) -> ListingState {
        let mut states = stage.store.get_many(&[key]).unwrap();
        states.remove(0).expect("the listing is stored")
    }

    /// A checkpoint through epoch 5 holds the state as of epoch 5, even when
    /// the evaluator re-evaluates the listing in epoch 6 (its segment moved
    /// by another worker's event) before the checkpoint is written, and no
    /// event of epoch 6 reached this worker's state stage. The checkpoint's
    /// positions replay epoch 6's events after a crash; had it held epoch
    /// 6's decision, the replay would find the listing's stored view already
    /// moved and never deliver its document again.
    #[test]
    fn a_decision_of_an_epoch_past_the_checkpoints_is_left_to_the_next_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut stage = stage(dir.path());
        let (key, rows) = created(&mut stage, "cl-1", 5);
        assert_eq!(rows, 1);
        // the evaluator's decision on the event of epoch 5
        stage.record_own_evaluation(&key, 11, 0, vec![1.0], None);
        stage.seal_after(5);

        // epoch 6: a market re-evaluation, on the state the stage holds (the
        // evaluator enters the epoch before it takes anything)
        stage.enter_epoch(6);
        let state = taken(&mut stage, &key);
        assert_eq!(state.emitted_hash, 11);
        stage.record_market_evaluation(key.clone(), state, 22, 1, vec![2.0], None);

        stage
            .begin_checkpoint("listing_changes", Vec::new())
            .unwrap();
        stage.wait_checkpoint().unwrap();
        let checkpointed = stored(&stage, &key);
        assert_eq!(
            (checkpointed.emitted_hash, checkpointed.market.as_slice()),
            (11, &[1.0][..]),
            "the checkpoint through epoch 5 holds epoch 5's decision"
        );
        // the decision of epoch 6 is still held, for the next checkpoint
        stage.enter_epoch(7);
        let held = taken(&mut stage, &key);
        assert_eq!(held.emitted_hash, 22);
        stage.restore(key.clone(), held);
        stage
            .begin_checkpoint("listing_changes", Vec::new())
            .unwrap();
        stage.wait_checkpoint().unwrap();
        assert_eq!(stored(&stage, &key).emitted_hash, 22);
    }

    /// The listings waiting for their re-evaluation are stored with a
    /// checkpoint as the queue stood at the end of its epoch: one that
    /// waited then is put back by a restart, even if a later epoch took it
    /// out before the checkpoint was written, and one that a later epoch
    /// queued is not (the replay of that epoch queues it again).
    #[test]
    fn a_checkpoint_stores_the_waiting_listings_of_its_epoch_and_a_restart_puts_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let named: crate::dataflow::deferred_evaluations::NamedSegments =
            [Some(7)].into_iter().collect();
        {
            let mut stage = stage(dir.path());
            stage
                .load_deferred("listing_changes", &[0, 1], true)
                .unwrap();
            // waiting at the end of epoch 5
            stage.deferred.push(0, "cl-1", &named);
            stage.seal_after(5);
            // the evaluator at epoch 6: takes cl-1, queues cl-2
            stage.enter_epoch(6);
            let arrived_by = stage.deferred.arrivals();
            stage.deferred.push(1, "cl-2", &named);
            let taken = stage.deferred.take(1, arrived_by);
            assert_eq!(taken.len(), 2, "one of each partition");
            stage.deferred.push(1, "cl-2", &named);
            stage
                .begin_checkpoint("listing_changes", Vec::new())
                .unwrap();
            stage.wait_checkpoint().unwrap();
        }
        // a restart on the same state
        let mut restarted = stage(dir.path());
        restarted
            .load_deferred("listing_changes", &[0, 1], true)
            .unwrap();
        assert!(restarted.deferred.contains(0, "cl-1"));
        assert!(!restarted.deferred.contains(1, "cl-2"));
        assert_eq!(restarted.deferred.len(), 1);
    }

    /// Without an epoch past it, the checkpoint takes every change (its own
    /// epoch's decisions included).
    #[test]
    fn a_checkpoint_with_nothing_later_takes_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut stage = stage(dir.path());
        let (key, _) = created(&mut stage, "cl-2", 5);
        stage.seal_after(5);
        // a market re-evaluation within the checkpoint's epoch
        stage.enter_epoch(5);
        let state = taken(&mut stage, &key);
        stage.record_market_evaluation(key.clone(), state, 33, 1, vec![3.0], None);
        stage
            .begin_checkpoint("listing_changes", Vec::new())
            .unwrap();
        stage.wait_checkpoint().unwrap();
        assert_eq!(stored(&stage, &key).emitted_hash, 33);
    }
}
