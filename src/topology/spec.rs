//! The topology file as written: serde structs, one per TOML table.
//!
//! These hold unvalidated input. [`super::compile`] checks every reference and
//! builds a [`super::Plan`], which is what the engine runs. Names that refer to
//! other things are `Spanned` so that a bad reference is reported at its place.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// `topologies/<name>.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologySpec {
    /// Names the topology in logs, `explain` and the state directory's metadata.
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub input: InputSpec,
    #[serde(default)]
    pub state: StateSpec,
    /// Reference tables joined on a field (`[[lookup]]`).
    #[serde(default, rename = "lookup")]
    pub lookups: Vec<LookupSpec>,
    /// Market aggregates over live listings (`[[aggregate]]`).
    #[serde(default, rename = "aggregate")]
    pub aggregates: Vec<AggregateSpec>,
    #[serde(default, rename = "feature")]
    pub features: Vec<FeatureSpec>,
    #[serde(default, rename = "model")]
    pub models: Vec<ModelSpec>,
    #[serde(default, rename = "derived")]
    pub derived: Vec<FeatureSpec>,
    #[serde(default, rename = "band")]
    pub bands: Vec<BandSpec>,
    pub output: OutputSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Logical name of the change stream, bound in the config.
    pub binding: Spanned<String>,
    /// Field holding the listing id (string or integer).
    pub key: Spanned<String>,
    /// Field holding the per-listing monotone version (non-negative integer).
    pub version: Spanned<String>,
    /// Field holding the event time in Unix seconds (integer).
    pub event_time: Spanned<String>,
    /// Field naming the kind of change.
    pub kind: Spanned<String>,
    /// Each accepted kind and what it does.
    pub kinds: BTreeMap<String, Spanned<KindSpec>>,
    #[serde(rename = "field")]
    pub fields: Vec<FieldSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KindSpec {
    pub action: KindAction,
    /// The record must carry every required field (it creates the listing).
    #[serde(default)]
    pub complete: bool,
    /// Fields this kind must carry.
    #[serde(default)]
    pub requires: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KindAction {
    Upsert,
    Delete,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    pub name: Spanned<String>,
    #[serde(rename = "type")]
    pub field_type: FieldType,
    /// Required on kinds marked `complete`.
    #[serde(default)]
    pub required: bool,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// For strings: the only accepted values.
    pub allowed: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    String,
    Integer,
    Number,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSpec {
    /// The field whose history feeds the price features; none disables them.
    pub price_field: Option<Spanned<String>>,
}

/// A feature (before scoring) or a derived value (after scoring).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub name: Spanned<String>,
    pub function: Spanned<FeatureFunctionName>,
    /// For `years_since`: the field holding a calendar year.
    pub field: Option<Spanned<String>>,
    /// For `ratio`.
    pub numerator: Option<Spanned<String>>,
    pub denominator: Option<Spanned<String>>,
    /// For `ratio`: the denominator is raised to at least this (default: no floor,
    /// and a zero denominator gives no value).
    pub min_denominator: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureFunctionName {
    DaysOnMarket,
    PriceChangeCount,
    PriceDropPercent,
    DaysSincePriceChange,
    YearsSince,
    Ratio,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: Spanned<String>,
    /// Paths relative to the topology file.
    pub onnx: Spanned<String>,
    pub sidecar: Spanned<String>,
    pub golden: Spanned<String>,
    /// Largest accepted relative difference between a golden prediction and ours.
    #[serde(default = "default_golden_tolerance")]
    pub golden_tolerance: f64,
}

/// float32 inference against float64 training: 1e-3 relative is far above the
/// rounding noise and far below any real model change.
fn default_golden_tolerance() -> f64 {
    1e-3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandSpec {
    pub name: Spanned<String>,
    pub source: Spanned<String>,
    /// Checked in order: the first band whose `below` exceeds the value wins.
    pub bands: Vec<Spanned<BandStep>>,
    pub otherwise: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BandStep {
    pub below: f64,
    pub label: String,
}

/// A reference table: a CSV file loaded at start, joined on a field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupSpec {
    /// The name of the looked-up value (one namespace with fields and features).
    pub name: Spanned<String>,
    /// CSV file with a header row, relative to the topology file.
    pub file: Spanned<String>,
    /// The field (or earlier lookup) whose value is looked up.
    pub key: Spanned<String>,
    /// Column holding the key (default: the `key` name).
    pub key_column: Option<Spanned<String>>,
    /// Column holding the value (default: the lookup's `name`).
    pub value_column: Option<Spanned<String>>,
    /// `string` (default) or `number`.
    #[serde(rename = "type", default = "default_lookup_type")]
    pub value_type: FieldType,
    /// Used (and counted) when the key is missing from the table or absent.
    pub default: Option<toml::Value>,
}

fn default_lookup_type() -> FieldType {
    FieldType::String
}

/// Statistics of live listings grouped by a segment key, kept exact and
/// incremental with differential dataflow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSpec {
    /// Prefix of the statistics' names: `<name>_count`, `<name>_<measure>_median`, ...
    pub name: Spanned<String>,
    /// Fields or lookups whose values form the segment key. A listing missing
    /// any of them is in no segment of this aggregate.
    pub group_by: Vec<Spanned<String>>,
    /// Numeric group-by values are bucketed: `floor(value / width) * width`.
    #[serde(default)]
    pub bucket: BTreeMap<Spanned<String>, f64>,
    /// Numeric fields whose mean, quartiles and median are kept.
    #[serde(default)]
    pub measures: Vec<Spanned<String>>,
    /// Precision of the statistics that documents see. A change below it
    /// reaches no document: this is what keeps one price cut from
    /// re-evaluating every neighbour in a large segment.
    #[serde(default = "default_significant_digits")]
    pub significant_digits: u32,
}

/// Three digits: a $23,456 median is seen as $23,500; a supply of 1,234 as 1,230.
fn default_significant_digits() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    pub binding: Spanned<String>,
    pub dead_letters: Spanned<String>,
    /// Optional binding that receives every change of the aggregates' exact
    /// statistics, per epoch (for operators and the oracle test).
    pub statistics: Option<Spanned<String>>,
    pub fields: Vec<Spanned<String>>,
    /// Field name to rounding step.
    #[serde(default)]
    pub round: BTreeMap<Spanned<String>, f64>,
}
