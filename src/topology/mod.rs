//! Topology: what the pipeline computes. Parse ([`spec`]), validate and compile
//! ([`compile`]) into a [`Plan`] whose names are all resolved to indices.
//!
//! # Name scope
//! Input fields, features, model outputs, derived values and bands share one
//! namespace. Each may refer only to names defined before it in that order
//! (a model to earlier models' outputs), so evaluation is a single pass.

pub mod lookup_table;
pub mod spec;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use toml::Spanned;

use crate::diagnostics::{Diagnostics, SourceText, deserialize_recovering};
use crate::model::sidecar::{Sidecar, SidecarInput};
use crate::record::Value;
use spec::{FeatureFunctionName, FeatureSpec, TopologySpec};
pub use spec::{FieldType, KindAction};

/// A validated topology, ready to run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: String,
    pub description: String,
    pub path: PathBuf,
    pub input_binding: String,
    pub key_field: String,
    pub version_field: String,
    pub event_time_field: String,
    pub kind_field: String,
    pub kinds: Vec<Kind>,
    pub fields: Vec<Field>,
    pub price_field: Option<usize>,
    pub lookups: Vec<Lookup>,
    pub aggregates: Vec<Aggregate>,
    pub features: Vec<Computed>,
    pub models: Vec<ModelPlan>,
    pub derived: Vec<Computed>,
    pub bands: Vec<Band>,
    pub output_binding: String,
    pub dead_letter_binding: String,
    pub statistics_binding: Option<String>,
    pub output_fields: Vec<OutputField>,
}

/// A reference table, loaded at compile time.
#[derive(Debug, Clone)]
pub struct Lookup {
    pub name: String,
    pub path: PathBuf,
    /// A field or an earlier lookup.
    pub key: ValueRef,
    /// Fx-hashed: looked up several times per document (shaping, segments,
    /// features), where SipHash over a short key was most of the lookup.
    pub table: rustc_hash::FxHashMap<String, Value>,
    pub default: Option<Value>,
    pub numeric: bool,
}

/// A market aggregate: statistics of live listings per segment.
#[derive(Debug, Clone)]
pub struct Aggregate {
    pub name: String,
    /// Fields or lookups, each with an optional bucket width for numbers.
    pub group_by: Vec<(ValueRef, Option<f64>)>,
    /// Numeric input fields.
    pub measures: Vec<usize>,
    pub significant_digits: u32,
    /// Set once the plan is compiled: see [`MarketProjection`].
    pub projection: Option<MarketProjection>,
}

/// Statistics per measure, in this order after the segment's count.
pub const MEASURE_STATISTICS: [&str; 4] = ["mean", "p25", "median", "p75"];

impl Aggregate {
    /// `count`, then mean, p25, median, p75 of each measure.
    pub fn statistic_count(&self) -> usize {
        1 + MEASURE_STATISTICS.len() * self.measures.len()
    }

    pub fn statistic_name(&self, plan_fields: &[Field], index: usize) -> String {
        if index == 0 {
            return format!("{}_count", self.name);
        }
        let measure = (index - 1) / MEASURE_STATISTICS.len();
        let statistic = MEASURE_STATISTICS[(index - 1) % MEASURE_STATISTICS.len()];
        format!(
            "{}_{}_{}",
            self.name, plan_fields[self.measures[measure]].name, statistic
        )
    }
}

/// The part of a listing's document that one aggregate's statistics decide,
/// as a function of values the listing's member carries: the join computes
/// it for every member whose segment's statistics moved, and only members
/// whose part changed are re-evaluated (see `dataflow/market.rs`).
///
/// It exists when every output field that reads the aggregate's statistics
/// is built from numeric fields, lookups and that aggregate's statistics by
/// ratios and bands, and no model reads them. Otherwise the aggregate falls
/// back to re-evaluating every member whose statistics (as seen) moved.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MarketProjection {
    /// Values the projection reads from a member (fields and lookups, as numbers).
    pub carried: Vec<ValueRef>,
    /// Where each carried value sits among the member's numbers: a measure's
    /// slot when it is a measure (the price is both), else after the measures,
    /// in order. A member stores each number once.
    pub slots: Vec<usize>,
    /// The output fields (indices into `Plan::output_fields`) that read the statistics.
    pub outputs: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Kind {
    pub name: String,
    pub action: KindAction,
    pub complete: bool,
    pub requires: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Field {
    pub name: String,
    pub field_type: FieldType,
    pub required: bool,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Checked for every record that carries the field: hashed with Fx, not
    /// std's SipHash (SipHash's setup and rounds on these short strings were
    /// 0.6% of the full pipeline's instructions).
    pub allowed: Option<rustc_hash::FxHashSet<String>>,
}

/// Where a named value comes from, resolved at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueRef {
    Field(usize),
    Feature(usize),
    ModelOutput {
        model: usize,
        output: usize,
    },
    Derived(usize),
    Band(usize),
    /// A reference-table value.
    Lookup(usize),
    /// A market statistic: index into the aggregate's statistics (see [`Aggregate`]).
    Statistic {
        aggregate: usize,
        statistic: usize,
    },
}

/// A feature or derived value: a name and a function.
#[derive(Debug, Clone)]
pub struct Computed {
    pub name: String,
    pub function: Function,
}

#[derive(Debug, Clone)]
pub enum Function {
    DaysOnMarket,
    PriceChangeCount,
    PriceDropPercent,
    DaysSincePriceChange,
    YearsSince {
        field: ValueRef,
    },
    Ratio {
        numerator: ValueRef,
        denominator: ValueRef,
        min_denominator: Option<f64>,
    },
}

impl Function {
    /// Every value the function reads.
    fn for_each_input(&self, mut visit: impl FnMut(&ValueRef)) {
        match self {
            Function::YearsSince { field } => visit(field),
            Function::Ratio {
                numerator,
                denominator,
                ..
            } => {
                visit(numerator);
                visit(denominator);
            }
            Function::DaysOnMarket
            | Function::PriceChangeCount
            | Function::PriceDropPercent
            | Function::DaysSincePriceChange => {}
        }
    }
}

#[derive(Debug, Clone)]
pub struct ModelPlan {
    pub name: String,
    pub onnx_path: PathBuf,
    pub golden_path: PathBuf,
    pub golden_tolerance: f64,
    pub sidecar: Sidecar,
    /// Per sidecar input, where its value comes from.
    pub input_refs: Vec<ValueRef>,
}

#[derive(Debug, Clone)]
pub struct Band {
    pub name: String,
    pub source: ValueRef,
    pub steps: Vec<(f64, String)>,
    pub otherwise: String,
    /// FNV-1a of each step's label, then of `otherwise`'s: what a market
    /// signature hashes for the label a value gets, computed once here.
    pub label_hashes: Vec<u64>,
}

#[derive(Debug, Clone)]
pub struct OutputField {
    pub name: String,
    pub source: ValueRef,
    pub round_to: Option<crate::features::Rounding>,
}

impl Plan {
    pub fn field_index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    /// Where a statistic sits in a listing's flattened market view (all
    /// aggregates' statistics, in declaration order).
    pub fn statistic_offset(&self, aggregate: usize, statistic: usize) -> usize {
        self.aggregates[..aggregate]
            .iter()
            .map(Aggregate::statistic_count)
            .sum::<usize>()
            + statistic
    }

    fn statistic_index(&self, value: &ValueRef) -> Option<usize> {
        match value {
            ValueRef::Statistic {
                aggregate,
                statistic,
            } => Some(self.statistic_offset(*aggregate, *statistic)),
            _ => None,
        }
    }

    /// Every value that features, derived values, model inputs and output
    /// fields read (bands are the other readers).
    fn for_each_value_read_outside_bands(&self, mut visit: impl FnMut(&ValueRef)) {
        for computed in self.features.iter().chain(&self.derived) {
            computed.function.for_each_input(&mut visit);
        }
        self.models
            .iter()
            .flat_map(|m| &m.input_refs)
            .for_each(&mut visit);
        self.output_fields
            .iter()
            .for_each(|field| visit(&field.source));
    }

    /// Per market statistic (in namespace order, all aggregates), whether any
    /// feature, model input, derived value, band or output field reads it. A
    /// neighbour is re-evaluated only when a statistic it reads moved: the
    /// changelog carries every statistic, the documents only some.
    pub fn statistics_read(&self) -> Vec<bool> {
        let width = self.aggregates.iter().map(Aggregate::statistic_count).sum();
        let mut read = vec![false; width];
        let mut mark = |value: &ValueRef| {
            if let Some(i) = self.statistic_index(value) {
                read[i] = true;
            }
        };
        self.for_each_value_read_outside_bands(&mut mark);
        self.bands.iter().for_each(|band| mark(&band.source));
        read
    }

    /// Per market statistic: when bands are the only readers of it, the union
    /// of their thresholds, ascending. Such a statistic reaches the join as the
    /// largest threshold at or below it (minus infinity below them all): every
    /// band gives that stand-in the label it gives the value, and a count that
    /// moves within a band re-evaluates no neighbour.
    pub fn statistics_band_cuts(&self) -> Vec<Option<Vec<f64>>> {
        let mut cuts: Vec<Option<Vec<f64>>> = self
            .statistics_read()
            .into_iter()
            .map(|read| read.then(Vec::new))
            .collect();
        for band in &self.bands {
            if let Some(Some(thresholds)) = self.statistic_index(&band.source).map(|i| &mut cuts[i])
            {
                thresholds.extend(band.steps.iter().map(|(below, _)| *below));
            }
        }
        // any other reader needs the value itself
        self.for_each_value_read_outside_bands(|value| {
            if let Some(i) = self.statistic_index(value) {
                cuts[i] = None;
            }
        });
        for thresholds in cuts.iter_mut().flatten() {
            thresholds.sort_by(f64::total_cmp);
            thresholds.dedup();
        }
        cuts
    }

    /// The aggregates whose statistics `value` reads, directly or through
    /// features, models, derived values and bands: a bit per aggregate.
    pub fn aggregates_read_by(&self, value: ValueRef) -> u64 {
        let of_function = |function: &Function| match function {
            Function::YearsSince { field } => self.aggregates_read_by(*field),
            Function::Ratio {
                numerator,
                denominator,
                ..
            } => self.aggregates_read_by(*numerator) | self.aggregates_read_by(*denominator),
            Function::DaysOnMarket
            | Function::PriceChangeCount
            | Function::PriceDropPercent
            | Function::DaysSincePriceChange => 0,
        };
        match value {
            ValueRef::Field(_) | ValueRef::Lookup(_) => 0,
            ValueRef::Statistic { aggregate, .. } => 1 << aggregate,
            ValueRef::Feature(i) => of_function(&self.features[i].function),
            ValueRef::Derived(i) => of_function(&self.derived[i].function),
            ValueRef::ModelOutput { model, .. } => self.models[model]
                .input_refs
                .iter()
                .fold(0, |bits, input| bits | self.aggregates_read_by(*input)),
            ValueRef::Band(i) => self.aggregates_read_by(self.bands[i].source),
        }
    }

    /// How a member of `aggregate` can tell, inside the join, whether a move of
    /// its segment's statistics changes its document; `None` when it cannot
    /// (see [`MarketProjection`]).
    pub fn market_projection(&self, aggregate: usize) -> Option<MarketProjection> {
        let bit = 1u64 << aggregate;
        // a model that reads the statistics would have to run inside the join
        if self
            .models
            .iter()
            .flat_map(|m| &m.input_refs)
            .any(|input| self.aggregates_read_by(*input) & bit != 0)
        {
            return None;
        }
        let mut projection = MarketProjection::default();
        for (index, field) in self.output_fields.iter().enumerate() {
            if self.aggregates_read_by(field.source) & bit == 0 {
                continue;
            }
            if !self.collect_projection_inputs(field.source, aggregate, &mut projection.carried) {
                return None;
            }
            projection.outputs.push(index);
        }
        let measures = &self.aggregates[aggregate].measures;
        let mut next_slot = measures.len();
        for value in &projection.carried {
            let measure = match value {
                ValueRef::Field(field) => measures.iter().position(|m| m == field),
                _ => None,
            };
            projection.slots.push(measure.unwrap_or_else(|| {
                next_slot += 1;
                next_slot - 1
            }));
        }
        Some(projection)
    }

    /// Whether `value` is computable from numeric fields and lookups (added to
    /// `carried`) and the statistics of `aggregate` alone.
    fn collect_projection_inputs(
        &self,
        value: ValueRef,
        aggregate: usize,
        carried: &mut Vec<ValueRef>,
    ) -> bool {
        let of_ratio = |function: &Function, carried: &mut Vec<ValueRef>| match function {
            Function::Ratio {
                numerator,
                denominator,
                ..
            } => {
                self.collect_projection_inputs(*numerator, aggregate, carried)
                    && self.collect_projection_inputs(*denominator, aggregate, carried)
            }
            // functions of the listing's history or of event time: not carried by members
            _ => false,
        };
        match value {
            ValueRef::Field(_) | ValueRef::Lookup(_) => {
                if !carried.contains(&value) {
                    carried.push(value);
                }
                true
            }
            ValueRef::Statistic { aggregate: a, .. } => a == aggregate,
            ValueRef::Feature(i) => of_ratio(&self.features[i].function, carried),
            ValueRef::Derived(i) => of_ratio(&self.derived[i].function, carried),
            ValueRef::Band(i) => {
                self.collect_projection_inputs(self.bands[i].source, aggregate, carried)
            }
            ValueRef::ModelOutput { .. } => false,
        }
    }

    /// What the market view of a listing depends on: aggregates, what is read
    /// of them and how, and the lookup tables (a segment key may be a lookup).
    /// Stored with the state; when it is unchanged at a restart, the views the
    /// listings' states hold are the ones the rebuilt join gives, and the
    /// rebuild needs no re-evaluation.
    pub fn market_fingerprint(&self) -> String {
        let mut hash = crate::hash::FNV_OFFSET;
        let mut feed = |text: &str| hash = crate::hash::fnv1a_extend(hash, text.as_bytes());
        feed(&format!(
            "{:?}|{:?}|{:?}",
            self.aggregates,
            self.statistics_read(),
            self.statistics_band_cuts()
        ));
        feed(&self.lookup_tables_text());
        format!("{hash:016x}")
    }

    /// Every lookup table's name, key, default and entries (sorted), as text
    /// to fingerprint.
    fn lookup_tables_text(&self) -> String {
        let mut text = String::new();
        for lookup in &self.lookups {
            let mut entries: Vec<String> = lookup
                .table
                .iter()
                .map(|(k, v)| format!("{k:?}={v:?}"))
                .collect();
            entries.sort();
            text.push_str(&format!(
                "|{}:{:?}:{:?}:{:?}",
                lookup.name, lookup.key, lookup.default, entries
            ));
        }
        text
    }

    /// Whether a value depends, directly or through features and models, on
    /// market statistics.
    fn reads_market(&self, value: &ValueRef) -> bool {
        match value {
            ValueRef::Statistic { .. } => true,
            ValueRef::Field(_) | ValueRef::Lookup(_) => false,
            ValueRef::Feature(i) => self.function_reads_market(&self.features[*i].function),
            ValueRef::Derived(i) => self.function_reads_market(&self.derived[*i].function),
            ValueRef::ModelOutput { model, .. } => self.models[*model]
                .input_refs
                .iter()
                .any(|input| self.reads_market(input)),
            ValueRef::Band(i) => self.reads_market(&self.bands[*i].source),
        }
    }

    fn function_reads_market(&self, function: &Function) -> bool {
        let mut reads = false;
        function.for_each_input(|input| reads |= self.reads_market(input));
        reads
    }

    /// What the models' outputs for a listing are a function of, besides its
    /// state: the ONNX files, their sidecars and input bindings, the features
    /// and the lookup tables. A listing's state keeps the outputs of its last
    /// own evaluation stamped with this and its version, and a market
    /// re-evaluation reuses them instead of scoring again. `None` when some
    /// model reads the market (directly or through a feature): then its
    /// outputs move with the statistics and are always scored.
    pub fn scoring_fingerprint(&self) -> Option<u64> {
        let reads_market = self
            .models
            .iter()
            .flat_map(|model| &model.input_refs)
            .any(|input| self.reads_market(input));
        if reads_market || self.models.is_empty() {
            return None;
        }
        let mut hash = crate::hash::FNV_OFFSET;
        for model in &self.models {
            // the file's bytes: a retrained model under the same path counts
            let onnx = std::fs::read(&model.onnx_path).ok()?;
            hash = crate::hash::fnv1a_extend(hash, &onnx);
            hash = crate::hash::fnv1a_extend(
                hash,
                format!("|{:?}|{:?}|", model.sidecar, model.input_refs).as_bytes(),
            );
        }
        hash = crate::hash::fnv1a_extend(hash, format!("{:?}", self.features).as_bytes());
        hash = crate::hash::fnv1a_extend(hash, self.lookup_tables_text().as_bytes());
        Some(hash)
    }

    /// The stamp of model outputs computed for one listing version under
    /// `scoring_fingerprint` (never 0, which marks "no outputs kept").
    pub fn scoring_stamp(fingerprint: u64, listing_version: u64) -> u64 {
        crate::hash::fnv1a_extend(fingerprint, &listing_version.to_le_bytes()).max(1)
    }

    /// The names of the input fields, in order: stored with the state so that a
    /// topology whose schema changed does not misread old state.
    pub fn field_fingerprint(&self) -> String {
        self.fields
            .iter()
            .map(|f| format!("{}:{:?}", f.name, f.field_type))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Reads, validates and compiles a topology file. Every problem is reported.
pub fn load(path: &Path) -> Result<Plan, Diagnostics> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            let mut diagnostics = Diagnostics::default();
            diagnostics.error(
                path,
                format!("cannot read the topology: {error}"),
                Some("pass the path of a topologies/*.toml file".into()),
            );
            return Err(diagnostics);
        }
    };
    let source = SourceText {
        path: path.to_path_buf(),
        text,
    };
    // serde errors and reference errors are reported together: the references
    // are checked on what could be read with the broken pairs left out
    let (spec, mut diagnostics) = deserialize_recovering::<TopologySpec>(&source);
    let Some(spec) = spec else {
        return Err(diagnostics);
    };
    match compile(&spec, &source) {
        Ok(plan) if diagnostics.is_empty() => Ok(plan),
        Ok(_) => Err(diagnostics),
        Err(more) => {
            diagnostics.extend(more);
            Err(diagnostics)
        }
    }
}

struct Scope {
    names: HashMap<String, (ValueRef, bool)>, // (where, numeric)
}

impl Scope {
    fn define(
        &mut self,
        diagnostics: &mut Diagnostics,
        source: &SourceText,
        name: &Spanned<String>,
        value: ValueRef,
        numeric: bool,
    ) {
        if self.names.contains_key(name.get_ref()) {
            diagnostics.error_at(
                source,
                name.span(),
                format!("`{}` is defined twice", name.get_ref()),
                Some(
                    "fields, features, model outputs, derived values and bands share one namespace"
                        .into(),
                ),
            );
            return;
        }
        self.names.insert(name.get_ref().clone(), (value, numeric));
    }

    fn resolve(
        &self,
        diagnostics: &mut Diagnostics,
        source: &SourceText,
        name: &Spanned<String>,
        what: &str,
        want_numeric: bool,
    ) -> Option<ValueRef> {
        match self.names.get(name.get_ref()) {
            Some((value, numeric)) => {
                if want_numeric && !numeric {
                    diagnostics.error_at(
                        source,
                        name.span(),
                        format!("{what} `{}` is not numeric", name.get_ref()),
                        Some("use a number or integer field, or a feature".into()),
                    );
                }
                Some(*value)
            }
            None => {
                diagnostics.error_at(
                    source,
                    name.span(),
                    format!(
                        "{what} `{}` is not defined before this point",
                        name.get_ref()
                    ),
                    Some(self.suggest(name.get_ref())),
                );
                None
            }
        }
    }

    fn suggest(&self, wanted: &str) -> String {
        let close = |k: &str| {
            edit_distance(k, wanted) <= 3
                || (wanted.len() >= 3 && (k.contains(wanted) || wanted.contains(k)))
        };
        let mut known: Vec<&String> = self.names.keys().filter(|k| close(k)).collect();
        known.sort_by_key(|k| (edit_distance(k, wanted), (*k).clone()));
        match known.first() {
            Some(best) => format!("did you mean `{best}`?"),
            None => "names must be defined earlier: fields, then features, models, derived values, bands".into(),
        }
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for j in 0..b.len() {
            let current = row[j + 1];
            row[j + 1] = if ca == b[j] {
                previous
            } else {
                1 + previous.min(row[j]).min(row[j + 1])
            };
            previous = current;
        }
    }
    row[b.len()]
}

fn compile(spec: &TopologySpec, source: &SourceText) -> Result<Plan, Diagnostics> {
    let mut diagnostics = Diagnostics::default();
    let base_dir = source.path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut scope = Scope {
        names: HashMap::new(),
    };

    let envelope = [
        &spec.input.key,
        &spec.input.version,
        &spec.input.event_time,
        &spec.input.kind,
    ];
    let mut fields = Vec::new();
    for (index, field) in spec.input.fields.iter().enumerate() {
        if envelope.iter().any(|e| e.get_ref() == field.name.get_ref()) {
            diagnostics.error_at(
                source,
                field.name.span(),
                format!(
                    "`{}` is an envelope field (key, version, event_time or kind)",
                    field.name.get_ref()
                ),
                Some(
                    "envelope fields are declared in [input] and not repeated as [[input.field]]"
                        .into(),
                ),
            );
        }
        if let (Some(min), Some(max)) = (field.min, field.max)
            && min > max
        {
            diagnostics.error_at(
                source,
                field.name.span(),
                format!(
                    "field `{}` has min {min} above max {max}",
                    field.name.get_ref()
                ),
                None,
            );
        }
        if field.allowed.is_some() && field.field_type != FieldType::String {
            diagnostics.error_at(
                source,
                field.name.span(),
                format!(
                    "field `{}`: `allowed` applies to strings only",
                    field.name.get_ref()
                ),
                Some("use min and max for numbers".into()),
            );
        }
        scope.define(
            &mut diagnostics,
            source,
            &field.name,
            ValueRef::Field(index),
            field.field_type != FieldType::String,
        );
        fields.push(Field {
            name: field.name.get_ref().clone(),
            field_type: field.field_type,
            required: field.required,
            min: field.min,
            max: field.max,
            allowed: field.allowed.as_ref().map(|a| a.iter().cloned().collect()),
        });
    }

    let mut kinds = Vec::new();
    for (name, kind) in &spec.input.kinds {
        let mut requires = Vec::new();
        for required in &kind.get_ref().requires {
            match fields.iter().position(|f| &f.name == required.get_ref()) {
                Some(index) => requires.push(index),
                None => diagnostics.error_at(
                    source,
                    required.span(),
                    format!(
                        "kind `{name}` requires `{}`, which is not an input field",
                        required.get_ref()
                    ),
                    Some(scope.suggest(required.get_ref())),
                ),
            }
        }
        if kind.get_ref().action == KindAction::Delete
            && (kind.get_ref().complete || !kind.get_ref().requires.is_empty())
        {
            diagnostics.error_at(
                source,
                kind.span(),
                format!("kind `{name}` deletes: `complete` and `requires` do not apply"),
                None,
            );
        }
        kinds.push(Kind {
            name: name.clone(),
            action: kind.get_ref().action,
            complete: kind.get_ref().complete,
            requires,
        });
    }
    if kinds.is_empty() {
        diagnostics.error_at(
            source,
            spec.input.kind.span(),
            "no kinds are declared",
            Some("add [input.kinds] with at least one upsert kind".into()),
        );
    }

    let price_field = spec.state.price_field.as_ref().and_then(|name| {
        match fields.iter().position(|f| &f.name == name.get_ref()) {
            Some(index) if fields[index].field_type != FieldType::String => Some(index),
            Some(_) => {
                diagnostics.error_at(
                    source,
                    name.span(),
                    format!("price field `{}` is not numeric", name.get_ref()),
                    None,
                );
                None
            }
            None => {
                diagnostics.error_at(
                    source,
                    name.span(),
                    format!("price field `{}` is not an input field", name.get_ref()),
                    Some(scope.suggest(name.get_ref())),
                );
                None
            }
        }
    });

    let lookups = compile_lookups(
        spec,
        &mut scope,
        &fields,
        &base_dir,
        &mut diagnostics,
        source,
    );
    let aggregates = compile_aggregates(
        spec,
        &mut scope,
        &fields,
        &lookups,
        &mut diagnostics,
        source,
    );

    let mut features = Vec::new();
    for (index, feature) in spec.features.iter().enumerate() {
        if let Some(function) = compile_function(
            feature,
            &scope,
            price_field.is_some(),
            &mut diagnostics,
            source,
        ) {
            features.push(Computed {
                name: feature.name.get_ref().clone(),
                function,
            });
        }
        scope.define(
            &mut diagnostics,
            source,
            &feature.name,
            ValueRef::Feature(index),
            true,
        );
    }

    let mut models = Vec::new();
    for (model_index, model) in spec.models.iter().enumerate() {
        let onnx_path = base_dir.join(model.onnx.get_ref());
        let sidecar_path = base_dir.join(model.sidecar.get_ref());
        let golden_path = base_dir.join(model.golden.get_ref());
        for (path, span) in [
            (&onnx_path, model.onnx.span()),
            (&golden_path, model.golden.span()),
        ] {
            if !path.is_file() {
                diagnostics.error_at(source, span, format!("file {} does not exist", path.display()), Some("paths are relative to the topology file; scripts/train-models.sh writes the models".into()));
            }
        }
        let sidecar = match Sidecar::load(&sidecar_path) {
            Ok(sidecar) => sidecar,
            Err(message) => {
                diagnostics.error_at(
                    source,
                    model.sidecar.span(),
                    message,
                    Some(
                        "the sidecar is written by the training script beside the topology".into(),
                    ),
                );
                scope.define(
                    &mut diagnostics,
                    source,
                    &model.name,
                    ValueRef::ModelOutput {
                        model: model_index,
                        output: 0,
                    },
                    true,
                );
                continue;
            }
        };
        let mut input_refs = Vec::new();
        for input in &sidecar.inputs {
            let (name, numeric) = match input {
                SidecarInput::Numeric { name, .. } => (name, true),
                SidecarInput::OneHot { name, .. } => (name, false),
            };
            match scope.names.get(name) {
                Some((value, is_numeric)) => {
                    if numeric && !is_numeric {
                        diagnostics.error_at(source, model.sidecar.span(), format!("model `{}` takes `{name}` as a number, but it is a string field", model.name.get_ref()), Some("the sidecar and the topology disagree: retrain or fix the field type".into()));
                    }
                    input_refs.push(*value);
                }
                None => diagnostics.error_at(
                    source,
                    model.sidecar.span(),
                    format!(
                        "model `{}` takes input `{name}`, which is not defined before the model",
                        model.name.get_ref()
                    ),
                    Some(scope.suggest(name)),
                ),
            }
        }
        for (output_index, output) in sidecar.outputs.iter().enumerate() {
            let spanned = Spanned::new(model.name.span(), output.clone());
            scope.define(
                &mut diagnostics,
                source,
                &spanned,
                ValueRef::ModelOutput {
                    model: model_index,
                    output: output_index,
                },
                true,
            );
        }
        models.push(ModelPlan {
            name: model.name.get_ref().clone(),
            onnx_path,
            golden_path,
            golden_tolerance: model.golden_tolerance,
            sidecar,
            input_refs,
        });
    }

    let mut derived = Vec::new();
    for (index, value) in spec.derived.iter().enumerate() {
        if let Some(function) = compile_function(
            value,
            &scope,
            price_field.is_some(),
            &mut diagnostics,
            source,
        ) {
            derived.push(Computed {
                name: value.name.get_ref().clone(),
                function,
            });
        }
        scope.define(
            &mut diagnostics,
            source,
            &value.name,
            ValueRef::Derived(index),
            true,
        );
    }

    let mut bands = Vec::new();
    for (index, band) in spec.bands.iter().enumerate() {
        let source_ref = scope.resolve(&mut diagnostics, source, &band.source, "band source", true);
        let mut steps: Vec<(f64, String)> = Vec::new();
        for step in &band.bands {
            if let Some((previous, _)) = steps.last()
                && step.get_ref().below <= *previous
            {
                diagnostics.error_at(
                    source,
                    step.span(),
                    format!(
                        "band `{}`: thresholds must increase ({} after {previous})",
                        band.name.get_ref(),
                        step.get_ref().below
                    ),
                    None,
                );
            }
            steps.push((step.get_ref().below, step.get_ref().label.clone()));
        }
        if let Some(source_ref) = source_ref {
            let label_hashes = steps
                .iter()
                .map(|(_, label)| label.as_str())
                .chain([band.otherwise.as_str()])
                .map(|label| crate::hash::fnv1a(label.as_bytes()))
                .collect();
            bands.push(Band {
                name: band.name.get_ref().clone(),
                source: source_ref,
                steps,
                otherwise: band.otherwise.clone(),
                label_hashes,
            });
        }
        scope.define(
            &mut diagnostics,
            source,
            &band.name,
            ValueRef::Band(index),
            false,
        );
    }

    let rounding: BTreeMap<&str, (f64, &Spanned<String>)> = spec
        .output
        .round
        .iter()
        .map(|(k, v)| (k.get_ref().as_str(), (*v, k)))
        .collect();
    for (name, (step, spanned)) in &rounding {
        if !spec.output.fields.iter().any(|f| f.get_ref() == name) {
            diagnostics.error_at(
                source,
                spanned.span(),
                format!("rounding for `{name}`, which is not an output field"),
                Some("add it to output.fields or remove the rounding".into()),
            );
        }
        if step.is_nan() || *step <= 0.0 {
            diagnostics.error_at(
                source,
                spanned.span(),
                format!("rounding step for `{name}` must be positive"),
                None,
            );
        }
    }
    let mut output_fields = Vec::new();
    let mut seen = HashSet::new();
    for field in &spec.output.fields {
        if !seen.insert(field.get_ref().clone()) {
            diagnostics.error_at(
                source,
                field.span(),
                format!("output field `{}` is listed twice", field.get_ref()),
                None,
            );
        }
        let round_to = rounding
            .get(field.get_ref().as_str())
            .map(|(step, _)| crate::features::Rounding::new(*step));
        if let Some(source_ref) = scope.resolve(
            &mut diagnostics,
            source,
            field,
            "output field",
            round_to.is_some(),
        ) {
            output_fields.push(OutputField {
                name: field.get_ref().clone(),
                source: source_ref,
                round_to,
            });
        }
    }
    for (label, name) in [
        ("output", &spec.output.binding),
        ("dead_letters", &spec.output.dead_letters),
        ("input", &spec.input.binding),
    ] {
        if name.get_ref().trim().is_empty() {
            diagnostics.error_at(
                source,
                name.span(),
                format!("the {label} binding name is empty"),
                None,
            );
        }
    }

    let mut plan = Plan {
        name: spec.name.clone(),
        description: spec.description.clone(),
        path: source.path.clone(),
        input_binding: spec.input.binding.get_ref().clone(),
        key_field: spec.input.key.get_ref().clone(),
        version_field: spec.input.version.get_ref().clone(),
        event_time_field: spec.input.event_time.get_ref().clone(),
        kind_field: spec.input.kind.get_ref().clone(),
        kinds,
        fields,
        price_field,
        lookups,
        aggregates,
        features,
        models,
        derived,
        bands,
        output_binding: spec.output.binding.get_ref().clone(),
        dead_letter_binding: spec.output.dead_letters.get_ref().clone(),
        statistics_binding: spec.output.statistics.as_ref().map(|s| s.get_ref().clone()),
        output_fields,
    };
    if diagnostics.is_empty() {
        for aggregate in 0..plan.aggregates.len() {
            plan.aggregates[aggregate].projection = plan.market_projection(aggregate);
        }
    }
    diagnostics.into_result(plan)
}

fn compile_lookups(
    spec: &TopologySpec,
    scope: &mut Scope,
    fields: &[Field],
    base_dir: &Path,
    diagnostics: &mut Diagnostics,
    source: &SourceText,
) -> Vec<Lookup> {
    let mut lookups = Vec::new();
    for lookup in &spec.lookups {
        let index = lookups.len();
        let key = match scope.names.get(lookup.key.get_ref()) {
            Some((value @ (ValueRef::Field(_) | ValueRef::Lookup(_)), _)) => Some(*value),
            Some(_) => {
                diagnostics.error_at(
                    source,
                    lookup.key.span(),
                    format!(
                        "lookup `{}`: key `{}` is not an input field or an earlier lookup",
                        lookup.name.get_ref(),
                        lookup.key.get_ref()
                    ),
                    None,
                );
                None
            }
            None => {
                diagnostics.error_at(
                    source,
                    lookup.key.span(),
                    format!(
                        "lookup `{}`: key `{}` is not defined before this point",
                        lookup.name.get_ref(),
                        lookup.key.get_ref()
                    ),
                    Some(scope.suggest(lookup.key.get_ref())),
                );
                None
            }
        };
        let numeric = lookup.value_type != FieldType::String;
        let default = match &lookup.default {
            None => None,
            Some(toml::Value::String(text)) if !numeric => Some(Value::Str(text.as_str().into())),
            Some(toml::Value::Integer(i)) if numeric => Some(Value::Int(*i)),
            Some(toml::Value::Float(f)) if numeric => Some(Value::Num(*f)),
            Some(other) => {
                diagnostics.error_at(
                    source,
                    lookup.name.span(),
                    format!(
                        "lookup `{}`: default {other} does not match type {:?}",
                        lookup.name.get_ref(),
                        lookup.value_type
                    )
                    .to_lowercase(),
                    Some(if numeric {
                        "use a number".into()
                    } else {
                        "use a quoted string".into()
                    }),
                );
                None
            }
        };
        let path = base_dir.join(lookup.file.get_ref());
        let key_column = lookup
            .key_column
            .as_ref()
            .map(|c| c.get_ref().clone())
            .unwrap_or_else(|| lookup.key.get_ref().clone());
        let value_column = lookup
            .value_column
            .as_ref()
            .map(|c| c.get_ref().clone())
            .unwrap_or_else(|| lookup.name.get_ref().clone());
        let table = match crate::topology::lookup_table::load(
            &path,
            &key_column,
            &value_column,
            numeric,
        ) {
            Ok(table) => table,
            Err(message) => {
                diagnostics.error_at(source, lookup.file.span(), format!("lookup `{}`: {message}", lookup.name.get_ref()),
                    Some("a CSV file with a header row, relative to the topology file; set key_column and value_column when they differ from the names".into()));
                Default::default()
            }
        };
        let _ = fields;
        scope.define(
            diagnostics,
            source,
            &lookup.name,
            ValueRef::Lookup(index),
            numeric,
        );
        if let Some(key) = key {
            lookups.push(Lookup {
                name: lookup.name.get_ref().clone(),
                path,
                key,
                table,
                default,
                numeric,
            });
        }
    }
    lookups
}

fn compile_aggregates(
    spec: &TopologySpec,
    scope: &mut Scope,
    fields: &[Field],
    lookups: &[Lookup],
    diagnostics: &mut Diagnostics,
    source: &SourceText,
) -> Vec<Aggregate> {
    let mut aggregates = Vec::new();
    for (aggregate_index, aggregate) in spec.aggregates.iter().enumerate() {
        let name = aggregate.name.get_ref();
        if aggregate.group_by.is_empty() {
            diagnostics.error_at(source, aggregate.name.span(), format!("aggregate `{name}` has no group_by"), Some("group live listings by fields or lookups, e.g. group_by = [\"model\", \"region\"]".into()));
        }
        let mut group_by = Vec::new();
        for key in &aggregate.group_by {
            let bucket = aggregate
                .bucket
                .iter()
                .find(|(k, _)| k.get_ref() == key.get_ref())
                .map(|(_, w)| *w);
            match scope.names.get(key.get_ref()) {
                Some((value @ (ValueRef::Field(_) | ValueRef::Lookup(_)), numeric)) => {
                    if bucket.is_some() && !numeric {
                        diagnostics.error_at(source, key.span(), format!("aggregate `{name}`: `{}` is a string and cannot be bucketed", key.get_ref()), None);
                    }
                    group_by.push((*value, bucket));
                }
                Some(_) => diagnostics.error_at(source, key.span(), format!("aggregate `{name}`: `{}` is not an input field or a lookup", key.get_ref()),
                    Some("segments are built from the listing's own fields and reference tables; features come after aggregates".into())),
                None => diagnostics.error_at(source, key.span(), format!("aggregate `{name}`: `{}` is not defined", key.get_ref()), Some(scope.suggest(key.get_ref()))),
            }
        }
        for (key, width) in &aggregate.bucket {
            if !aggregate
                .group_by
                .iter()
                .any(|g| g.get_ref() == key.get_ref())
            {
                diagnostics.error_at(
                    source,
                    key.span(),
                    format!(
                        "aggregate `{name}`: bucket for `{}`, which is not in group_by",
                        key.get_ref()
                    ),
                    None,
                );
            }
            if width.is_nan() || *width <= 0.0 {
                diagnostics.error_at(
                    source,
                    key.span(),
                    format!(
                        "aggregate `{name}`: bucket width for `{}` must be positive",
                        key.get_ref()
                    ),
                    None,
                );
            }
        }
        let mut measures = Vec::new();
        for measure in &aggregate.measures {
            match fields.iter().position(|f| &f.name == measure.get_ref()) {
                Some(index) if fields[index].field_type != FieldType::String => {
                    measures.push(index)
                }
                Some(_) => diagnostics.error_at(
                    source,
                    measure.span(),
                    format!(
                        "aggregate `{name}`: measure `{}` is a string",
                        measure.get_ref()
                    ),
                    Some("measures are numeric input fields".into()),
                ),
                None => diagnostics.error_at(
                    source,
                    measure.span(),
                    format!(
                        "aggregate `{name}`: measure `{}` is not an input field",
                        measure.get_ref()
                    ),
                    Some(scope.suggest(measure.get_ref())),
                ),
            }
        }
        if !(1..=15).contains(&aggregate.significant_digits) {
            diagnostics.error_at(
                source,
                aggregate.name.span(),
                format!("aggregate `{name}`: significant_digits must be between 1 and 15"),
                None,
            );
        }
        let compiled = Aggregate {
            name: name.clone(),
            group_by,
            measures,
            significant_digits: aggregate.significant_digits,
            projection: None,
        };
        for statistic in 0..compiled.statistic_count() {
            let spanned = Spanned::new(
                aggregate.name.span(),
                compiled.statistic_name(fields, statistic),
            );
            scope.define(
                diagnostics,
                source,
                &spanned,
                ValueRef::Statistic {
                    aggregate: aggregate_index,
                    statistic,
                },
                true,
            );
        }
        aggregates.push(compiled);
    }
    let _ = lookups;
    if aggregates.len() > 255 {
        diagnostics.error_at(
            source,
            spec.aggregates[255].name.span(),
            "at most 255 aggregates",
            None,
        );
    }
    aggregates
}

fn compile_function(
    spec: &FeatureSpec,
    scope: &Scope,
    has_price: bool,
    diagnostics: &mut Diagnostics,
    source: &SourceText,
) -> Option<Function> {
    let name = spec.name.get_ref();
    let needs = |what: &Option<Spanned<String>>,
                 key: &str,
                 diagnostics: &mut Diagnostics|
     -> Option<ValueRef> {
        match what {
            Some(reference) => scope.resolve(diagnostics, source, reference, key, true),
            None => {
                diagnostics.error_at(
                    source,
                    spec.function.span(),
                    format!(
                        "`{name}`: function `{:?}` needs `{key}`",
                        spec.function.get_ref()
                    )
                    .to_lowercase(),
                    Some(format!("add `{key} = \"<name>\"`")),
                );
                None
            }
        }
    };
    let price_function = matches!(
        spec.function.get_ref(),
        FeatureFunctionName::PriceChangeCount
            | FeatureFunctionName::PriceDropPercent
            | FeatureFunctionName::DaysSincePriceChange
    );
    if price_function && !has_price {
        diagnostics.error_at(
            source,
            spec.function.span(),
            format!("`{name}` needs a price history"),
            Some("set [state] price_field".into()),
        );
        return None;
    }
    Some(match spec.function.get_ref() {
        FeatureFunctionName::DaysOnMarket => Function::DaysOnMarket,
        FeatureFunctionName::PriceChangeCount => Function::PriceChangeCount,
        FeatureFunctionName::PriceDropPercent => Function::PriceDropPercent,
        FeatureFunctionName::DaysSincePriceChange => Function::DaysSincePriceChange,
        FeatureFunctionName::YearsSince => Function::YearsSince {
            field: needs(&spec.field, "field", diagnostics)?,
        },
        FeatureFunctionName::Ratio => {
            let numerator = needs(&spec.numerator, "numerator", diagnostics);
            let denominator = needs(&spec.denominator, "denominator", diagnostics);
            Function::Ratio {
                numerator: numerator?,
                denominator: denominator?,
                min_denominator: spec.min_denominator,
            }
        }
    })
}

/// The compiled plan as an operator reads it (`assay explain`).
pub fn explain(plan: &Plan, workers: usize, partitions: Option<u32>) -> String {
    let partitions = partitions
        .map(|p| p.to_string())
        .unwrap_or_else(|| "(the topic's)".into());
    let mut out = String::new();
    let _ = writeln!(out, "topology {} ({})", plan.name, plan.path.display());
    if !plan.description.is_empty() {
        let _ = writeln!(out, "  {}", plan.description);
    }
    let _ = writeln!(
        out,
        "\nstages (each worker runs all of them on the partitions it owns):"
    );
    let _ = writeln!(
        out,
        "  1. source       binding `{}`: {} partitions over {} worker(s); partition = hash(`{}`) mod {}, owner = partition mod workers",
        plan.input_binding, partitions, workers, plan.key_field, partitions
    );
    let _ = writeln!(
        out,
        "  2. decode       JSON object; envelope `{}` (key), `{}` (version), `{}` (event time, s), `{}` (kind); {} fields; bad records -> `{}`",
        plan.key_field,
        plan.version_field,
        plan.event_time_field,
        plan.kind_field,
        plan.fields.len(),
        plan.dead_letter_binding
    );
    for kind in &plan.kinds {
        let requires: Vec<&str> = kind
            .requires
            .iter()
            .map(|i| plan.fields[*i].name.as_str())
            .collect();
        let _ = writeln!(
            out,
            "                   kind `{}`: {:?}{}{}",
            kind.name,
            kind.action,
            if kind.complete {
                ", complete (all required fields)"
            } else {
                ""
            },
            if requires.is_empty() {
                String::new()
            } else {
                format!(", requires {}", requires.join(", "))
            }
        );
    }
    let _ = writeln!(
        out,
        "  3. state        RocksDB column family `listings`, key = (partition, `{}`); version gate drops stale and duplicate events; price history of `{}`",
        plan.key_field,
        plan.price_field
            .map(|i| plan.fields[i].name.as_str())
            .unwrap_or("(none)")
    );
    for lookup in &plan.lookups {
        let _ = writeln!(
            out,
            "                   lookup {} = {}[{}] ({} rows, broadcast to every worker; missing key -> {})",
            lookup.name,
            lookup.path.display(),
            name_of(plan, lookup.key),
            lookup.table.len(),
            lookup
                .default
                .as_ref()
                .map(|d| format!("{d:?}"))
                .unwrap_or("no value".into())
        );
    }
    if !plan.aggregates.is_empty() {
        let _ = writeln!(
            out,
            "  3b. market      differential dataflow on the same workers; members (+1/-1 per event) exchanged by segment id:"
        );
        for aggregate in &plan.aggregates {
            let keys: Vec<String> = aggregate
                .group_by
                .iter()
                .map(|(r, bucket)| match bucket {
                    Some(width) => format!("floor({} / {width})", name_of(plan, *r)),
                    None => name_of(plan, *r),
                })
                .collect();
            let measures: Vec<&str> = aggregate
                .measures
                .iter()
                .map(|m| plan.fields[*m].name.as_str())
                .collect();
            let _ = writeln!(
                out,
                "                   aggregate {}: key ({}) -> segment statistics [count; mean, p25, median, p75 of {}, from sorted values] -> round to {} significant digits -> broadcast to evaluators; bucket views -> join members by (segment, bucket) -> signatures exchanged to owner",
                aggregate.name,
                keys.join(", "),
                if measures.is_empty() {
                    "(none)".into()
                } else {
                    measures.join(", ")
                },
                aggregate.significant_digits
            );
            let names: Vec<String> = (0..aggregate.statistic_count())
                .map(|i| aggregate.statistic_name(&plan.fields, i))
                .collect();
            let _ = writeln!(out, "                     statistics: {}", names.join(", "));
            match &aggregate.projection {
                Some(projection) => {
                    let outputs: Vec<&str> = projection
                        .outputs
                        .iter()
                        .map(|i| plan.output_fields[*i].name.as_str())
                        .collect();
                    let carried: Vec<String> = projection
                        .carried
                        .iter()
                        .map(|r| name_of(plan, *r))
                        .collect();
                    let _ = writeln!(
                        out,
                        "                     re-evaluates a member when these outputs change for it: {} (members carry {}{})",
                        if outputs.is_empty() {
                            "(none)".to_string()
                        } else {
                            outputs.join(", ")
                        },
                        if carried.is_empty() {
                            "nothing".to_string()
                        } else {
                            carried.join(", ")
                        },
                        if carried.len() == 1 {
                            format!("; bucketed by {}, 32 buckets per octave", carried[0])
                        } else {
                            "; not bucketed".to_string()
                        }
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "                     re-evaluates every member when its rounded statistics move (a model, or an output mixing aggregates, reads them)"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "                   the state stage waits for epoch e-1 to be evaluated before applying epoch e (a neighbour is evaluated as of its epoch)"
        );
    }
    let _ = writeln!(
        out,
        "                   features: {}",
        plan.features
            .iter()
            .map(|f| format!("{} = {}", f.name, describe_function(plan, &f.function)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        out,
        "  4. score        batched per epoch, one run per model per batch, in order:"
    );
    for model in &plan.models {
        let inputs: Vec<String> = model
            .sidecar
            .inputs
            .iter()
            .map(|i| match i {
                SidecarInput::Numeric { name, .. } => name.clone(),
                SidecarInput::OneHot { name, categories } => {
                    format!("{name}[one-hot {}]", categories.len())
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "                   {} (version {}, {}): [{}] -> {}",
            model.name,
            model.sidecar.version,
            model.onnx_path.display(),
            inputs.join(", "),
            model.sidecar.outputs.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "  5. shape        derived: {}; bands: {}",
        plan.derived
            .iter()
            .map(|d| format!("{} = {}", d.name, describe_function(plan, &d.function)))
            .collect::<Vec<_>>()
            .join("; "),
        plan.bands
            .iter()
            .map(|b| format!(
                "{} from {} ({} steps, else {})",
                b.name,
                name_of(plan, b.source),
                b.steps.len(),
                b.otherwise
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let _ = writeln!(
        out,
        "                   document fields: {}",
        plan.output_fields
            .iter()
            .map(|f| match f.round_to {
                Some(rounding) => format!("{} (round {})", f.name, rounding.step),
                None => f.name.clone(),
            })
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        out,
        "  5b. gate        a document is emitted only when its output fields changed (hash in the listing's state); tombstones always; version = listing version << 32 | revision (incarnation << 16 | market re-emissions)"
    );
    if let Some(statistics) = &plan.statistics_binding {
        let _ = writeln!(
            out,
            "                   statistics changelog -> `{statistics}` (when the config binds it)"
        );
    }
    let _ = writeln!(
        out,
        "  6. sink         epoch order; a file written by worker 0 (every worker's records), Kafka by every worker (its own); binding `{}` (upserts and tombstones keyed by `{}`), dead letters `{}`",
        plan.output_binding, plan.key_field, plan.dead_letter_binding
    );
    let _ = writeln!(
        out,
        "\nstate: column families `listings` (per-listing state), `meta` (source positions, schema fingerprint), written in one batch per checkpoint"
    );
    out
}

fn describe_function(plan: &Plan, function: &Function) -> String {
    match function {
        Function::DaysOnMarket => "days_on_market()".into(),
        Function::PriceChangeCount => "price_change_count()".into(),
        Function::PriceDropPercent => "price_drop_percent()".into(),
        Function::DaysSincePriceChange => "days_since_price_change()".into(),
        Function::YearsSince { field } => format!("years_since({})", name_of(plan, *field)),
        Function::Ratio {
            numerator,
            denominator,
            min_denominator,
        } => match min_denominator {
            Some(floor) => format!(
                "{} / max({}, {floor})",
                name_of(plan, *numerator),
                name_of(plan, *denominator)
            ),
            None => format!(
                "{} / {}",
                name_of(plan, *numerator),
                name_of(plan, *denominator)
            ),
        },
    }
}

pub fn name_of(plan: &Plan, value: ValueRef) -> String {
    match value {
        ValueRef::Field(i) => plan.fields[i].name.clone(),
        ValueRef::Feature(i) => plan
            .features
            .get(i)
            .map(|f| f.name.clone())
            .unwrap_or_default(),
        ValueRef::ModelOutput { model, output } => {
            plan.models[model].sidecar.outputs[output].clone()
        }
        ValueRef::Derived(i) => plan.derived[i].name.clone(),
        ValueRef::Band(i) => plan.bands[i].name.clone(),
        ValueRef::Lookup(i) => plan.lookups[i].name.clone(),
        ValueRef::Statistic {
            aggregate,
            statistic,
        } => plan.aggregates[aggregate].statistic_name(&plan.fields, statistic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listings() -> Plan {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/listings.toml");
        load(&path).expect("the shipped topology compiles")
    }

    /// Kept model outputs are reused only when no model reads the market, and
    /// only under the models, features and lookups they were computed with.
    #[test]
    fn scoring_fingerprint_is_absent_when_a_model_reads_the_market_and_moves_with_its_inputs() {
        let plan = listings();
        let fingerprint = plan
            .scoring_fingerprint()
            .expect("the shipped models read no statistics");
        assert_eq!(plan.scoring_fingerprint(), Some(fingerprint), "stable");

        // a model input bound to a statistic, directly
        let mut direct = listings();
        direct.models[0].input_refs[0] = ValueRef::Statistic {
            aggregate: 0,
            statistic: 0,
        };
        assert_eq!(direct.scoring_fingerprint(), None);

        // through a feature that reads a statistic
        let market_feature = plan
            .features
            .iter()
            .position(|f| plan.function_reads_market(&f.function))
            .expect("the listings topology has a feature against the segment");
        let mut through_feature = listings();
        let last = through_feature.models.len() - 1;
        through_feature.models[last].input_refs[0] = ValueRef::Feature(market_feature);
        assert_eq!(through_feature.scoring_fingerprint(), None);

        // a model fed by one that reads the market reads it too
        let mut through_model = listings();
        through_model.models[0].input_refs[0] = ValueRef::Feature(market_feature);
        assert!(
            through_model.models[last]
                .input_refs
                .iter()
                .any(|input| matches!(input, ValueRef::ModelOutput { model: 0, .. })),
            "days to sell reads the valuation"
        );
        assert!(through_model.reads_market(&ValueRef::ModelOutput {
            model: 0,
            output: 0
        }));

        // a changed lookup table or feature changes what outputs are worth
        let mut other_table = listings();
        let lookup = other_table.lookups.first_mut().expect("a lookup table");
        let key = lookup.table.keys().next().cloned().unwrap();
        lookup
            .table
            .insert(key, crate::record::Value::Str("changed".into()));
        assert_ne!(other_table.scoring_fingerprint(), Some(fingerprint));
        let mut other_feature = listings();
        other_feature.features.swap(0, 1);
        assert_ne!(other_feature.scoring_fingerprint(), Some(fingerprint));

        assert_ne!(
            Plan::scoring_stamp(fingerprint, 7),
            Plan::scoring_stamp(fingerprint, 8)
        );
    }
}
