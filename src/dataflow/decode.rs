//! Decode and validate: raw bytes to a typed change event, or a dead letter
//! with the reason.
//!
//! # Rules
//! - The record is a UTF-8 JSON object no longer than the binding's limit.
//! - Envelope: key (string or integer), version (integer >= 0), event time
//!   (integer Unix seconds), kind (one of the topology's kinds).
//! - Declared fields must have their declared type, range and allowed values;
//!   `null` counts as absent. Undeclared fields are ignored, so producers can
//!   add fields before the topology uses them.
//! - A `complete` kind must carry every required field; `requires` fields must
//!   be present.

use rustc_hash::FxHashMap;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::borrow::Cow;

use crate::record::{DeadLetter, RawRecord, SourcePosition, Value};
use crate::topology::{FieldType, Plan};

/// Slots of the values decode reads: the envelope's four, then the declared
/// fields in order.
const KEY: usize = 0;
const VERSION: usize = 1;
const EVENT_TIME: usize = 2;
const KIND: usize = 3;
const FIELDS: usize = 4;

/// Which slots each name a record may carry fills, and what each kind needs.
pub struct Slots {
    by_name: NameTable,
    count: usize,
    /// Per kind: the fields a record of it must carry (every required field
    /// for a `complete` kind, and its `requires`), in field order. Checked
    /// for every record: filtering every field by the kind's rules, with a
    /// list collected each time, was 1.1% of a run.
    needed_by_kind: Vec<Vec<usize>>,
}

impl Slots {
    pub fn new(plan: &Plan) -> Self {
        let mut by_name: FxHashMap<String, Vec<usize>> = FxHashMap::default();
        let envelope = [
            &plan.key_field,
            &plan.version_field,
            &plan.event_time_field,
            &plan.kind_field,
        ];
        let names = envelope
            .into_iter()
            .chain(plan.fields.iter().map(|field| &field.name));
        let mut count = 0;
        for (slot, name) in names.enumerate() {
            by_name.entry(name.clone()).or_default().push(slot);
            count = slot + 1;
        }
        let needed_by_kind = plan
            .kinds
            .iter()
            .map(|kind| {
                (0..plan.fields.len())
                    .filter(|i| {
                        (kind.complete && plan.fields[*i].required) || kind.requires.contains(i)
                    })
                    .collect()
            })
            .collect();
        Slots {
            by_name: NameTable::new(by_name),
            count,
            needed_by_kind,
        }
    }

    /// The values of a JSON object's names, by slot. The fast path reads
    /// the record once and keeps only the values of names it knows (an
    /// owned JSON tree of every key cost a third of decoding); on any error
    /// the caller parses the ordinary way, which says what is wrong.
    /// Reads from text already checked to be UTF-8: a slice reader would check
    /// every string again.
    fn read<'a>(&self, text: &'a str) -> Option<Vec<Option<Slot<'a>>>> {
        self.read_flat(text).or_else(|| self.read_any(text))
    }

    /// Any JSON object, through serde_json.
    fn read_any<'a>(&self, text: &'a str) -> Option<Vec<Option<Slot<'a>>>> {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let values = (&mut SlotsSeed(self)).deserialize(&mut deserializer).ok()?;
        deserializer.end().ok()?;
        Some(values)
    }

    /// The usual record, read by hand: one flat object whose names and
    /// strings have no escapes and whose numbers are integers of up to 18
    /// digits. Anything else (an escape, a control character, a fraction or
    /// an exponent, `-0`, a longer integer, an array or object, malformed
    /// text) gives `None`, and serde_json reads the record as before (such a
    /// record pays for both). On the records it takes it gives what
    /// serde_json gives; a test compares the two. Callgrind, first 100,000
    /// events of the generated stream: serde's visitors took about 5,800
    /// instructions per event, this about 4,600 (decoding as a whole, with
    /// validation, 9,100 -> 7,900; the full pipeline 1.7% fewer).
    fn read_flat<'a>(&self, text: &'a str) -> Option<Vec<Option<Slot<'a>>>> {
        let bytes = text.as_bytes();
        let mut at = skip_whitespace(bytes, 0);
        if bytes.get(at) != Some(&b'{') {
            return None;
        }
        at = skip_whitespace(bytes, at + 1);
        let mut values = none_slots(self.count);
        if bytes.get(at) == Some(&b'}') {
            at += 1;
        } else {
            loop {
                let (name, next) = plain_string(text, at)?;
                at = skip_whitespace(bytes, next);
                if bytes.get(at) != Some(&b':') {
                    return None;
                }
                let (value, next) = flat_value(text, skip_whitespace(bytes, at + 1))?;
                // a repeated name keeps its last value, as a parsed object does
                if let Some(slots) = self.by_name.get(name.as_bytes()) {
                    place(&mut values, slots, value);
                }
                at = skip_whitespace(bytes, next);
                match bytes.get(at) {
                    Some(b',') => at = skip_whitespace(bytes, at + 1),
                    Some(b'}') => {
                        at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        (skip_whitespace(bytes, at) == bytes.len()).then_some(values)
    }

    fn of_object(&self, object: serde_json::Map<String, Json>) -> Vec<Option<Slot<'static>>> {
        let mut values = none_slots(self.count);
        for (name, value) in object {
            if let Some(slots) = self.by_name.get(name.as_bytes()) {
                let value = match value {
                    Json::String(text) => Slot::Str(Cow::Owned(text)),
                    other => Slot::Json(other),
                };
                place(&mut values, slots, value);
            }
        }
        values
    }
}

/// The slots of each name a record may carry, found without hashing the
/// name: a record's names are looked up one by one (about twenty per record),
/// and a hash map's hashing, not inlined, and its probe cost more than this
/// table's index (the name's length and its first and last bytes) and one
/// comparison. Names that share an index share a short list.
struct NameTable {
    buckets: Vec<Vec<NamedSlots>>,
}

/// A name's bytes and the slots it fills.
type NamedSlots = (Box<[u8]>, Vec<usize>);

impl NameTable {
    const BUCKETS: usize = 256;

    fn new(by_name: FxHashMap<String, Vec<usize>>) -> Self {
        let mut buckets: Vec<Vec<NamedSlots>> = vec![Vec::new(); Self::BUCKETS];
        let mut names: Vec<(String, Vec<usize>)> = by_name.into_iter().collect();
        names.sort();
        for (name, slots) in names {
            buckets[Self::index(name.as_bytes())]
                .push((name.into_bytes().into_boxed_slice(), slots));
        }
        NameTable { buckets }
    }

    #[inline(always)]
    fn index(name: &[u8]) -> usize {
        match name {
            [] => 0,
            [first, .., last] | [first @ last] => {
                (name.len() * 37 + *first as usize * 7 + *last as usize) % Self::BUCKETS
            }
        }
    }

    #[inline(always)]
    fn get(&self, name: &[u8]) -> Option<&[usize]> {
        self.buckets[Self::index(name)]
            .iter()
            .find(|(candidate, _)| **candidate == *name)
            .map(|(_, slots)| slots.as_slice())
    }
}

/// `count` empty slots. Not `vec![None; count]`: that clones its element into
/// each slot through `Slot`'s `Clone` (87 million instructions per 200k
/// events), where an empty slot needs only its tag written.
fn none_slots<'a>(count: usize) -> Vec<Option<Slot<'a>>> {
    (0..count).map(|_| None).collect()
}

/// Puts a name's value in each of its slots (a name may fill several: a
/// field that is also the key), moved into the last.
#[inline(always)]
fn place<'a>(values: &mut [Option<Slot<'a>>], slots: &[usize], value: Slot<'a>) {
    if let Some((last, others)) = slots.split_last() {
        for slot in others {
            values[*slot] = Some(value.clone());
        }
        values[*last] = Some(value);
    }
}

/// The first byte at or after `at` that is not JSON whitespace.
fn skip_whitespace(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(at) {
        at += 1;
    }
    at
}

/// A string starting at `at` (its opening quote) with neither escapes nor
/// control characters (which JSON forbids unescaped), and where it ends.
#[inline(always)]
fn plain_string(text: &str, at: usize) -> Option<(&str, usize)> {
    let bytes = text.as_bytes();
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let start = at + 1;
    let end = crate::scan::string_stop(bytes, start)?;
    // (quotes are ASCII: both ends are character boundaries)
    (bytes[end] == b'"').then(|| (&text[start..end], end + 1))
}

/// A string, an integer of up to 18 digits, `true`, `false` or `null`
/// starting at `at`, as serde_json's value gives it, and where it ends.
fn flat_value(text: &str, at: usize) -> Option<(Slot<'_>, usize)> {
    let bytes = text.as_bytes();
    let literal = |word: &[u8], value: Json| {
        bytes[at..]
            .starts_with(word)
            .then(|| (Slot::Json(value), at + word.len()))
    };
    match *bytes.get(at)? {
        b'"' => plain_string(text, at).map(|(text, end)| (Slot::Str(Cow::Borrowed(text)), end)),
        b't' => literal(b"true", Json::Bool(true)),
        b'f' => literal(b"false", Json::Bool(false)),
        b'n' => literal(b"null", Json::Null),
        b'-' | b'0'..=b'9' => {
            let negative = bytes[at] == b'-';
            let start = at + negative as usize;
            // the value is read with the digits (18 of them fit a u64
            // without overflow; with more, this reader gives up below and
            // serde_json reads the record)
            let mut magnitude: u64 = 0;
            let mut end = start;
            while let Some(digit @ b'0'..=b'9') = bytes.get(end) {
                magnitude = magnitude
                    .wrapping_mul(10)
                    .wrapping_add((digit - b'0') as u64);
                end += 1;
            }
            let digits = end - start;
            // JSON has no leading zeros; a fraction or an exponent makes a
            // float, and serde_json makes `-0` one too
            let leading_zero = digits > 1 && bytes[start] == b'0';
            let float = matches!(bytes.get(end), Some(b'.' | b'e' | b'E'));
            if digits == 0 || digits > 18 || leading_zero || float {
                return None;
            }
            let number = match (negative, magnitude) {
                (false, _) => serde_json::Number::from(magnitude),
                (true, 0) => return None,
                (true, _) => serde_json::Number::from(-(magnitude as i64)),
            };
            Some((Slot::Json(Json::Number(number)), end))
        }
        _ => None,
    }
}

struct SlotsSeed<'a>(&'a Slots);

impl<'de> DeserializeSeed<'de> for &mut SlotsSeed<'_> {
    type Value = Vec<Option<Slot<'de>>>;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for &mut SlotsSeed<'_> {
    type Value = Vec<Option<Slot<'de>>>;
    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = none_slots(self.0.count);
        while let Some(slots) = map.next_key_seed(NameSeed(self.0))? {
            match slots {
                // a repeated name keeps its last value, as a parsed object does
                Some([slot]) => values[*slot] = Some(map.next_value::<Slot>()?),
                Some(slots) => {
                    let value: Slot = map.next_value()?;
                    for slot in slots {
                        values[*slot] = Some(value.clone());
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(values)
    }
}

/// A value as the record spells it. A string borrows the record's text when
/// it has no escapes: read as serde_json's own value, every string was a
/// `String` allocated, copied into the field's `SmolStr` and freed. Without
/// them (callgrind, first 100,000 events, 1 worker): core topology 2.4%
/// fewer instructions, pass-through 4.1%. Anything else is serde_json's
/// value, as it was.
#[derive(Clone, Debug, PartialEq)]
enum Slot<'a> {
    Str(Cow<'a, str>),
    Json(Json),
}

impl Slot<'_> {
    /// serde_json's value, for the messages that show it.
    fn to_json(&self) -> Json {
        match self {
            Slot::Str(text) => Json::String(text.to_string()),
            Slot::Json(json) => json.clone(),
        }
    }
}

impl<'de> Deserialize<'de> for Slot<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SlotVisitor)
    }
}

/// Makes what serde_json's value makes, but keeps strings borrowed.
struct SlotVisitor;

impl<'de> Visitor<'de> for SlotVisitor {
    type Value = Slot<'de>;
    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }
    fn visit_bool<E>(self, value: bool) -> Result<Self::Value, E> {
        Ok(Slot::Json(Json::Bool(value)))
    }
    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(Slot::Json(Json::Number(value.into())))
    }
    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(Slot::Json(Json::Number(value.into())))
    }
    fn visit_f64<E>(self, value: f64) -> Result<Self::Value, E> {
        Ok(Slot::Json(
            serde_json::Number::from_f64(value).map_or(Json::Null, Json::Number),
        ))
    }
    fn visit_borrowed_str<E>(self, value: &'de str) -> Result<Self::Value, E> {
        Ok(Slot::Str(Cow::Borrowed(value)))
    }
    fn visit_str<E>(self, value: &str) -> Result<Self::Value, E> {
        Ok(Slot::Str(Cow::Owned(value.to_owned())))
    }
    fn visit_string<E>(self, value: String) -> Result<Self::Value, E> {
        Ok(Slot::Str(Cow::Owned(value)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Slot::Json(Json::Null))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Slot::Json(Json::Null))
    }
    fn visit_some<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        Slot::deserialize(deserializer)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Json::deserialize(SeqAccessDeserializer::new(seq)).map(Slot::Json)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        Json::deserialize(MapAccessDeserializer::new(map)).map(Slot::Json)
    }
}

struct NameSeed<'a>(&'a Slots);

impl<'de, 'a> DeserializeSeed<'de> for NameSeed<'a> {
    type Value = Option<&'a [usize]>;
    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de, 'a> Visitor<'de> for NameSeed<'a> {
    type Value = Option<&'a [usize]>;
    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a name")
    }
    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
        Ok(self.0.by_name.get(name.as_bytes()))
    }
}

/// A validated listing change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeEvent {
    pub key: String,
    pub version: u64,
    pub event_time: i64,
    pub kind: usize,
    /// By field index; `None` when absent.
    pub fields: Vec<Option<Value>>,
    /// Kept for a later stage's dead letter (e.g. an update for an unknown listing).
    pub bytes: Vec<u8>,
    pub position: SourcePosition,
    pub read_at_nanos: u64,
}

pub const STAGE: &str = "decode";

/// Decodes one record.
#[expect(
    clippy::result_large_err,
    reason = "the dead letter is the error: the record's bytes and position, moved once to its sink; boxing it would allocate for every bad record"
)]
pub fn decode(
    plan: &Plan,
    slots: &Slots,
    max_record_bytes: usize,
    raw: RawRecord,
) -> Result<ChangeEvent, DeadLetter> {
    let fail = |raw: RawRecord, reason: &str, detail: String| DeadLetter {
        bytes: raw.bytes,
        position: raw.position,
        reason: reason.to_string(),
        detail,
        stage: STAGE.to_string(),
        read_at_nanos: raw.read_at_nanos,
    };
    if raw.bytes.len() > max_record_bytes {
        let detail = format!("{} bytes, the limit is {max_record_bytes}", raw.bytes.len());
        return Err(fail(raw, "record_too_large", detail));
    }
    let text = match std::str::from_utf8(&raw.bytes) {
        Ok(text) => text,
        Err(error) => {
            return Err(fail(
                raw,
                "not_utf8",
                format!("invalid UTF-8 at byte {}", error.valid_up_to()),
            ));
        }
    };
    let values = match slots.read(text) {
        Some(values) => values,
        None => match serde_json::from_slice::<Json>(&raw.bytes) {
            Ok(Json::Object(object)) => slots.of_object(object),
            Ok(other) => {
                return Err(fail(
                    raw,
                    "not_an_object",
                    format!("a JSON {} instead of an object", json_type(&other)),
                ));
            }
            Err(error) => return Err(fail(raw, "invalid_json", error.to_string())),
        },
    };
    match validate(plan, slots, values) {
        Ok(valid) => Ok(ChangeEvent {
            key: valid.key,
            version: valid.version,
            event_time: valid.event_time,
            kind: valid.kind,
            fields: valid.fields,
            bytes: raw.bytes,
            position: raw.position,
            read_at_nanos: raw.read_at_nanos,
        }),
        Err((reason, detail)) => Err(fail(raw, reason, detail)),
    }
}

/// What a record's values make of it, before it takes its bytes and position.
struct Valid {
    key: String,
    version: u64,
    event_time: i64,
    kind: usize,
    fields: Vec<Option<Value>>,
}

/// The envelope and field rules; an error is a dead letter's reason and detail.
fn validate(
    plan: &Plan,
    slots: &Slots,
    values: Vec<Option<Slot<'_>>>,
) -> Result<Valid, (&'static str, String)> {
    let key = match values[KEY].as_ref() {
        Some(Slot::Str(s)) if !s.is_empty() => s.to_string(),
        Some(Slot::Json(Json::Number(n))) if n.is_i64() || n.is_u64() => n.to_string(),
        None | Some(Slot::Json(Json::Null)) => {
            return Err(("missing_key", format!("no `{}`", plan.key_field)));
        }
        Some(other) => {
            return Err((
                "bad_key",
                format!(
                    "`{}` is {}; a non-empty string or an integer is expected",
                    plan.key_field,
                    describe(other)
                ),
            ));
        }
    };
    let version = match values[VERSION].as_ref() {
        // the low 32 bits of a document version are the revision, and it must fit an i64
        Some(Slot::Json(Json::Number(n)))
            if n.as_u64()
                .is_some_and(|v| v > crate::dataflow::evaluate::MAX_LISTING_VERSION) =>
        {
            let detail = format!(
                "`{}` is {n}; at most 2^31 - 1 (document versions are version << 32 | revision, a signed 64-bit number)",
                plan.version_field
            );
            return Err(("bad_version", detail));
        }
        Some(Slot::Json(Json::Number(n))) if n.is_u64() => n.as_u64().unwrap(),
        None | Some(Slot::Json(Json::Null)) => {
            return Err(("missing_version", format!("no `{}`", plan.version_field)));
        }
        Some(other) => {
            return Err((
                "bad_version",
                format!(
                    "`{}` is {}; a non-negative integer is expected",
                    plan.version_field,
                    describe(other)
                ),
            ));
        }
    };
    let event_time = match values[EVENT_TIME].as_ref() {
        Some(Slot::Json(Json::Number(n))) if n.is_i64() => n.as_i64().unwrap(),
        None | Some(Slot::Json(Json::Null)) => {
            return Err((
                "missing_event_time",
                format!("no `{}`", plan.event_time_field),
            ));
        }
        Some(other) => {
            return Err((
                "bad_event_time",
                format!(
                    "`{}` is {}; integer Unix seconds are expected",
                    plan.event_time_field,
                    describe(other)
                ),
            ));
        }
    };
    let kind = match values[KIND].as_ref() {
        Some(Slot::Str(s)) => match plan.kinds.iter().position(|k| k.name == **s) {
            Some(kind) => kind,
            None => {
                let known: Vec<&str> = plan.kinds.iter().map(|k| k.name.as_str()).collect();
                return Err((
                    "unknown_kind",
                    format!("kind `{s}` is not one of {}", known.join(", ")),
                ));
            }
        },
        None | Some(Slot::Json(Json::Null)) => {
            return Err(("missing_kind", format!("no `{}`", plan.kind_field)));
        }
        Some(other) => {
            return Err((
                "unknown_kind",
                format!(
                    "`{}` is {}; a string is expected",
                    plan.kind_field,
                    describe(other)
                ),
            ));
        }
    };
    let mut fields = Vec::with_capacity(plan.fields.len());
    for (index, field) in plan.fields.iter().enumerate() {
        let value = match values[FIELDS + index].as_ref() {
            None | Some(Slot::Json(Json::Null)) => None,
            Some(slot) => {
                let value = match (field.field_type, slot) {
                    (FieldType::String, Slot::Str(s)) => Value::Str(smol_str::SmolStr::new(s)),
                    (FieldType::Integer, Slot::Json(Json::Number(n))) if n.is_i64() => {
                        Value::Int(n.as_i64().unwrap())
                    }
                    (FieldType::Number, Slot::Json(Json::Number(n))) => match n.as_i64() {
                        Some(i) => Value::Int(i),
                        None => Value::Num(n.as_f64().unwrap_or(f64::NAN)),
                    },
                    (expected, other) => {
                        let detail = format!(
                            "field `{}` is {}; {} expected",
                            field.name,
                            describe(other),
                            type_name(expected)
                        );
                        return Err(("wrong_type", detail));
                    }
                };
                if let Some(number) = value.as_f64()
                    && (!number.is_finite()
                        || field.min.is_some_and(|min| number < min)
                        || field.max.is_some_and(|max| number > max))
                {
                    let detail = format!(
                        "field `{}` is {number}, outside [{}, {}]",
                        field.name,
                        field.min.map(|m| m.to_string()).unwrap_or("-inf".into()),
                        field.max.map(|m| m.to_string()).unwrap_or("inf".into())
                    );
                    return Err(("out_of_range", detail));
                }
                if let (Some(allowed), Value::Str(text)) = (&field.allowed, &value)
                    && !allowed.contains(text.as_str())
                {
                    let mut allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
                    allowed.sort();
                    let detail = format!(
                        "field `{}` is {text:?}, not one of {}",
                        field.name,
                        allowed.join(", ")
                    );
                    return Err(("not_allowed", detail));
                }
                Some(value)
            }
        };
        fields.push(value);
    }
    let needed = &slots.needed_by_kind[kind];
    if needed.iter().any(|i| fields[*i].is_none()) {
        let missing: Vec<&str> = needed
            .iter()
            .filter(|i| fields[**i].is_none())
            .map(|i| plan.fields[*i].name.as_str())
            .collect();
        let detail = format!(
            "kind `{}` needs {}",
            plan.kinds[kind].name,
            missing.join(", ")
        );
        return Err(("missing_required", detail));
    }
    Ok(Valid {
        key,
        version,
        event_time,
        kind,
        fields,
    })
}

fn json_type(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

fn describe(slot: &Slot) -> String {
    let value = slot.to_json();
    let text = value.to_string();
    let text = if text.len() > 40 {
        format!(
            "{}…",
            &text[..text
                .char_indices()
                .take_while(|(i, _)| *i < 40)
                .last()
                .map(|(i, c)| i + c.len_utf8())
                .unwrap_or(0)]
        )
    } else {
        text
    };
    format!("a {} ({text})", json_type(&value))
}

fn type_name(field_type: FieldType) -> &'static str {
    match field_type {
        FieldType::String => "a string",
        FieldType::Integer => "an integer",
        FieldType::Number => "a number",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// What `validate` made of a record, in a form two results compare by.
    fn outcome(plan: &Plan, slots: &Slots, values: Vec<Option<Slot<'_>>>) -> String {
        match validate(plan, slots, values) {
            Ok(valid) => format!(
                "ok {} {} {} {} {:?}",
                valid.key, valid.version, valid.event_time, valid.kind, valid.fields
            ),
            Err((reason, detail)) => format!("error {reason}: {detail}"),
        }
    }

    #[test]
    fn the_name_table_finds_each_name_and_nothing_else() {
        // "axb" and "ayb" share an index (length, first and last byte)
        let names = ["axb", "ayb", "a", "", "listing_id", "price", "prices"];
        let by_name: FxHashMap<String, Vec<usize>> = names
            .iter()
            .enumerate()
            .map(|(slot, name)| (name.to_string(), vec![slot, slot + 100]))
            .collect();
        let table = NameTable::new(by_name);
        assert_eq!(NameTable::index(b"axb"), NameTable::index(b"ayb"));
        for (slot, name) in names.iter().enumerate() {
            assert_eq!(
                table.get(name.as_bytes()),
                Some(&[slot, slot + 100][..]),
                "{name}"
            );
        }
        for unknown in ["azb", "b", "listing_iD", "pric", "price ", "é"] {
            assert_eq!(table.get(unknown.as_bytes()), None, "{unknown}");
        }
    }

    /// A record that lacks fields its kind needs names every one of them, in
    /// field order, as the rule reads: a `complete` kind needs every required
    /// field, and any kind its `requires`. The oracle applies the rule to
    /// every field, as decode did before the needed fields were listed once.
    #[test]
    fn a_record_missing_needed_fields_names_each_of_them() {
        let topology = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/listings.toml");
        let plan = crate::topology::load(&topology).unwrap_or_else(|d| panic!("{d:?}"));
        let slots = Slots::new(&plan);
        let oracle = |kind: &str, present: &[&str]| -> Option<String> {
            let kind_plan = plan.kinds.iter().find(|k| k.name == kind).unwrap();
            let missing: Vec<&str> = plan
                .fields
                .iter()
                .enumerate()
                .filter(|(i, f)| {
                    !present.contains(&f.name.as_str())
                        && ((kind_plan.complete && f.required) || kind_plan.requires.contains(i))
                })
                .map(|(_, f)| f.name.as_str())
                .collect();
            (!missing.is_empty()).then(|| {
                format!(
                    "error missing_required: kind `{kind}` needs {}",
                    missing.join(", ")
                )
            })
        };
        let values = [
            ("price", "20000"),
            ("model", "\"c-class\""),
            ("year", "2015"),
        ];
        let mut checked = 0;
        for kind in ["create", "price_change", "edit"] {
            // every subset of the three required fields
            for mask in 0..8 {
                let present: Vec<&str> = (0..3)
                    .filter(|bit| mask & (1 << bit) != 0)
                    .map(|bit| values[bit].0)
                    .collect();
                let mut record = format!(
                    r#"{{"kind":"{kind}","listing_id":"a-1","version":3,"event_time":1640995200"#
                );
                for (name, value) in values.iter().filter(|(name, _)| present.contains(name)) {
                    record.push_str(&format!(r#","{name}":{value}"#));
                }
                record.push('}');
                let outcome = outcome(&plan, &slots, slots.read(&record).unwrap());
                match oracle(kind, &present) {
                    Some(expected) => assert_eq!(outcome, expected, "{record}"),
                    None => assert!(outcome.starts_with("ok "), "{record}: {outcome}"),
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 24);
        // the create with nothing names all three
        assert!(
            oracle("create", &[])
                .unwrap()
                .ends_with("needs price, model, year")
        );
    }

    /// The hand reader takes the usual record and gives what serde_json
    /// gives; anything unusual it leaves to serde_json.
    #[test]
    fn the_flat_reader_gives_what_serde_json_gives_or_leaves_the_record_to_it() {
        let topology = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/listings.toml");
        let plan = crate::topology::load(&topology).unwrap_or_else(|d| panic!("{d:?}"));
        let slots = Slots::new(&plan);
        let sample = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("topologies/listings/data/listing_changes.jsonl"),
        )
        .unwrap();
        let envelope = r#""kind":"create","listing_id":"a-1","version":3,"event_time":1640995200"#;
        let mut records: Vec<String> = sample.lines().map(str::to_string).collect();
        let taken_by_hand = |records: &[String]| {
            records
                .iter()
                .filter(|record| slots.read_flat(record).is_some())
                .count()
        };
        // every line of the sample is the usual record
        assert_eq!(taken_by_hand(&records), records.len());
        for value in [
            "0",
            "-7",
            "7",
            "999999999999999999",
            "-999999999999999999",
            "1000000000000000000",
            "-0",
            "01",
            "-01",
            "1.5",
            "1e5",
            "1E5",
            "-",
            "true",
            "false",
            "null",
            "tru",
            "nul",
            "truex",
            r#""""#,
            r#""a b""#,
            r#""é 🚗""#,
            r#""c-\u0063lass""#,
            r#""tab\there""#,
            "\"tab\there\"",
            "\"new\nline\"",
            "[1]",
            "{}",
            r#"{"a":1}"#,
            "",
            "\"open",
        ] {
            for name in ["listing_id", "version", "price", "model", "ignored"] {
                records.push(format!("{{{envelope},\"{name}\":{value}}}"));
                records.push(format!("{{ \"{name}\" : {value} ,\t{envelope}\n}}"));
            }
        }
        records.extend(
            [
                "{}",
                " { } ",
                "{",
                "}",
                "[]",
                "",
                r#"{"a":1,}"#,
                r#"{"a":1}x"#,
                r#"{"a":1} {"b":2}"#,
                r#"{"a" 1}"#,
                r#"{"a":1 "b":2}"#,
                r#"{"li\u0073ting_id":"x"}"#,
                "{\"a\":1}\r\n",
                r#"{"model":"amg","model":"e-class"}"#,
            ]
            .map(str::to_string),
        );
        let by_hand = taken_by_hand(&records);
        assert!(by_hand > sample.lines().count() + 100, "{by_hand}");
        assert!(by_hand < records.len(), "every record was taken by hand");
        for record in &records {
            if let Some(flat) = slots.read_flat(record) {
                assert_eq!(Some(flat), slots.read_any(record), "record: {record}");
            }
        }
    }

    /// The fast reader (strings borrowed from the record) against the
    /// reference, serde_json's parsed object: on records that exercise
    /// escapes, every kind of JSON value in every slot, repeated names and
    /// names decode ignores, both give the same event or the same dead
    /// letter, to the byte of its message.
    #[test]
    fn the_fast_reader_reads_what_a_parsed_object_holds() {
        let topology = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/listings.toml");
        let plan = crate::topology::load(&topology).unwrap_or_else(|d| panic!("{d:?}"));
        let slots = Slots::new(&plan);
        let envelope = r#""kind":"create","listing_id":"a-1","version":3,"event_time":1640995200"#;
        let fields = r#""price":20000,"model":"c-class","year":2015"#;
        let values = [
            r#""plain""#,
            r#""c-\u0063lass""#,
            r#""tab\tand \"quotes\" and \\ and \/""#,
            r#""caf\u00e9 \ud83d\ude97""#,
            r#""unicode é 🚗""#,
            r#""""#,
            "null",
            "true",
            "false",
            "0",
            "-7",
            "12.5",
            "1e3",
            "-0.0",
            "18446744073709551615",
            "18446744073709551616",
            "[1,\"two\",[3]]",
            r#"{"nested":{"a":[null,"b\n"]}}"#,
            "[]",
            "{}",
        ];
        let mut records: Vec<String> = Vec::new();
        for value in values {
            // the value in each envelope slot, in a string field, a number
            // field, an integer field, and a name decode ignores
            for name in [
                "listing_id",
                "version",
                "event_time",
                "kind",
                "model",
                "price",
                "year",
                "condition",
                "unknown_name",
            ] {
                records.push(format!("{{{envelope},{fields},\"{name}\":{value}}}"));
                records.push(format!("{{\"{name}\":{value},{envelope},{fields}}}"));
            }
        }
        // repeated names keep the last value; the key may be an integer
        records.push(format!(
            r#"{{{envelope},{fields},"model":"amg","model":"e-class"}}"#
        ));
        records.push(
            r#"{"kind":"edit","listing_id":12345678901,"version":4,"event_time":1640995300,"odometer":5}"#
                .to_string(),
        );
        let mut compared = 0;
        for record in &records {
            let fast = slots
                .read(record)
                .unwrap_or_else(|| panic!("not read: {record}"));
            let Json::Object(object) = serde_json::from_str::<Json>(record).unwrap() else {
                panic!("not an object: {record}")
            };
            let reference = slots.of_object(object);
            assert_eq!(
                outcome(&plan, &slots, fast),
                outcome(&plan, &slots, reference),
                "record: {record}"
            );
            compared += 1;
        }
        assert_eq!(compared, values.len() * 18 + 2);
    }
}
