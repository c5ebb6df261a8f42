//! Output shaping: derived values, bands, rounding, field selection, JSON.
//!
//! The document is written field by field in the topology's order, so the
//! same input always gives the same bytes. Missing values are left out.

use std::fmt::Write as _;

use smallvec::SmallVec;

use crate::dataflow::listing_state::Enriched;
use crate::dataflow::market::lookup_value;
use crate::features;
use crate::model::LoadedModel;
use crate::record::Value;
use crate::topology::{Function, Plan, ValueRef};

/// A value being shaped.
enum Shaped<'a> {
    Number(f64),
    Integer(i64),
    Text(&'a str),
    /// The whole field, prefix and quoted label, written once (a band's).
    Labelled(&'a str),
    /// A number rounded to a decimal step and not whole: units of its last
    /// decimal place, and the places.
    Decimal(i64, u32),
}

/// One output field, resolved when the shaper is made.
struct FieldWriter {
    /// `,"name":`
    prefix: String,
    /// `,"name":"`: a string that needs no escaping follows it, one copy
    /// fewer per string field
    prefix_and_quote: String,
    /// For a band: `,"name":"label"` for each label (steps', then
    /// `otherwise`), quoted and escaped once; a label is copied, never scanned.
    labelled: Vec<String>,
    source: ValueRef,
    rounding: Option<features::Rounding>,
}

/// What every document of a topology writes the same way, escaped once:
/// the envelope's keys, each output field's `,"name":` and the models' tail.
pub struct Shaper {
    key_prefix: String,
    version_prefix: String,
    event_time_prefix: String,
    /// Each output field's `,"name":` and how its value is written, in order.
    fields: Vec<FieldWriter>,
    /// `,"scored_by":{...}}`, or `}` without models.
    tail: String,
    /// The longest document so far (capped), to size the next one's buffer:
    /// documents of a topology are about the same length, and growing a
    /// buffer past a guess copied each one once more.
    longest_document: std::cell::Cell<usize>,
}

impl Shaper {
    pub fn new(plan: &Plan, models: &[LoadedModel]) -> Self {
        let prefix = |lead: &str, name: &str| {
            let mut out = String::from(lead);
            write_key(&mut out, name);
            out
        };
        let mut tail = String::new();
        if !models.is_empty() {
            tail.push_str(",\"scored_by\":{");
            for (i, model) in models.iter().enumerate() {
                if i > 0 {
                    tail.push(',');
                }
                write_key(&mut tail, &model.name);
                write_string(&mut tail, &model.version);
            }
            tail.push('}');
        }
        tail.push('}');
        Shaper {
            key_prefix: prefix("{", &plan.key_field),
            version_prefix: prefix(",", &plan.version_field),
            event_time_prefix: prefix(",", &plan.event_time_field),
            fields: plan
                .output_fields
                .iter()
                .map(|field| {
                    let prefix = prefix(",", &field.name);
                    let labelled = match field.source {
                        ValueRef::Band(band) => {
                            let band = &plan.bands[band];
                            let labels = band.steps.iter().map(|(_, label)| label);
                            labels
                                .chain([&band.otherwise])
                                .map(|label| {
                                    let mut labelled = prefix.clone();
                                    write_string(&mut labelled, label);
                                    labelled
                                })
                                .collect()
                        }
                        _ => Vec::new(),
                    };
                    FieldWriter {
                        prefix_and_quote: format!("{prefix}\""),
                        prefix,
                        labelled,
                        source: field.source,
                        rounding: field.round_to,
                    }
                })
                .collect(),
            tail,
            longest_document: std::cell::Cell::new(512),
        }
    }
}

/// The JSON document for a live listing, and the byte offset where its output
/// fields start: the envelope before it (key, version, event time) is not
/// what the change gate compares.
pub fn document_body(
    shaper: &Shaper,
    plan: &Plan,
    row: &Enriched,
    model_values: &[&[f32]],
) -> (String, usize) {
    let mut derived: SmallVec<[Option<f64>; 8]> = SmallVec::with_capacity(plan.derived.len());
    for value in &plan.derived {
        let number =
            |r: ValueRef, derived: &[Option<f64>]| numeric(plan, r, row, model_values, derived);
        derived.push(match &value.function {
            Function::Ratio {
                numerator,
                denominator,
                min_denominator,
            } => features::ratio(
                number(*numerator, &derived),
                number(*denominator, &derived),
                *min_denominator,
            ),
            Function::YearsSince { field } => {
                features::years_since(number(*field, &derived), row.event_time)
            }
            // state functions are features; compile keeps derived values to pure ones
            _ => None,
        });
    }
    let mut out = String::with_capacity(shaper.longest_document.get());
    out.push_str(&shaper.key_prefix);
    write_string(&mut out, &row.key);
    out.push_str(&shaper.version_prefix);
    write_integer(&mut out, row.version as i64);
    out.push_str(&shaper.event_time_prefix);
    write_integer(&mut out, row.event_time);
    let gate_start = out.len();
    for field in &shaper.fields {
        let value = match field.source {
            ValueRef::Lookup(i) => match lookup_value(plan, i, &row.state.fields, &mut false) {
                Some(Value::Str(s)) => Some(Shaped::Text(s)),
                Some(Value::Int(v)) => Some(Shaped::Integer(*v)),
                Some(Value::Num(v)) => Some(Shaped::Number(*v)),
                None => None,
            },
            ValueRef::Field(i) => match &row.state.fields[i] {
                Some(Value::Str(s)) => Some(Shaped::Text(s)),
                Some(Value::Int(v)) => Some(Shaped::Integer(*v)),
                Some(Value::Num(v)) => Some(Shaped::Number(*v)),
                None => None,
            },
            // a band is shown once, so its label is found here, not up front
            ValueRef::Band(i) => {
                let band = &plan.bands[i];
                numeric(plan, band.source, row, model_values, &derived).map(|value| {
                    Shaped::Labelled(&field.labelled[features::band_index(value, &band.steps)])
                })
            }
            other => numeric(plan, other, row, model_values, &derived).map(Shaped::Number),
        };
        let Some(value) = value else { continue };
        let value = match (value, field.rounding) {
            (Shaped::Number(v), Some(rounding)) => {
                let rounded = rounding.apply(v);
                // a whole step gives whole numbers: integers below 9e15
                if let Some(whole) = features::as_whole(rounded) {
                    Shaped::Integer(whole)
                } else if let Some((units, places)) = rounding
                    .decimal_units(rounded)
                    .zip(rounding.decimal_places())
                {
                    Shaped::Decimal(units, places)
                } else {
                    Shaped::Number(rounded)
                }
            }
            // (steps are positive, checked at compile: a whole one is >= 1)
            (Shaped::Integer(v), Some(rounding)) if rounding.whole_step() => {
                Shaped::Integer(rounding.apply(v as f64) as i64)
            }
            (value, _) => value,
        };
        match value {
            Shaped::Text(s) if !needs_escape(s) => {
                out.reserve(field.prefix_and_quote.len() + s.len() + 1);
                out.push_str(&field.prefix_and_quote);
                out.push_str(s);
                out.push('"');
            }
            Shaped::Labelled(s) => out.push_str(s),
            value => {
                out.push_str(&field.prefix);
                match value {
                    Shaped::Text(s) => write_string(&mut out, s),
                    Shaped::Integer(v) => write_integer(&mut out, v),
                    Shaped::Decimal(units, places) => write_decimal(&mut out, units, places),
                    // whole numbers print as integers: counts and ages read as 3, not 3.0
                    Shaped::Number(v) => match features::as_whole(v) {
                        Some(whole) => write_integer(&mut out, whole),
                        None => write_float(&mut out, v),
                    },
                    Shaped::Labelled(_) => unreachable!("written above"),
                }
            }
        }
    }
    out.push_str(&shaper.tail);
    if out.len() > shaper.longest_document.get() {
        shaper.longest_document.set(out.len().min(64 * 1024));
    }
    (out, gate_start)
}

#[inline(always)]
fn numeric(
    plan: &Plan,
    r: ValueRef,
    row: &Enriched,
    model_values: &[&[f32]],
    derived: &[Option<f64>],
) -> Option<f64> {
    match r {
        ValueRef::Field(i) => row.state.fields[i].as_ref().and_then(Value::as_f64),
        ValueRef::Lookup(i) => {
            lookup_value(plan, i, &row.state.fields, &mut false).and_then(Value::as_f64)
        }
        ValueRef::Statistic {
            aggregate,
            statistic,
        } => row
            .market
            .get(plan.statistic_offset(aggregate, statistic))
            .copied()
            .filter(|x| !x.is_nan()),
        ValueRef::Feature(i) => row.features[i],
        ValueRef::ModelOutput { model, output } => Some(model_values[model][output] as f64),
        ValueRef::Derived(i) => derived.get(i).copied().flatten(),
        ValueRef::Band(_) => None,
    }
}

fn write_key(out: &mut String, key: &str) {
    write_string(out, key);
    out.push(':');
}

/// Bytes a JSON string must escape: control characters, `"` and `\\`.
const NEEDS_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Whether a string has a byte JSON must escape. A table lookup per byte:
/// document strings are short (a model, a colour, a state), too short for a
/// vectorized check's setup to pay.
fn needs_escape(text: &str) -> bool {
    text.bytes().any(|b| NEEDS_ESCAPE[b as usize])
}

fn write_string(out: &mut String, text: &str) {
    // most values need no escaping: copy them straight in
    if !needs_escape(text) {
        out.reserve(text.len() + 2);
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(text).expect("a string serializes"));
    }
}

fn write_integer(out: &mut String, value: i64) {
    out.push_str(itoa::Buffer::new().format(value));
}

/// `units / 10^places`, a number that is not whole, printed as ryu prints
/// the f64 nearest to it (what `write_float` would write), without ryu's
/// search for the shortest digits: that f64 has no other decimal of at most
/// `places` places within its rounding interval while `units` < 2^40, so
/// its shortest digits are these, trailing zeros dropped. Ryu was about a
/// seventh of the full topology's shaping (`write_decimal_is_what_ryu_prints`).
fn write_decimal(out: &mut String, units: i64, places: u32) {
    let scale = 10u64.pow(places);
    let magnitude = units.unsigned_abs();
    if units < 0 {
        out.push('-');
    }
    out.push_str(itoa::Buffer::new().format(magnitude / scale));
    out.push('.');
    let mut fraction = magnitude % scale;
    let mut digits = places;
    while fraction.is_multiple_of(10) && digits > 1 {
        fraction /= 10;
        digits -= 1;
    }
    let mut buffer = itoa::Buffer::new();
    let text = buffer.format(fraction);
    for _ in text.len() as u32..digits {
        out.push('0');
    }
    out.push_str(text);
}

fn write_float(out: &mut String, value: f64) {
    if value.is_finite() {
        out.push_str(ryu::Buffer::new().format_finite(value));
    } else {
        out.push_str("null");
    }
}

/// The benchmark baseline's document: the decoded fields re-encoded, nothing computed.
pub fn pass_through_document(
    plan: &Plan,
    event: crate::dataflow::decode::ChangeEvent,
) -> crate::record::OutputDocument {
    let mut out = String::with_capacity(384);
    out.push('{');
    write_key(&mut out, &plan.key_field);
    write_string(&mut out, &event.key);
    let _ = write!(
        out,
        ",\"{}\":{},\"{}\":{}",
        plan.version_field, event.version, plan.event_time_field, event.event_time
    );
    for (field, value) in plan.fields.iter().zip(&event.fields) {
        let Some(value) = value else { continue };
        out.push(',');
        write_key(&mut out, &field.name);
        match value {
            Value::Str(s) => write_string(&mut out, s),
            Value::Int(v) => {
                let _ = write!(out, "{v}");
            }
            Value::Num(v) => {
                let _ = write!(
                    out,
                    "{}",
                    serde_json::Number::from_f64(*v)
                        .map(|n| n.to_string())
                        .unwrap_or("null".into())
                );
            }
        }
    }
    out.push('}');
    let deleted = plan.kinds[event.kind].action == crate::topology::KindAction::Delete;
    crate::record::OutputDocument {
        key: event.key,
        version: event.version,
        body: if deleted { None } else { Some(out) },
        position: event.position,
        read_at_nanos: event.read_at_nanos,
        market: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::Rounding;

    #[test]
    fn write_decimal_is_what_ryu_prints() {
        let mut rng = crate::bench::Rng::new(5);
        let mut next = move || rng.next_u64();
        for step in [0.1, 0.05, 0.01, 0.25, 0.001, 0.005] {
            let rounding = Rounding::new(step);
            let places = rounding.decimal_places().expect("a step below 1");
            for i in 0..200_000 {
                // small values, values near the 2^40 units limit, negatives
                let magnitude = match i % 3 {
                    0 => (next() % 100_000) as f64 / 997.0,
                    1 => (next() % (1u64 << 40)) as f64 / 10f64.powi(places as i32),
                    _ => (next() % 1_000_000_000) as f64 / 1e4,
                };
                let value = if i % 2 == 0 { magnitude } else { -magnitude };
                let rounded = rounding.apply(value);
                if crate::features::as_whole(rounded).is_some() {
                    continue;
                }
                let Some(units) = rounding.decimal_units(rounded) else {
                    continue;
                };
                let (mut ours, mut theirs) = (String::new(), String::new());
                write_decimal(&mut ours, units, places);
                write_float(&mut theirs, rounded);
                assert_eq!(ours, theirs, "{value} rounded to {step}");
            }
        }
    }
}
