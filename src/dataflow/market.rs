//! Market aggregates: statistics of live listings per segment, kept exact and
//! incremental with differential dataflow.
//!
//! ```text
//! listing_state ──(+member/-member per aggregate)──┬──► segment statistics (exact) ──► changelog
//!                                                   │            │ as seen: rounded, banded, blanked
//!                                                   │            ├──► bucket views ◄── members' buckets
//!                    arrange by (segment, bucket) ◄─┘            │         │
//!                                  └──────────── join ◄──────────┼─────────┘
//!                                                 │              │ broadcast to every worker
//!                              (listing, signature) ± to the owner              ▼
//!                                                                evaluate (looks the statistics up by segment)
//! ```
//!
//! # Members
//! A listing is a member of at most one segment per aggregate. Its member
//! value carries its measures, the values its projection needs (see below;
//! one that is also a measure, the price, once), its partition and its id. A
//! price change retracts the old member and inserts the new; a removal only
//! retracts. The arrangement keeps a batch's members back to back in one
//! buffer (`member_arrangement.rs`).
//!
//! # Statistics as documents see them
//! Documents see the statistics rounded to the aggregate's significant
//! digits; statistics the topology does not read are blanked (NaN), and one
//! that only bands read is replaced by its band's stand-in. The join and the
//! evaluators are fed that collection, so a change below that precision (a
//! cent on a median) reaches no neighbour at all. The statistics changelog
//! still carries every statistic, exact. Every worker's evaluator keeps the
//! seen statistics of every segment (a few thousand segments, not millions of
//! listings), so a listing's market view is a lookup by its segments.
//!
//! # Which members are re-evaluated
//! When a segment's seen statistics move, the join visits each member twice:
//! with the old statistics (retracted) and the new (inserted). It computes a
//! member's *signature*: a hash of the output fields those statistics decide,
//! rounded and banded (`topology::MarketProjection`), from the values the
//! member carries. Equal halves cancel in the join's output builder
//! (`signature_builder.rs`) when they come in a row, as they nearly always
//! do; the evaluator nets whatever is left. A member is re-evaluated only
//! when they differ. A median move in a segment of 100,000 listings changes
//! the price position of the few priced near a band's edge, not all of them.
//! Without a projection (a model reads the statistics, say) the signature is
//! the statistics themselves: every member is re-evaluated.
//!
//! # Buckets
//! Visiting every member of a moved segment only to find that few changed is
//! itself the cost at scale, so members are arranged by (segment, bucket):
//! 32 log-spaced buckets per octave of the one value a projection carries
//! (`member_bucket`). The join is fed one view of the statistics per
//! populated bucket (`bucket_views.rs`), and a view moves only when
//! `bucket_unaffected` cannot prove that the bucket's members keep their
//! signatures. Members that cannot be bucketed share bucket 0, which is
//! always re-visited.
//!
//! # Segment ids
//! A segment is identified by a 64-bit id: the aggregate's index in the top
//! byte, a FNV-1a hash of the group-by values below. Arrangements hold the id,
//! not the text (memory); the text travels once per segment per worker as a
//! label, for the statistics output.

use smallvec::SmallVec;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::operators::arrange::TraceAgent;
use differential_dataflow::trace::TraceReader;
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::{AsCollection, VecCollection};
use timely::dataflow::StreamVec;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::operators::{Concat, Exchange};

use crate::dataflow::member_arrangement::{MemberBatcher, MemberRef, MemberSpine};
use crate::dataflow::signature_builder::SignatureBuilder;
use crate::dataflow::{bucket_views, segment_statistics};
use crate::features;
use crate::hash::{FNV_OFFSET, fnv1a_extend as fnv};
use crate::record::Value;
use crate::topology::{Aggregate, Function, MarketProjection, OutputField, Plan, ValueRef};

/// A member of a segment on its way to the arrangement: see `encode_member`.
/// Inline up to 48 bytes (about 20 in the listings topology; listing ids up
/// to about 35 bytes still fit):
/// the batcher sorts and copies members, and a boxed member made each copy a
/// malloc and each drop a free. The arrangement itself stores bytes
/// (`member_arrangement::MemberBytes`).
///
/// A newtype for its `Clone`: SmallVec clones through an iterator, a byte
/// at a time, and timely clones every member update once, since the members
/// stream has two readers (the statistics and the arrangement). That clone
/// was 1% of the full pipeline's instructions; `from_slice` copies at once.
#[derive(
    Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Member(SmallVec<[u8; 48]>);

impl Member {
    pub fn new() -> Self {
        Member(SmallVec::new())
    }

    pub fn from_slice(bytes: &[u8]) -> Self {
        Member(SmallVec::from_slice(bytes))
    }
}

impl Clone for Member {
    fn clone(&self) -> Self {
        Member::from_slice(&self.0)
    }

    fn clone_from(&mut self, source: &Self) {
        self.0.clear();
        self.0.extend_from_slice(&source.0);
    }
}

impl std::ops::Deref for Member {
    type Target = SmallVec<[u8; 48]>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Member {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// Statistics as the bits of f64s (NaN: no value), so they are `Ord`.
pub type StatisticBits = Vec<u64>;
/// A differential update of the member collection.
pub type MemberUpdate = ((u64, Member), u64, isize);

/// What the join tells a listing's owner: the signature of what one
/// aggregate's statistics decide in the listing's document (see
/// "Which members are re-evaluated").
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct MarketUpdate {
    pub partition: u32,
    /// Inline up to 23 bytes: the join makes one of these for each half of
    /// a visited member's pair that does not cancel (`signature_builder.rs`).
    pub key: smol_str::SmolStr,
    pub aggregate: u8,
    /// The member's segment in that aggregate: a market re-evaluation's
    /// listing has not moved since its last event, so this is its segment
    /// still, and the evaluator need not hash its group-by values again.
    pub segment: u64,
    pub signature: u64,
}

/// What reaches the evaluator from the market: members' signatures (sent to
/// the listing's owner) and the statistics as documents see them (sent to
/// every worker: a listing's owner looks its segments' statistics up).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum MarketInput {
    Member(MarketUpdate),
    Statistics(u64, StatisticBits),
}

/// The value a field or lookup has for a listing; `missed` when a lookup fell back to its default.
pub fn lookup_value<'a>(
    plan: &'a Plan,
    index: usize,
    fields: &'a [Option<Value>],
    missed: &mut bool,
) -> Option<&'a Value> {
    let lookup = &plan.lookups[index];
    let key = match lookup.key {
        ValueRef::Field(i) => fields[i].as_ref(),
        ValueRef::Lookup(i) => lookup_value(plan, i, fields, missed),
        _ => None,
    };
    let found = match key {
        Some(Value::Str(text)) => lookup.table.get(text.as_str()),
        Some(Value::Int(i)) => lookup.table.get(itoa::Buffer::new().format(*i)),
        Some(Value::Num(n)) => lookup.table.get(ryu::Buffer::new().format(*n)),
        None => None,
    };
    if found.is_none() {
        *missed = true;
    }
    found.or(lookup.default.as_ref())
}

fn group_value<'a>(
    plan: &'a Plan,
    reference: ValueRef,
    fields: &'a [Option<Value>],
) -> Option<&'a Value> {
    match reference {
        ValueRef::Field(i) => fields[i].as_ref(),
        ValueRef::Lookup(i) => lookup_value(plan, i, fields, &mut false),
        _ => None,
    }
}

fn bucketed(value: &Value, bucket: Option<f64>) -> Value {
    match (value, bucket) {
        (Value::Str(_), _) | (_, None) => value.clone(),
        (number, Some(width)) => {
            let x = number.as_f64().unwrap_or(f64::NAN);
            let b = (x / width).floor() * width;
            if b.fract() == 0.0 && b.abs() < 9e15 {
                Value::Int(b as i64)
            } else {
                Value::Num(b)
            }
        }
    }
}

/// The segment of a listing in an aggregate, or `None` when a group-by value is missing.
pub fn segment_of(plan: &Plan, aggregate_index: usize, fields: &[Option<Value>]) -> Option<u64> {
    let aggregate = &plan.aggregates[aggregate_index];
    let mut hash = fnv(FNV_OFFSET, &[aggregate_index as u8]);
    for (reference, bucket) in &aggregate.group_by {
        let value = group_value(plan, *reference, fields)?;
        // hashed from the borrowed text (a bucketed copy of the value cloned
        // the string once per listing per evaluation); numbers as `bucketed` gives
        hash = match (value, bucket) {
            (Value::Str(s), _) => fnv(fnv(hash, &[1]), s.as_bytes()),
            (number, bucket) => match bucketed(number, *bucket) {
                Value::Int(i) => fnv(fnv(hash, &[2]), &i.to_le_bytes()),
                Value::Num(n) => fnv(fnv(hash, &[3]), &n.to_bits().to_le_bytes()),
                Value::Str(_) => unreachable!("a number stays a number"),
            },
        };
        hash = fnv(hash, &[0xff]);
    }
    Some(((aggregate_index as u64) << 56) | (hash >> 8))
}

/// A listing's segment in every aggregate, in order (`None` where a
/// group-by value is missing). `fields` must be a live state's.
pub fn segments_of<'a>(
    plan: &'a Plan,
    fields: &'a [Option<Value>],
) -> impl Iterator<Item = Option<u64>> + 'a {
    (0..plan.aggregates.len()).map(move |aggregate_index| segment_of(plan, aggregate_index, fields))
}

/// The segment's group-by values as a JSON object, for people.
pub fn segment_label(
    plan: &Plan,
    aggregate_index: usize,
    fields: &[Option<Value>],
) -> Option<String> {
    let aggregate = &plan.aggregates[aggregate_index];
    let mut object = serde_json::Map::new();
    for (reference, bucket) in &aggregate.group_by {
        let value = bucketed(group_value(plan, *reference, fields)?, *bucket);
        let json = match value {
            Value::Str(s) => serde_json::Value::String(s.into()),
            Value::Int(i) => serde_json::Value::from(i),
            Value::Num(n) => serde_json::Value::from(n),
        };
        object.insert(crate::topology::name_of(plan, *reference), json);
    }
    Some(serde_json::Value::Object(object).to_string())
}

/// A field or lookup as a number, as features and shaping read it.
fn number_of(plan: &Plan, value: ValueRef, fields: &[Option<Value>]) -> Option<f64> {
    match value {
        ValueRef::Field(i) => fields[i].as_ref().and_then(Value::as_f64),
        ValueRef::Lookup(i) => lookup_value(plan, i, fields, &mut false).and_then(Value::as_f64),
        _ => None,
    }
}

/// The carried values a member stores after its measures, in slot order:
/// those that are not measures themselves (see `MarketProjection::slots`).
fn carried_beyond_measures(aggregate: &Aggregate) -> impl Iterator<Item = ValueRef> + '_ {
    let projection = aggregate.projection.as_ref();
    let carried = projection.map_or(&[][..], |p| &p.carried[..]);
    let slots = projection.map_or(&[][..], |p| &p.slots[..]);
    carried
        .iter()
        .zip(slots)
        .filter(|(_, slot)| **slot >= aggregate.measures.len())
        .map(|(value, _)| *value)
}

/// How many numbers a member of `aggregate` stores before its identity.
fn member_numbers(aggregate: &Aggregate) -> usize {
    aggregate.measures.len() + carried_beyond_measures(aggregate).count()
}

/// `[measures, then the projection's carried values that are not measures,
/// each a tagged number (`push_number`)][partition, LEB128][listing id]`.
/// No version: an edit that changes none of these leaves the arrangement
/// untouched. Compact because the members arrangement is the largest thing
/// the market holds: prices and distances are whole numbers of 3 or 4
/// bytes as varints, and partitions are small, so the listings topology's
/// member is about 20 bytes instead of 30 with fixed-width numbers.
pub fn encode_member(
    plan: &Plan,
    aggregate_index: usize,
    fields: &[Option<Value>],
    partition: u32,
    key: &str,
) -> Member {
    let aggregate = &plan.aggregates[aggregate_index];
    let mut bytes = Member::new();
    let measures = aggregate.measures.iter().map(|i| ValueRef::Field(*i));
    for value in measures.chain(carried_beyond_measures(aggregate)) {
        push_number(
            &mut bytes,
            number_of(plan, value, fields).unwrap_or(f64::NAN),
        );
    }
    push_varint(&mut bytes, partition as u64);
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

/// Tags of a member's numbers.
const NUMBER_ABSENT: u8 = 0;
/// A whole number of magnitude below 2^53 (exact as an f64), zigzag LEB128.
const NUMBER_WHOLE: u8 = 1;
/// Anything else but NaN: the f64's bits, 8 bytes little-endian.
const NUMBER_BITS: u8 = 2;

/// Appends `value` exactly: it reads back as the same f64 (NaN, absent, as NaN).
fn push_number(bytes: &mut Member, value: f64) {
    if value.is_nan() {
        bytes.push(NUMBER_ABSENT);
    } else if value.fract() == 0.0
        && value.abs() < 9_007_199_254_740_992.0
        && !(value == 0.0 && value.is_sign_negative())
    {
        bytes.push(NUMBER_WHOLE);
        let whole = value as i64;
        push_varint(bytes, ((whole << 1) ^ (whole >> 63)) as u64);
    } else {
        bytes.push(NUMBER_BITS);
        bytes.extend_from_slice(&value.to_bits().to_le_bytes());
    }
}

#[inline]
fn push_varint(bytes: &mut Member, mut value: u64) {
    while value >= 0x80 {
        bytes.push((value as u8) | 0x80);
        value >>= 7;
    }
    bytes.push(value as u8);
}

#[inline]
fn read_varint(member: &[u8], at: &mut usize) -> u64 {
    let mut value = 0u64;
    let mut shift = 0;
    loop {
        let byte = member[*at];
        *at += 1;
        value |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return value;
        }
        shift += 7;
    }
}

#[inline]
fn read_number(member: &[u8], at: &mut usize) -> f64 {
    let tag = member[*at];
    *at += 1;
    match tag {
        NUMBER_WHOLE => {
            let zigzag = read_varint(member, at);
            ((zigzag >> 1) as i64 ^ -((zigzag & 1) as i64)) as f64
        }
        NUMBER_BITS => {
            let bits = u64::from_le_bytes(member[*at..*at + 8].try_into().unwrap());
            *at += 8;
            f64::from_bits(bits)
        }
        _ => f64::NAN,
    }
}

/// Moves `at` past the number there without reading its value: the join
/// finds a member's identity behind its numbers for every pair it visits.
#[inline]
fn skip_number(member: &[u8], at: &mut usize) {
    let tag = member[*at];
    *at += 1;
    match tag {
        NUMBER_WHOLE => {
            while member[*at] >= 0x80 {
                *at += 1;
            }
            *at += 1;
        }
        NUMBER_BITS => *at += 8,
        _ => {}
    }
}

/// A member's number at `index` (measures first, then carried values that are not measures).
pub fn member_measure(member: &[u8], index: usize) -> f64 {
    let mut at = 0;
    for _ in 0..index {
        skip_number(member, &mut at);
    }
    read_number(member, &mut at)
}

/// (partition, listing id's bytes) of a member that stores `numbers` numbers
/// (`member_numbers`). The bytes are a `String`'s, so UTF-8; they are checked
/// only when a `MarketUpdate` is made of them (`SignatureBuilder::push_member`):
/// the second half of a pair that cancels (120k of the 712k halves the join
/// emits on the 200k harness) skips it; the check was 0.7% of a run.
pub fn member_identity(member: &[u8], numbers: usize) -> (u32, &[u8]) {
    let mut at = 0;
    for _ in 0..numbers {
        skip_number(member, &mut at);
    }
    let partition = read_varint(member, &mut at) as u32;
    (partition, &member[at..])
}

/// What `aggregate`'s statistics (as seen) decide in a member's document: a
/// hash of its projected output fields, rounded and banded as shaping does;
/// without a projection, a hash of the statistics themselves.
pub fn member_signature(
    plan: &Plan,
    program: Option<&SignatureProgram>,
    member: &[u8],
    statistics: &[u64],
) -> u64 {
    let Some(program) = program else {
        return statistics
            .iter()
            .fold(FNV_OFFSET, |hash, bits| signature_mix(hash, *bits));
    };
    // the member's numbers up to the last one the program reads, in one pass
    let mut numbers: SmallVec<[f64; 4]> = SmallVec::new();
    let mut at = 0;
    for _ in 0..program.numbers_read {
        numbers.push(read_number(member, &mut at));
    }
    let mut hash = FNV_OFFSET;
    let mut number = None;
    for output in &program.outputs {
        if let Some(expression) = &output.number {
            number = expression.evaluate(&numbers, statistics);
        }
        let token = shaped_token(plan, &plan.output_fields[output.field], number);
        hash = match token {
            Some(token) => signature_mix(signature_mix(hash, 1), token),
            None => signature_mix(hash, 0),
        };
    }
    hash
}

/// An aggregate's `MarketProjection` compiled once, when the dataflow is
/// built: each output's number as a small expression over the member's
/// numbers and the statistics by index. The join computes a signature for
/// every pair it visits (711,569 on the 200k harness); walking the plan for
/// each (finding a carried value among the carried, a feature's function
/// among the features, a member's number by skipping the ones before it)
/// took 578 instructions a signature there, the program 524: most of a
/// signature is the rounding and the band lookups, done as before.
#[derive(Debug, Clone)]
pub struct SignatureProgram {
    /// How many of the member's numbers the expressions read (from the first).
    numbers_read: usize,
    outputs: Vec<SignatureOutput>,
}

#[derive(Debug, Clone)]
struct SignatureOutput {
    /// Index into `Plan::output_fields`: how the number is shown (`shaped_token`).
    field: usize,
    /// `None`: the number of the output before it, which shows the same
    /// value (a band of the value the output before it shows: the price
    /// position, banded from the price's ratio to the segment's median).
    number: Option<Expression>,
}

/// A value as `compute_features` and shaping compute it; the projection
/// admits only fields, lookups, this aggregate's statistics and ratios.
#[derive(Debug, Clone)]
enum Expression {
    /// One of the member's numbers (a carried field or lookup).
    Member(usize),
    /// One of the aggregate's statistics, by its index among them.
    Statistic(usize),
    Ratio {
        numerator: Box<Expression>,
        denominator: Box<Expression>,
        min_denominator: Option<f64>,
    },
    /// What the projection cannot compute from a member: no value.
    Nothing,
}

impl Expression {
    fn compile(
        plan: &Plan,
        aggregate: usize,
        projection: &MarketProjection,
        value: ValueRef,
    ) -> Expression {
        let ratio = |function: &Function| match function {
            Function::Ratio {
                numerator,
                denominator,
                min_denominator,
            } => Expression::Ratio {
                numerator: Box::new(Self::compile(plan, aggregate, projection, *numerator)),
                denominator: Box::new(Self::compile(plan, aggregate, projection, *denominator)),
                min_denominator: *min_denominator,
            },
            _ => Expression::Nothing,
        };
        match value {
            ValueRef::Field(_) | ValueRef::Lookup(_) => {
                match projection.carried.iter().position(|c| *c == value) {
                    Some(index) => Expression::Member(projection.slots[index]),
                    None => Expression::Nothing,
                }
            }
            ValueRef::Statistic {
                aggregate: of,
                statistic,
            } if of == aggregate => Expression::Statistic(statistic),
            ValueRef::Feature(i) => ratio(&plan.features[i].function),
            ValueRef::Derived(i) => ratio(&plan.derived[i].function),
            _ => Expression::Nothing,
        }
    }

    fn evaluate(&self, numbers: &[f64], statistics: &[u64]) -> Option<f64> {
        match self {
            Expression::Member(slot) => Some(numbers[*slot]).filter(|x| !x.is_nan()),
            Expression::Statistic(index) => statistics
                .get(*index)
                .map(|bits| f64::from_bits(*bits))
                .filter(|x| !x.is_nan()),
            Expression::Ratio {
                numerator,
                denominator,
                min_denominator,
            } => features::ratio(
                numerator.evaluate(numbers, statistics),
                denominator.evaluate(numbers, statistics),
                *min_denominator,
            ),
            Expression::Nothing => None,
        }
    }

    fn highest_member_slot(&self) -> Option<usize> {
        match self {
            Expression::Member(slot) => Some(*slot),
            Expression::Ratio {
                numerator,
                denominator,
                ..
            } => numerator
                .highest_member_slot()
                .max(denominator.highest_member_slot()),
            Expression::Statistic(_) | Expression::Nothing => None,
        }
    }
}

impl SignatureProgram {
    /// `None` when the aggregate has no projection (its signature is then
    /// the statistics themselves).
    pub fn compile(plan: &Plan, aggregate: usize) -> Option<SignatureProgram> {
        let projection = plan.aggregates[aggregate].projection.as_ref()?;
        let mut outputs = Vec::with_capacity(projection.outputs.len());
        let mut previous_source = None;
        for index in &projection.outputs {
            let source = shaped_from(plan, &plan.output_fields[*index]);
            let number = (previous_source != Some(source))
                .then(|| Expression::compile(plan, aggregate, projection, source));
            previous_source = Some(source);
            outputs.push(SignatureOutput {
                field: *index,
                number,
            });
        }
        let numbers_read = outputs
            .iter()
            .filter_map(|output| output.number.as_ref()?.highest_member_slot())
            .max()
            .map_or(0, |slot| slot + 1);
        Some(SignatureProgram {
            numbers_read,
            outputs,
        })
    }
}

/// Mixes one word into a signature. Signatures are only compared with each
/// other within a run (a member's before and after), never stored, so a
/// multiply-rotate per word does; FNV-1a, a multiply per byte, was most of
/// a signature's cost. Each step is a bijection of the hash for a given
/// word, so sequences that differ only in their last word never collide.
fn signature_mix(hash: u64, word: u64) -> u64 {
    (hash ^ word)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .rotate_left(31)
}

/// The number an output field is shaped from: a band's source, or the field's own.
fn shaped_from(plan: &Plan, field: &OutputField) -> ValueRef {
    match field.source {
        ValueRef::Band(band) => plan.bands[band].source,
        source => source,
    }
}

/// What an output field shows for `number` (its `shaped_from` value), as
/// shaping writes it: a band's label (hashed) or the rounded number's bits;
/// `None` when it shows nothing. Signatures and their interval bounds both
/// go through here, so they cannot disagree on what a document shows.
fn shaped_token(plan: &Plan, field: &OutputField, number: Option<f64>) -> Option<u64> {
    let number = number?;
    match field.source {
        ValueRef::Band(band) => {
            let band = &plan.bands[band];
            Some(band.label_hashes[features::band_index(number, &band.steps)])
        }
        _ => Some(
            field
                .round_to
                .map_or(number, |rounding| rounding.apply(number))
                .to_bits(),
        ),
    }
}

/// Buckets per octave of a member's bucketed value (see "Buckets").
pub const BUCKETS_PER_OCTAVE: f64 = 32.0;
const BUCKET_OFFSET: i32 = 1 << 15;

/// The value a member is bucketed by: the one value its projection carries
/// (the price, in both shipped topologies); `None` when there is no such value.
fn bucketed_value(aggregate: &Aggregate, member: &[u8]) -> Option<f64> {
    let projection = aggregate.projection.as_ref()?;
    (projection.carried.len() == 1).then(|| member_measure(member, projection.slots[0]))
}

/// A member's bucket within its segment: log-spaced ranges of its bucketed
/// value, 0 for members that cannot be bucketed (no projection, several
/// carried values, a missing or non-positive value). Bucket 0 is re-evaluated
/// on every move of the segment's statistics.
pub fn member_bucket(plan: &Plan, aggregate_index: usize, member: &[u8]) -> u16 {
    match bucketed_value(&plan.aggregates[aggregate_index], member) {
        Some(value) if value.is_finite() && value > 0.0 => {
            let position = (value.log2() * BUCKETS_PER_OCTAVE).floor() as i32 + BUCKET_OFFSET;
            position.clamp(1, u16::MAX as i32) as u16
        }
        _ => 0,
    }
}

/// The closed range of values in a bucket, widened a little so that a value
/// `log2` placed at an edge is inside it.
fn bucket_range(bucket: u16) -> Option<(f64, f64)> {
    if bucket == 0 || bucket == u16::MAX {
        return None;
    }
    let low = 2f64.powf((bucket as i32 - BUCKET_OFFSET) as f64 / BUCKETS_PER_OCTAVE);
    let high = 2f64.powf((bucket as i32 - BUCKET_OFFSET + 1) as f64 / BUCKETS_PER_OCTAVE);
    Some((low * (1.0 - 1e-9), high * (1.0 + 1e-9)))
}

/// Whether every member of `bucket` has the same signature under the seen
/// statistics `before` and `after`: each projected output is constant over
/// the bucket's range under both, and the same. Interval arithmetic over
/// monotone steps (ratios whose denominator keeps its sign, rounding,
/// bands), so a "yes" is certain; anything it cannot bound is a "no".
pub fn bucket_unaffected(
    plan: &Plan,
    aggregate_index: usize,
    bucket: u16,
    before: &[u64],
    after: &[u64],
) -> bool {
    if before == after {
        return true;
    }
    let aggregate = &plan.aggregates[aggregate_index];
    let (Some(projection), Some(range)) = (&aggregate.projection, bucket_range(bucket)) else {
        return false;
    };
    if projection.carried.len() != 1 {
        return false;
    }
    projection.outputs.iter().all(|index| {
        let field = &plan.output_fields[*index];
        let constant = |statistics: &[u64]| {
            let bounding = Bounding {
                plan,
                aggregate: aggregate_index,
                carried: projection.carried[0],
                range,
                statistics,
            };
            bounding.constant_output(field)
        };
        match (constant(before), constant(after)) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    })
}

/// What a value can be over a bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Span {
    /// No value, whatever the member's value in the range.
    Missing,
    /// Between these, inclusive.
    Between(f64, f64),
    /// Cannot be bounded.
    Unknown,
}

/// The projection evaluated over a bucket's range instead of one member's value.
struct Bounding<'a> {
    plan: &'a Plan,
    aggregate: usize,
    carried: ValueRef,
    range: (f64, f64),
    statistics: &'a [u64],
}

impl Bounding<'_> {
    fn span(&self, value: ValueRef) -> Span {
        let ratio = |function: &Function| match function {
            Function::Ratio {
                numerator,
                denominator,
                min_denominator,
            } => match (self.span(*numerator), self.span(*denominator)) {
                (Span::Unknown, _) | (_, Span::Unknown) => Span::Unknown,
                (Span::Missing, _) | (_, Span::Missing) => Span::Missing,
                (Span::Between(a, b), Span::Between(c, d)) => {
                    let (c, d) = match min_denominator {
                        Some(floor) => (c.max(*floor), d.max(*floor)),
                        None => (c, d),
                    };
                    if c == 0.0 && d == 0.0 {
                        Span::Missing
                    } else if c > 0.0 || d < 0.0 {
                        let corners = [a / c, a / d, b / c, b / d];
                        let low = corners.iter().copied().fold(f64::INFINITY, f64::min);
                        let high = corners.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        if low.is_nan() || high.is_nan() {
                            Span::Unknown
                        } else {
                            Span::Between(low, high)
                        }
                    } else {
                        Span::Unknown
                    }
                }
            },
            _ => Span::Unknown,
        };
        match value {
            ValueRef::Field(_) | ValueRef::Lookup(_) if value == self.carried => {
                Span::Between(self.range.0, self.range.1)
            }
            ValueRef::Statistic {
                aggregate,
                statistic,
            } if aggregate == self.aggregate => match self.statistics.get(statistic) {
                Some(bits) if !f64::from_bits(*bits).is_nan() => {
                    let x = f64::from_bits(*bits);
                    Span::Between(x, x)
                }
                _ => Span::Missing,
            },
            ValueRef::Feature(i) => ratio(&self.plan.features[i].function),
            ValueRef::Derived(i) => ratio(&self.plan.derived[i].function),
            _ => Span::Unknown,
        }
    }

    /// The output's value (as the signature hashes it) when it is the same
    /// for every value in the range; `None` when it may differ.
    fn constant_output(&self, field: &OutputField) -> Option<Option<u64>> {
        match self.span(shaped_from(self.plan, field)) {
            Span::Missing => Some(None),
            Span::Between(a, b) => {
                let (low, high) = (
                    shaped_token(self.plan, field, Some(a)),
                    shaped_token(self.plan, field, Some(b)),
                );
                (low == high).then_some(low)
            }
            Span::Unknown => None,
        }
    }
}

/// Linear interpolation between closest ranks (numpy's default) on sorted values.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let position = (sorted.len() - 1) as f64 * q;
    let low = position.floor() as usize;
    let high = position.ceil() as usize;
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

/// An epoch's changes of per-segment statistics, netted: per segment whose
/// statistics changed, the new ones, or `None` when the segment emptied.
/// (A change is a retraction and an insertion; equal ones cancel.)
pub fn net_statistics_changes(
    changes: Vec<(u64, StatisticBits, isize)>,
) -> Vec<(u64, Option<StatisticBits>)> {
    // both sized for the most they can hold, not grown from empty
    let mut net: rustc_hash::FxHashMap<(u64, StatisticBits), isize> =
        rustc_hash::FxHashMap::with_capacity_and_hasher(changes.len(), Default::default());
    for (segment, statistics, diff) in changes {
        *net.entry((segment, statistics)).or_default() += diff;
    }
    let mut by_segment: rustc_hash::FxHashMap<u64, Option<StatisticBits>> =
        rustc_hash::FxHashMap::with_capacity_and_hasher(net.len(), Default::default());
    for ((segment, statistics), diff) in net {
        if diff > 0 {
            by_segment.insert(segment, Some(statistics));
        } else if diff < 0 {
            by_segment.entry(segment).or_insert(None);
        }
    }
    by_segment.into_iter().collect()
}

/// Rounds to `digits` significant digits (the precision documents see).
pub fn round_significant(x: f64, digits: u32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let magnitude = x.abs().log10().floor() as i32;
    let exponent = digits as i32 - 1 - magnitude;
    if exponent <= 0 {
        let step = 10f64.powi(-exponent);
        crate::features::round(x / step) * step
    } else {
        let scale = 10f64.powi(exponent);
        crate::features::round(x * scale) / scale
    }
}

/// f64s as bits, every NaN as the one canonical NaN (so equal statistics compare equal).
pub fn to_bits(values: &[f64]) -> StatisticBits {
    values
        .iter()
        .map(|v| {
            if v.is_nan() {
                f64::NAN.to_bits()
            } else {
                v.to_bits()
            }
        })
        .collect()
}

pub fn from_bits(bits: &[u64]) -> Vec<f64> {
    bits.iter().map(|b| f64::from_bits(*b)).collect()
}

/// How a statistic reaches the join (and the documents).
enum Seen {
    /// Nobody reads it: blanked.
    Not,
    /// Read as a value: rounded to the aggregate's significant digits.
    Rounded,
    /// Read by bands only: the largest of these thresholds at or below it.
    Band(Vec<f64>),
}

impl Seen {
    fn apply(&self, value: f64, digits: u32) -> f64 {
        match self {
            Seen::Not => f64::NAN,
            Seen::Rounded => round_significant(value, digits),
            Seen::Band(cuts) => band_stand_in(round_significant(value, digits), cuts),
        }
    }
}

/// The largest cut at or below `value`, minus infinity below every cut; NaN stays NaN.
pub fn band_stand_in(value: f64, cuts: &[f64]) -> f64 {
    if value.is_nan() {
        return value;
    }
    cuts.iter()
        .rev()
        .find(|cut| **cut <= value)
        .copied()
        .unwrap_or(f64::NEG_INFINITY)
}

/// When moves of the seen statistics become visible. With `epochs` = K > 1,
/// each segment's moves wait for the end of its window, so the bucket
/// views, the neighbours' re-evaluations and the statistics the own events
/// read change once per window per segment, with what netted out inside it
/// gone.
///
/// With `phases` = P > 1 the windows are staggered: the segments fall into P
/// groups (by a hash of the segment), and group g's windows end at the
/// epochs congruent to g x K / P, so every K / P epochs the windows of a
/// P-th of the segments end. With one end for all, the join and the
/// re-evaluations of a whole window fell on one epoch and the records
/// behind it waited. Over Kafka (half of the full topology's maximum rate,
/// 600k events) 5 groups of 25 epochs cost no more CPU and flattened the
/// latency between sync points, but p99 was lower in only 10 of 15
/// alternating pairs and higher on average, the jumps at the sync points
/// included, so the shipped config keeps 1. A group per epoch (P = K) cost
/// more CPU than the burst: every epoch then had a round of the join and
/// the arrangements (see `docs/benchmarks.md`, Stop 32).
///
/// Every `windows_per_sync` windows (`sync_epochs`) all groups' windows end
/// together: a sync point, where the statistics seen are the exact ones.
/// Checkpoints are proposed only there (`aligned_checkpoint`), so a
/// restart's rebuild falls on one and a resumed run sees the windows an
/// uninterrupted one saw. With P = 1 every window end is a sync point. The
/// rebuild's time (`rebuild_time`, at or below which nothing waits) is
/// visible at once: the first epoch after a restart reads the rebuilt
/// statistics.
#[derive(Debug, Clone, Copy)]
pub struct MarketWindow {
    pub epochs: u64,
    pub phases: u64,
    pub windows_per_sync: u64,
    pub rebuild_time: u64,
}

impl MarketWindow {
    /// Epochs between sync points (1 without a window).
    pub fn sync_epochs(&self) -> u64 {
        sync_epochs(self.epochs, self.phases, self.windows_per_sync)
    }

    /// The dataflow time at which a move of `segment`'s statistics made at
    /// `time` becomes visible: the first end of the segment's window at or
    /// after `time`, or the first sync point if that comes sooner. Never
    /// earlier than `time`, at most K - 1 epochs later, and monotone in
    /// `time` for one segment (a later move never shows before an earlier).
    pub fn visible_at(&self, segment: u64, time: u64) -> u64 {
        if self.epochs <= 1 || time <= self.rebuild_time {
            return time;
        }
        let epochs = self.epochs;
        let phase = window_phase(segment, epochs, self.phases);
        let window_end = time + (phase + epochs - time % epochs) % epochs;
        let sync = self.sync_epochs();
        window_end.min(time.div_ceil(sync) * sync)
    }
}

/// Epochs between the sync points of a window of `window_epochs` in `phases`
/// groups, synced every `windows_per_sync` windows: where checkpoints can
/// fall. Without staggering every window end is one.
pub fn sync_epochs(window_epochs: u64, phases: u64, windows_per_sync: u64) -> u64 {
    if window_epochs <= 1 {
        1
    } else if phases <= 1 {
        window_epochs
    } else {
        window_epochs.saturating_mul(windows_per_sync.max(1))
    }
}

/// Where in a window of `epochs` a segment's window ends: its group (of
/// `phases`) times the spacing between groups. Segment ids are FNV hashes
/// with the aggregate in the top byte; the multiply spreads their bits
/// before the modulo.
fn window_phase(segment: u64, epochs: u64, phases: u64) -> u64 {
    let phases = phases.clamp(1, epochs);
    ((segment.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % phases) * (epochs / phases)
}

/// Delays each update of the seen statistics to `window.visible_at` its
/// segment and time. Differential's `delay` moves every update of a message
/// by the same function of its time; here the segment decides too. The
/// updates keep their message's capability: later times than it are allowed,
/// and the arrangements downstream hold each update until its own time.
fn delay_to_window_end<'scope>(
    seen_changes: VecCollection<'scope, u64, (u64, StatisticBits), isize>,
    window: MarketWindow,
) -> VecCollection<'scope, u64, (u64, StatisticBits), isize> {
    use timely::dataflow::channels::pact::Pipeline;
    use timely::dataflow::operators::generic::operator::Operator;
    seen_changes
        .inner
        .unary(Pipeline, "DelayToWindowEnd", move |_, _| {
            move |input, output| {
                input.for_each_stamp(|capability, containers| {
                    let Some(capability) = capability.retain_least(0) else {
                        return;
                    };
                    let mut session = output.session(&capability);
                    for container in containers {
                        for ((segment, _), time, _) in container.iter_mut() {
                            *time = window.visible_at(*segment, *time);
                        }
                        session.give_container(container);
                    }
                });
            }
        })
        .as_collection()
}

/// Records of merge work an arrangement does per scheduling when
/// `merge_exertion` asks for it: about a millisecond, so a forced merge is
/// spread over many schedulings instead of stalling the worker.
const MERGE_EFFORT_PER_SCHEDULING: usize = 1 << 16;

/// When an arrangement works on its merges beyond what its new updates pay
/// for. Differential merges a batch only with one of similar size, so after
/// many updates the largest batch still holds members that later, smaller
/// batches retract: a listing whose price changed is held three times (its
/// old member, the retraction, the new member) until those batches meet.
/// Memory then grows with the history, not with the live listings. This
/// asks for work while the smaller batches hold at least a quarter of the
/// records of the largest (so the merge that cancels the retractions is
/// reached) and while the largest is itself being merged (so that merge ends
/// and frees its inputs). A quarter bounds the slack at about 25% of the
/// arrangement and costs a few extra record copies per update; never asking
/// (differential's default) let 1,000,000 updates grow the members
/// arrangement from 66 to 107 bytes per live listing.
pub fn merge_exertion(layers: &[(usize, usize, usize)]) -> Option<usize> {
    // layers come largest level first: (level, batches in it, records)
    let mut layers = layers.iter().filter(|(_, _, records)| *records > 0);
    let (_, largest_batches, largest_records) = *layers.next()?;
    let smaller_records: usize = layers.map(|(_, _, records)| records).sum();
    (largest_batches > 1 || smaller_records * 4 >= largest_records)
        .then_some(MERGE_EFFORT_PER_SCHEDULING)
}

/// Installs `merge_exertion` for every arrangement the workers build.
pub fn configure_merging(worker: &mut timely::WorkerConfig) {
    worker.set::<differential_dataflow::trace::ExertionLogic>(
        "differential/default_exert_logic".to_string(),
        Arc::new(merge_exertion),
    );
}

/// The first input epoch at or after `epoch` that is a sync point (a
/// multiple of `sync_epochs`, see `MarketWindow`): a run resumed from a
/// checkpoint there rebuilds at dataflow time `epoch` (its records run at
/// epoch + 1), where every segment's window ended.
pub fn aligned_checkpoint(epoch: u64, sync_epochs: u64) -> u64 {
    if sync_epochs <= 1 {
        epoch
    } else {
        epoch.div_ceil(sync_epochs) * sync_epochs
    }
}

/// The seen statistics of one aggregate, arranged by (segment, statistic).
type StatisticsSpine = ValSpine<(u64, u16), StatisticBits, u64, isize>;

/// Handles on the arrangements, to measure their memory (see [`ArrangementMemory`]).
pub struct MarketTraces {
    members: TraceAgent<MemberSpine>,
    statistics: Vec<TraceAgent<StatisticsSpine>>,
    /// What the segment statistics' sorted values hold (see `segment_statistics.rs`).
    index_bytes: Rc<Cell<usize>>,
}

/// What the arrangements hold, counted from their batches: the containers'
/// capacities and each value's heap block, if it has one (glibc: 16-byte
/// aligned, 8 bytes of header, 32 at least). Allocator slack and freed pages are not in
/// it; peak RSS in the summary is the upper bound.
#[derive(Debug, Default, Clone, Copy)]
pub struct ArrangementMemory {
    pub member_updates: u64,
    pub member_bytes: u64,
    pub statistics_bytes: u64,
}

fn heap_block(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        ((len + 8 + 15) & !15).max(32)
    }
}

fn offsets_bytes(list: &differential_dataflow::trace::implementations::OffsetList) -> usize {
    list.smol.capacity() * 4 + list.chonk.capacity() * 8
}

impl MarketTraces {
    pub fn memory(&self) -> ArrangementMemory {
        let mut memory = ArrangementMemory::default();
        self.members.map_spans(|span| {
            if let Some(batch) = &span.inner {
                let storage = &batch.storage;
                memory.member_updates += batch.updates as u64;
                memory.member_bytes += (storage.keys.capacity() * std::mem::size_of::<(u64, u16)>()
                    + offsets_bytes(&storage.vals.offs)
                    + storage.vals.vals.heap_bytes()
                    + offsets_bytes(&storage.upds.offs)
                    + storage.upds.times.capacity() * 8
                    + storage.upds.diffs.capacity() * 8)
                    as u64;
            }
        });
        memory.statistics_bytes += self.index_bytes.get() as u64;
        for trace in &self.statistics {
            trace.map_spans(|span| {
                if let Some(batch) = &span.inner {
                    let storage = &batch.storage;
                    let values: usize = storage
                        .vals
                        .vals
                        .iter()
                        .map(|v| heap_block(v.len() * 8))
                        .sum();
                    memory.statistics_bytes +=
                        (storage.keys.capacity() * std::mem::size_of::<(u64, u16)>()
                            + offsets_bytes(&storage.vals.offs)
                            + storage.vals.vals.capacity() * 24
                            + values
                            + offsets_bytes(&storage.upds.offs)
                            + storage.upds.times.capacity() * 8
                            + storage.upds.diffs.capacity() * 8) as u64;
                }
            });
        }
        memory
    }
}

/// A handle that only reads: it lets the trace compact as far as it likes.
fn reader<Tr: differential_dataflow::trace::TraceReader<Time = u64>>(mut trace: Tr) -> Tr {
    trace.set_logical_compaction(timely::progress::frontier::AntichainRef::new(&[]));
    trace.set_physical_compaction(timely::progress::frontier::AntichainRef::new(&[]));
    trace
}

/// The market part of the dataflow. Returns what the evaluators need (members'
/// signatures, exchanged to each listing's owner, and the seen statistics,
/// broadcast), the exact statistics' changes (for the statistics output) and
/// handles on the arrangements.
#[expect(
    clippy::type_complexity,
    reason = "the three outputs are named in the doc comment; aliases would hide the update shapes"
)]
pub fn build<'scope>(
    plan: Arc<Plan>,
    members: StreamVec<'scope, u64, MemberUpdate>,
    window: MarketWindow,
) -> (
    StreamVec<'scope, u64, (MarketInput, u64, isize)>,
    StreamVec<'scope, u64, ((u64, StatisticBits), u64, isize)>,
    MarketTraces,
) {
    let index_bytes = Rc::new(Cell::new(0));
    let exact_changes: VecCollection<'scope, u64, (u64, StatisticBits), isize> =
        segment_statistics::build(plan.clone(), members.clone(), index_bytes.clone())
            .as_collection();
    // members by (segment, bucket): see bucket_views.rs
    let bucket_plan = plan.clone();
    let members_by_bucket: VecCollection<'scope, u64, ((u64, u16), Member), isize> = members
        .as_collection()
        .map(move |(segment, member): (u64, Member)| {
            let bucket = member_bucket(&bucket_plan, (segment >> 56) as usize, &member);
            ((segment, bucket), member)
        });
    let arranged = members_by_bucket
        .clone()
        .arrange_named::<MemberBatcher, MemberSpine>("ArrangeMembers", MemberBatcher::new);

    // what the join sees: the statistics the topology reads, rounded; the others
    // are blanked, so that their moves re-evaluate no neighbour; a statistic
    // only bands read is replaced by its band's stand-in (`Plan::statistics_band_cuts`)
    let read = plan.statistics_read();
    let band_cuts = plan.statistics_band_cuts();
    let seen_per_aggregate: Vec<Vec<Seen>> = (0..plan.aggregates.len())
        .map(|a| {
            let offset = plan.statistic_offset(a, 0);
            (offset..offset + plan.aggregates[a].statistic_count())
                .map(|i| match (read[i], &band_cuts[i]) {
                    (false, _) => Seen::Not,
                    (true, Some(cuts)) => Seen::Band(cuts.clone()),
                    (true, None) => Seen::Rounded,
                })
                .collect()
        })
        .collect();
    let round_plan = plan.clone();
    let seen_changes = exact_changes.clone().map(move |(segment, statistics)| {
        let aggregate = (segment >> 56) as usize;
        let digits = round_plan.aggregates[aggregate].significant_digits;
        let rounded: Vec<f64> = from_bits(&statistics)
            .into_iter()
            .zip(&seen_per_aggregate[aggregate])
            .map(|(x, seen)| seen.apply(x, digits))
            .collect();
        (segment, to_bits(&rounded))
    });
    // moves of the seen statistics wait for the end of their window, where the
    // moves inside it have netted out (see `MarketWindow`)
    let seen_changes = if window.epochs > 1 {
        delay_to_window_end(seen_changes, window)
    } else {
        seen_changes
    };
    // each member's bucket, as the arrangement keys it
    let bucket_changes = members_by_bucket.map(|(segment_bucket, _member)| segment_bucket);
    let views = bucket_views::build(
        plan.clone(),
        bucket_changes.inner,
        seen_changes.inner.clone(),
    )
    .as_collection()
    .arrange_by_key_named("ArrangeBucketViews");
    let traces = MarketTraces {
        members: reader(arranged.trace.clone()),
        statistics: vec![reader(views.trace.clone())],
        index_bytes,
    };

    // Which members are re-evaluated: the join computes, for every member of a
    // bucket whose view moved, its signature under the old view (retracted)
    // and the new (inserted). Where they are equal the two cancel in the
    // evaluator, which re-evaluates only the members whose document can
    // change: in a segment of 100,000 listings a move of the median changes
    // the price position of the few whose price sits near a band's edge.
    let join_plan = plan.clone();
    // per aggregate, where a member's identity starts: fixed by the plan, so
    // not recounted for every pair the join visits
    let numbers_per_aggregate: Vec<usize> = plan.aggregates.iter().map(member_numbers).collect();
    let signature_programs: Vec<Option<SignatureProgram>> = (0..plan.aggregates.len())
        .map(|aggregate| SignatureProgram::compile(&plan, aggregate))
        .collect();
    // Not differential's `join_core`: that consolidates its output, sorting
    // every (member, signature) pair by listing id (5% of the full pipeline's
    // time), only for the evaluator to net the same pairs again by listing,
    // as it must anyway (the two halves of a move can arrive in different
    // batches). Unconsolidated; the builder drops a pair whose two halves
    // arrive in a row and match (`signature_builder.rs`), and the evaluator
    // nets what is left.
    let joined = differential_dataflow::operators::join::join_traces::<_, _, _, _, SignatureBuilder>(
        arranged,
        views,
        "MembersByView",
        move |(segment, _bucket): &(u64, u16),
              MemberRef(member): MemberRef<'_>,
              statistics: &StatisticBits,
              time: u64,
              member_diff: &isize,
              view_diff: &isize,
              output| {
            let aggregate = (*segment >> 56) as usize;
            let (partition, key) = member_identity(member, numbers_per_aggregate[aggregate]);
            // a pair whose two signatures are equal cancels here (signature_builder.rs)
            output.push_member(
                (partition, key),
                aggregate as u8,
                *segment,
                member_signature(
                    &join_plan,
                    signature_programs[aggregate].as_ref(),
                    member,
                    statistics,
                ),
                time,
                member_diff * view_diff,
            );
        },
    );
    let to_owners = joined.exchange(|(input, _, _): &(MarketInput, u64, isize)| match input {
        MarketInput::Member(update) => update.partition as u64,
        MarketInput::Statistics(segment, _) => *segment,
    });
    let to_everyone = seen_changes
        .inner
        .map(|((segment, statistics), time, diff)| {
            (MarketInput::Statistics(segment, statistics), time, diff)
        })
        .broadcast();
    (to_owners.concat(to_everyone), exact_changes.inner, traces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_linearly_like_numpy() {
        let sorted = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile(&sorted, 0.5), 2.5);
        assert_eq!(quantile(&sorted, 0.25), 1.75);
        assert_eq!(quantile(&sorted, 0.75), 3.25);
        assert_eq!(quantile(&[7.0], 0.25), 7.0);
        assert!(quantile(&[], 0.5).is_nan());
    }

    #[test]
    fn a_band_stand_in_gets_the_label_its_value_gets() {
        let cuts = [5.0, 50.0, 200.0];
        let label = |x: f64| cuts.iter().position(|t| x < *t).unwrap_or(cuts.len());
        for value in [0.0, 4.0, 5.0, 6.0, 49.0, 50.0, 199.5, 200.0, 1e9, -3.0] {
            assert_eq!(label(band_stand_in(value, &cuts)), label(value), "{value}");
        }
        assert_eq!(
            band_stand_in(7.0, &cuts),
            band_stand_in(49.0, &cuts),
            "moves within a band are invisible"
        );
        assert!(band_stand_in(f64::NAN, &cuts).is_nan());
    }

    #[test]
    fn significant_digits_round_large_and_small_numbers() {
        assert_eq!(round_significant(23_456.0, 3), 23_500.0);
        assert_eq!(round_significant(1_234.0, 3), 1_230.0);
        assert_eq!(round_significant(47.0, 3), 47.0);
        assert_eq!(round_significant(0.012345, 3), 0.0123);
        assert_eq!(round_significant(-23_449.0, 3), -23_400.0);
        assert_eq!(round_significant(0.0, 3), 0.0);
    }

    /// The signature as it was computed before `SignatureProgram`: the plan
    /// walked for every member. The oracle the compiled program must equal.
    fn signature_walking_the_plan(
        plan: &Plan,
        aggregate_index: usize,
        member: &[u8],
        statistics: &[u64],
    ) -> u64 {
        let projection = plan.aggregates[aggregate_index]
            .projection
            .as_ref()
            .expect("a projection");
        let context = Projecting {
            plan,
            aggregate: aggregate_index,
            carried: &projection.carried,
            slots: &projection.slots,
            member,
            statistics,
        };
        let mut hash = FNV_OFFSET;
        let mut previous: Option<(ValueRef, Option<f64>)> = None;
        for index in &projection.outputs {
            let field = &plan.output_fields[*index];
            let source = shaped_from(plan, field);
            let number = match previous {
                Some((value, number)) if value == source => number,
                _ => context.number(source),
            };
            previous = Some((source, number));
            hash = match shaped_token(plan, field, number) {
                Some(token) => signature_mix(signature_mix(hash, 1), token),
                None => signature_mix(hash, 0),
            };
        }
        hash
    }

    /// A member's values and its segment's statistics, for computing a projection.
    struct Projecting<'a> {
        plan: &'a Plan,
        aggregate: usize,
        carried: &'a [ValueRef],
        slots: &'a [usize],
        member: &'a [u8],
        statistics: &'a [u64],
    }

    impl Projecting<'_> {
        /// A value as `compute_features` and shaping compute it (the projection
        /// only admits fields, lookups, this aggregate's statistics and ratios).
        fn number(&self, value: ValueRef) -> Option<f64> {
            let ratio = |function: &Function| match function {
                Function::Ratio {
                    numerator,
                    denominator,
                    min_denominator,
                } => features::ratio(
                    self.number(*numerator),
                    self.number(*denominator),
                    *min_denominator,
                ),
                _ => None,
            };
            match value {
                ValueRef::Field(_) | ValueRef::Lookup(_) => {
                    let index = self.carried.iter().position(|c| *c == value)?;
                    Some(member_measure(self.member, self.slots[index])).filter(|x| !x.is_nan())
                }
                ValueRef::Statistic {
                    aggregate,
                    statistic,
                } if aggregate == self.aggregate => self
                    .statistics
                    .get(statistic)
                    .map(|bits| f64::from_bits(*bits))
                    .filter(|x| !x.is_nan()),
                ValueRef::Feature(i) => ratio(&self.plan.features[i].function),
                ValueRef::Derived(i) => ratio(&self.plan.derived[i].function),
                _ => None,
            }
        }
    }

    /// Both shipped topologies' projections, over members with and without
    /// their carried value (whole, fractional, zero, negative) and statistics
    /// present, missing (NaN), zero and shifted: the compiled program gives
    /// the plan walk's signature every time, and signatures still move with
    /// the statistics (a program that hashed nothing would pass the first
    /// check alone).
    #[test]
    fn a_compiled_signature_equals_the_plan_walked() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for topology in ["listings.toml", "rentals.toml"] {
            let plan = crate::topology::load(&root.join("topologies").join(topology))
                .expect("the shipped topology compiles");
            let program = SignatureProgram::compile(&plan, 0);
            let projection = plan.aggregates[0].projection.clone().expect("a projection");
            let mut rng = crate::bench::Rng::new(11);
            let mut distinct = std::collections::HashSet::new();
            for round in 0..20_000 {
                let mut fields = vec![None; plan.fields.len()];
                let measures = plan.aggregates[0].measures.iter().copied();
                let carried = projection.carried.iter().filter_map(|value| match value {
                    ValueRef::Field(field) => Some(*field),
                    _ => None,
                });
                for field in measures.chain(carried) {
                    fields[field] = match rng.below(6) {
                        0 => None,
                        1 => Some(Value::Int(0)),
                        2 => Some(Value::Int(-(rng.below(1_000) as i64))),
                        3 => Some(Value::Num(60_000.0 * rng.uniform())),
                        _ => Some(Value::Int(rng.below(60_000) as i64)),
                    };
                }
                let member = encode_member(&plan, 0, &fields, round % 8, "listing-x");
                let statistics: Vec<u64> = (0..plan.aggregates[0].statistic_count())
                    .map(|_| match rng.below(8) {
                        0 => f64::NAN,
                        1 => 0.0,
                        2 => 0.5,
                        _ => (rng.below(600) * 100) as f64,
                    })
                    .map(f64::to_bits)
                    .collect();
                let compiled = member_signature(&plan, program.as_ref(), &member, &statistics);
                assert_eq!(
                    compiled,
                    signature_walking_the_plan(&plan, 0, &member, &statistics),
                    "{topology}: {fields:?} {statistics:?}"
                );
                distinct.insert(compiled);
            }
            assert!(
                distinct.len() > 100,
                "{topology}: {} signatures",
                distinct.len()
            );
        }
    }

    /// The listings topology's projection: price against the segment median
    /// (rounded to 0.05, and banded) and the supply band of the count.
    #[test]
    fn a_bucket_called_unaffected_keeps_every_member_signature() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/listings.toml");
        let plan = crate::topology::load(&path).expect("the shipped topology compiles");
        let projection = plan.aggregates[0]
            .projection
            .clone()
            .expect("listings has a projection");
        assert_eq!(
            projection.carried,
            [ValueRef::Field(plan.field_index("price").unwrap())]
        );
        let price = plan.field_index("price").unwrap();
        let member = |value: f64| {
            let mut fields = vec![None; plan.fields.len()];
            fields[price] = Some(Value::Num(value));
            encode_member(&plan, 0, &fields, 0, "x")
        };
        let statistics = |count: f64, median: f64| {
            let mut bits = vec![f64::NAN.to_bits(); plan.aggregates[0].statistic_count()];
            bits[0] = count.to_bits();
            bits[3] = median.to_bits(); // price median
            bits
        };
        let program = SignatureProgram::compile(&plan, 0);
        let mut rng = crate::bench::Rng::new(7);
        let (mut unaffected, mut affected) = (0, 0);
        for _ in 0..20_000 {
            let price = 2_000.0 + 60_000.0 * rng.uniform();
            let bucket = member_bucket(&plan, 0, &member(price));
            assert_ne!(bucket, 0);
            let (low, high) = bucket_range(bucket).unwrap();
            assert!(low <= price && price <= high);
            let median = (price * (0.7 + 0.6 * rng.uniform()) / 100.0).round() * 100.0;
            let before = statistics(50.0, median);
            let moved = median + 100.0 * (rng.below(5) as f64 - 2.0);
            let after = statistics(if rng.below(4) == 0 { 120.0 } else { 50.0 }, moved);
            if bucket_unaffected(&plan, 0, bucket, &before, &after) {
                unaffected += 1;
                for _ in 0..20 {
                    let other = low + (high - low) * rng.uniform();
                    if member_bucket(&plan, 0, &member(other)) != bucket {
                        continue;
                    }
                    assert_eq!(
                        member_signature(&plan, program.as_ref(), &member(other), &before),
                        member_signature(&plan, program.as_ref(), &member(other), &after),
                        "price {other} in bucket {bucket}: {median} -> {moved}"
                    );
                }
            } else {
                affected += 1;
            }
        }
        assert!(
            unaffected > 1_000 && affected > 1_000,
            "{unaffected} {affected}"
        );
    }

    /// The price is a measure and the value the projection carries: a
    /// member stores it once, and reads it back for both.
    #[test]
    fn a_carried_value_that_is_a_measure_is_stored_once() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for (topology, price_name) in [("listings.toml", "price"), ("rentals.toml", "rent")] {
            let plan = crate::topology::load(&root.join("topologies").join(topology))
                .expect("the shipped topology compiles");
            let aggregate = &plan.aggregates[0];
            let projection = aggregate.projection.as_ref().expect("a projection");
            let price = plan.field_index(price_name).unwrap();
            assert_eq!(projection.carried, [ValueRef::Field(price)], "{topology}");
            assert_eq!(projection.slots, [0], "{topology}: the first measure");
            assert_eq!(member_numbers(aggregate), aggregate.measures.len());
            let mut fields = vec![None; plan.fields.len()];
            fields[price] = Some(Value::Int(23_450));
            let member = encode_member(&plan, 0, &fields, 3, "cl-9");
            // price and a missing odometer, partition 3, the id
            assert_eq!(member.len(), 4 + 1 + 1 + 4);
            assert_eq!(
                member_identity(&member, member_numbers(aggregate)),
                (3, &b"cl-9"[..])
            );
            assert_eq!(bucketed_value(aggregate, &member), Some(23_450.0));
            assert_eq!(member_measure(&member, 0), 23_450.0);
        }
    }

    #[test]
    fn members_read_back_their_numbers_exactly_and_their_identity() {
        let numbers = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            29_337.0,
            108_000.0,
            12.5,
            -3.25e-7,
            f64::INFINITY,
            f64::NEG_INFINITY,
            9_007_199_254_740_991.0,
            9_007_199_254_740_992.0,
            -9_007_199_254_740_993.0 * 4.0,
            f64::MAX,
            f64::MIN_POSITIVE,
            f64::NAN,
        ];
        for partition in [0u32, 7, 127, 128, 300, u32::MAX] {
            let mut member = Member::new();
            for number in numbers {
                push_number(&mut member, number);
            }
            push_varint(&mut member, partition as u64);
            member.extend_from_slice(b"cl-1");
            for (index, number) in numbers.iter().enumerate() {
                let read = member_measure(&member, index);
                assert!(
                    read.to_bits() == number.to_bits() || (read.is_nan() && number.is_nan()),
                    "{number} read back as {read}"
                );
            }
            assert_eq!(
                member_identity(&member, numbers.len()),
                (partition, &b"cl-1"[..])
            );
        }
        let mut price = Member::new();
        push_number(&mut price, 29_337.0);
        assert_eq!(price.len(), 4, "a whole price is a tag and a 3-byte varint");
    }

    /// Segment ids as `segment_of` makes them: an aggregate in the top byte.
    fn some_segments(count: u64) -> Vec<u64> {
        (0..count)
            .map(|i| {
                let hash = fnv(fnv(FNV_OFFSET, &[(i % 2) as u8]), &i.to_le_bytes());
                ((i % 2) << 56) | (hash >> 8)
            })
            .collect()
    }

    #[test]
    fn a_segments_moves_show_at_its_window_end_within_k_epochs_and_in_order() {
        let window = MarketWindow {
            epochs: 6,
            phases: 3,
            windows_per_sync: 4,
            rebuild_time: 3,
        };
        for segment in some_segments(50) {
            let phase = window_phase(segment, 6, 3);
            assert!([0, 2, 4].contains(&phase), "{phase}");
            let mut last = 0;
            for time in 0..200u64 {
                let visible = window.visible_at(segment, time);
                if time <= 3 {
                    assert_eq!(visible, time, "the rebuild's time waits for nothing");
                    continue;
                }
                assert!(visible >= time && visible < time + 6, "{time} -> {visible}");
                assert!(visible >= last, "a later move shows before an earlier one");
                last = visible;
                // a window end shows at once; every window end is the phase or a sync point
                assert_eq!(window.visible_at(segment, visible), visible);
                assert!(
                    visible.is_multiple_of(24) || visible % 6 == phase,
                    "{visible}"
                );
            }
        }
    }

    #[test]
    fn at_a_sync_point_every_segments_window_has_ended() {
        let window = MarketWindow {
            epochs: 5,
            phases: 5,
            windows_per_sync: 4,
            rebuild_time: 0,
        };
        assert_eq!(window.sync_epochs(), 20);
        for segment in some_segments(50) {
            for sync in [20u64, 40, 100] {
                // every move before a sync point shows by it: a checkpoint there
                // covers documents that saw every move of the checkpointed state
                for time in sync - 19..=sync {
                    assert!(window.visible_at(segment, time) <= sync);
                }
                assert!(window.visible_at(segment, sync + 1) > sync);
            }
        }
        assert_eq!(aligned_checkpoint(21, window.sync_epochs()), 40);
        assert_eq!(aligned_checkpoint(40, window.sync_epochs()), 40);
        // not staggered: every window end is a sync point, as before phases
        assert_eq!(sync_epochs(5, 1, 4), 5);
        assert_eq!(sync_epochs(1, 5, 4), 1);
    }

    #[test]
    fn phases_split_the_segments_into_groups_whose_windows_end_apart() {
        let segments = some_segments(5_000);
        let mut per_phase = std::collections::BTreeMap::new();
        for segment in &segments {
            *per_phase
                .entry(window_phase(*segment, 25, 5))
                .or_insert(0usize) += 1;
        }
        // five groups, 5 epochs apart, about 1,000 segments each
        assert_eq!(
            per_phase.keys().copied().collect::<Vec<_>>(),
            [0, 5, 10, 15, 20]
        );
        assert!(
            per_phase.values().all(|n| (800..1200).contains(n)),
            "{per_phase:?}"
        );
        // one group: every segment's window ends together, at multiples of K
        let together = MarketWindow {
            epochs: 25,
            phases: 1,
            windows_per_sync: 4,
            rebuild_time: 0,
        };
        for segment in &segments {
            assert_eq!(together.visible_at(*segment, 26), 50);
        }
    }
}
