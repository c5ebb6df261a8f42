//! Per-listing state: the version gate, merging changes, state features.
//!
//! # Lifecycle
//! - `process`: one message of events, in order. Reads the listings it has not
//!   seen since the last checkpoint with one `multi_get`, then applies each
//!   event against the freshest state (dirty map first, then the store).
//! - `checkpoint`: the worker loop calls it when every epoch it has sent is
//!   complete; dirty states and source positions go to RocksDB in one batch.
//!
//! # Version gate
//! An event whose version is not above the listing's stored version is
//! dropped: equal is a duplicate, lower is stale. A removed listing keeps a
//! tombstone state holding its last version, so a late event cannot bring it
//! back.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::dataflow::decode::ChangeEvent;
use crate::features;
use crate::record::{DeadLetter, SourcePosition, Value};
use crate::state::{CheckpointedPosition, ListingState, StateError, Store};
use crate::topology::{Function, KindAction, Plan, ValueRef};

pub const STAGE: &str = "state";

/// A change that passed the gate, with its listing's merged fields and features.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enriched {
    pub key: String,
    pub version: u64,
    pub event_time: i64,
    pub deleted: bool,
    pub fields: Vec<Option<Value>>,
    pub features: Vec<Option<f64>>,
    pub position: SourcePosition,
    pub read_at_nanos: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct GateCounts {
    pub stale: u64,
    pub duplicates: u64,
}

pub struct ListingStateStage {
    plan: Arc<Plan>,
    store: Store,
    dirty: HashMap<Vec<u8>, ListingState>,
    pub counts: GateCounts,
}

impl ListingStateStage {
    pub fn new(plan: Arc<Plan>, store: Store) -> Self {
        ListingStateStage { plan, store, dirty: HashMap::new(), counts: GateCounts::default() }
    }

    pub fn process(&mut self, events: Vec<ChangeEvent>) -> Result<Vec<Result<Enriched, DeadLetter>>, StateError> {
        let keys: Vec<Vec<u8>> = events.iter().map(|e| Store::state_key(e.position.partition, &e.key)).collect();
        let mut wanted: Vec<Vec<u8>> = keys.iter().filter(|k| !self.dirty.contains_key(*k)).cloned().collect();
        wanted.sort();
        wanted.dedup();
        let mut fetched: HashMap<Vec<u8>, ListingState> = HashMap::with_capacity(wanted.len());
        for (key, state) in wanted.iter().zip(self.store.get_many(&wanted)?) {
            if let Some(state) = state {
                fetched.insert(key.clone(), state);
            }
        }
        let mut out = Vec::with_capacity(events.len());
        for (event, key) in events.into_iter().zip(keys) {
            let current = self.dirty.get(&key).or_else(|| fetched.get(&key));
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
                },
                KindAction::Upsert => match live {
                    Some(current) => merge(&self.plan, current, &event, kind.complete),
                    None if kind.complete => create(&self.plan, &event),
                    None => {
                        let detail = format!("kind `{}` for listing `{}`, which has no live state (never created, or removed)", kind.name, event.key);
                        out.push(Err(DeadLetter {
                            bytes: event.bytes,
                            position: event.position,
                            reason: "unknown_listing".into(),
                            detail,
                            stage: STAGE.into(),
                            read_at_nanos: event.read_at_nanos,
                        }));
                        continue;
                    }
                },
            };
            let features = if next.deleted { Vec::new() } else { compute_features(&self.plan, &next, event.event_time) };
            out.push(Ok(Enriched {
                key: event.key,
                version: event.version,
                event_time: event.event_time,
                deleted: next.deleted,
                fields: next.fields.clone(),
                features,
                position: event.position,
                read_at_nanos: event.read_at_nanos,
            }));
            self.dirty.insert(key, next);
        }
        Ok(out)
    }

    /// Writes every change since the last checkpoint with the positions, in one batch.
    pub fn checkpoint(&mut self, binding: &str, positions: &[(u32, CheckpointedPosition)]) -> Result<usize, StateError> {
        let written = self.store.checkpoint(self.dirty.iter().map(|(k, v)| (k.as_slice(), Some(v))), binding, positions)?;
        self.dirty.clear();
        Ok(written)
    }
}

fn price_of(plan: &Plan, fields: &[Option<Value>]) -> Option<f64> {
    plan.price_field.and_then(|i| fields[i].as_ref()).and_then(Value::as_f64)
}

fn create(plan: &Plan, event: &ChangeEvent) -> ListingState {
    ListingState {
        version: event.version,
        deleted: false,
        first_seen: event.event_time,
        last_event_time: event.event_time,
        initial_price: price_of(plan, &event.fields),
        price_change_count: 0,
        last_price_change: None,
        fields: event.fields.clone(),
    }
}

fn merge(plan: &Plan, current: &ListingState, event: &ChangeEvent, complete: bool) -> ListingState {
    let mut next = current.clone();
    next.version = event.version;
    next.last_event_time = event.event_time;
    let old_price = price_of(plan, &current.fields);
    if complete {
        // a complete record is the whole listing: absent fields are cleared
        next.fields = event.fields.clone();
    } else {
        for (slot, value) in next.fields.iter_mut().zip(&event.fields) {
            if value.is_some() {
                *slot = value.clone();
            }
        }
    }
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
pub fn compute_features(plan: &Plan, state: &ListingState, event_time: i64) -> Vec<Option<f64>> {
    let mut values: Vec<Option<f64>> = Vec::with_capacity(plan.features.len());
    for feature in &plan.features {
        let lookup = |r: ValueRef, values: &[Option<f64>]| -> Option<f64> {
            match r {
                ValueRef::Field(i) => state.fields[i].as_ref().and_then(Value::as_f64),
                ValueRef::Feature(i) => values.get(i).copied().flatten(),
                _ => None, // later stages; compile forbids it
            }
        };
        let value = match &feature.function {
            Function::DaysOnMarket => Some(features::days_on_market(state.first_seen, event_time)),
            Function::PriceChangeCount => Some(state.price_change_count as f64),
            Function::PriceDropPercent => features::price_drop_percent(state.initial_price, price_of(plan, &state.fields)),
            Function::DaysSincePriceChange => Some(features::days_since_price_change(state.first_seen, state.last_price_change, event_time)),
            Function::YearsSince { field } => features::years_since(lookup(*field, &values), event_time),
            Function::Ratio { numerator, denominator, min_denominator } => {
                features::ratio(lookup(*numerator, &values), lookup(*denominator, &values), *min_denominator)
            }
        };
        values.push(value);
    }
    values
}
