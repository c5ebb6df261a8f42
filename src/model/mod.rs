//! ONNX models through tract: load once, check against the golden file, score
//! batches.
//!
//! # Batching
//! A model's input is float32 `[N, input_width]` with `N` symbolic, so one
//! optimized plan serves every batch size; the score stage runs each model
//! once per epoch over every row of the epoch.

pub mod sidecar;

use std::path::PathBuf;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use tract_onnx::prelude::*;

use crate::record::Value;
use crate::topology::{ModelPlan, Plan};
use sidecar::{Sidecar, SidecarInput};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model `{model}` ({path}) cannot be loaded: {detail}")]
    Load {
        model: String,
        path: PathBuf,
        detail: String,
    },
    #[error("model `{model}` failed its golden check: {detail}")]
    Golden { model: String, detail: String },
    #[error("model `{model}` failed to score a batch of {rows}: {detail}")]
    Run {
        model: String,
        rows: usize,
        detail: String,
    },
}

/// A model ready to score: an optimized plan shared by every worker.
#[derive(Clone)]
pub struct LoadedModel {
    pub name: String,
    pub version: String,
    pub sidecar: Sidecar,
    runnable: Arc<TypedRunnableModel>,
    /// For each one-hot input (by input index), each category's column. A
    /// row looked its value up by comparing it with every category in turn
    /// (50 two-letter states: a memcmp each); the map spares 0.3% of the
    /// full pipeline's instructions (callgrind, 100,000 events).
    category_columns: Arc<Vec<Option<CategoryColumns>>>,
}

/// A one-hot input's column for each of its categories.
type CategoryColumns = FxHashMap<Box<str>, usize>;

/// A borrowed value for encoding model inputs.
#[derive(Debug, Clone, Copy)]
pub enum InputValue<'a> {
    Number(f64),
    Text(&'a str),
    Missing,
}

impl<'a> InputValue<'a> {
    pub fn of(value: Option<&'a Value>) -> InputValue<'a> {
        match value {
            Some(Value::Int(i)) => InputValue::Number(*i as f64),
            Some(Value::Num(n)) => InputValue::Number(*n),
            Some(Value::Str(s)) => InputValue::Text(s),
            None => InputValue::Missing,
        }
    }
}

impl LoadedModel {
    pub fn load(plan: &ModelPlan) -> Result<LoadedModel, ModelError> {
        let load_error = |detail: String| ModelError::Load {
            model: plan.name.clone(),
            path: plan.onnx_path.clone(),
            detail,
        };
        let runnable = tract_onnx::onnx()
            .model_for_path(&plan.onnx_path)
            .and_then(|model| model.into_optimized())
            .and_then(|model| model.into_runnable())
            .map_err(|e| load_error(format!("{e:#}")))?;
        let category_columns = plan
            .sidecar
            .inputs
            .iter()
            .map(|input| match input {
                SidecarInput::OneHot { categories, .. } => {
                    let mut columns = FxHashMap::default();
                    for (column, category) in categories.iter().enumerate() {
                        // a repeated category keeps its first column, as a scan finds it
                        columns.entry(category.as_str().into()).or_insert(column);
                    }
                    Some(columns)
                }
                SidecarInput::Numeric { .. } => None,
            })
            .collect();
        let model = LoadedModel {
            name: plan.name.clone(),
            version: plan.sidecar.version.clone(),
            sidecar: plan.sidecar.clone(),
            runnable,
            category_columns: Arc::new(category_columns),
        };
        model.check_golden(plan)?;
        Ok(model)
    }

    pub fn width(&self) -> usize {
        self.sidecar.input_width
    }

    pub fn outputs(&self) -> usize {
        self.sidecar.outputs.len()
    }

    /// Appends one encoded input row; `value(i)` gives the sidecar's i-th input.
    pub fn encode_row<'a>(
        &self,
        mut value: impl FnMut(usize) -> InputValue<'a>,
        row: &mut Vec<f32>,
    ) {
        for (index, input) in self.sidecar.inputs.iter().enumerate() {
            let v = value(index);
            match input {
                SidecarInput::Numeric {
                    fill,
                    min,
                    max,
                    log1p,
                    ..
                } => {
                    let x = match v {
                        InputValue::Number(x) if x.is_finite() => x,
                        _ => *fill,
                    };
                    let x = x.clamp(*min, *max);
                    row.push(if *log1p { x.ln_1p() as f32 } else { x as f32 });
                }
                SidecarInput::OneHot { categories, .. } => {
                    let text = match v {
                        InputValue::Text(t) => Some(t),
                        _ => None,
                    };
                    let start = row.len();
                    row.resize(start + categories.len(), 0.0);
                    let columns = self.category_columns[index].as_ref();
                    if let Some(hit) = text.and_then(|t| columns?.get(t)) {
                        row[start + hit] = 1.0;
                    }
                }
            }
        }
    }

    /// Scores `rows` encoded rows in one run; returns `rows * outputs` values, row-major.
    pub fn score_batch(&self, rows: usize, encoded: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        let run_error = |detail: String| ModelError::Run {
            model: self.name.clone(),
            rows,
            detail,
        };
        if rows == 0 {
            return Ok(Vec::new());
        }
        let input = tract_ndarray::Array2::from_shape_vec((rows, self.width()), encoded)
            .map_err(|e| run_error(e.to_string()))?;
        let outputs = self
            .runnable
            .run(tvec!(Tensor::from(input).into()))
            .map_err(|e| run_error(format!("{e:#}")))?;
        let view = outputs[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| run_error(format!("{e:#}")))?;
        if view.len() != rows * self.outputs() {
            return Err(run_error(format!(
                "output has {} values, expected {}",
                view.len(),
                rows * self.outputs()
            )));
        }
        Ok(view.iter().copied().collect())
    }

    /// Scores the golden inputs and refuses the model when any prediction
    /// differs from the trainer's by more than the tolerance (relative).
    fn check_golden(&self, plan: &ModelPlan) -> Result<(), ModelError> {
        let golden_error = |detail: String| ModelError::Golden {
            model: self.name.clone(),
            detail,
        };
        let text = std::fs::read_to_string(&plan.golden_path).map_err(|e| {
            golden_error(format!("cannot read {}: {e}", plan.golden_path.display()))
        })?;
        let cases: Vec<GoldenCase> = serde_json::from_str(&text)
            .map_err(|e| golden_error(format!("{}: {e}", plan.golden_path.display())))?;
        if cases.is_empty() {
            return Err(golden_error(format!(
                "{} has no cases",
                plan.golden_path.display()
            )));
        }
        let mut encoded = Vec::with_capacity(cases.len() * self.width());
        for case in &cases {
            self.encode_row(
                |i| {
                    let name = match &self.sidecar.inputs[i] {
                        SidecarInput::Numeric { name, .. } | SidecarInput::OneHot { name, .. } => {
                            name
                        }
                    };
                    match case.inputs.get(name) {
                        Some(serde_json::Value::Number(n)) => {
                            InputValue::Number(n.as_f64().unwrap_or(f64::NAN))
                        }
                        Some(serde_json::Value::String(s)) => InputValue::Text(s),
                        _ => InputValue::Missing,
                    }
                },
                &mut encoded,
            );
        }
        let scores = self.score_batch(cases.len(), encoded)?;
        let mut worst: Option<(usize, String, f64, f64, f64)> = None;
        for (row, case) in cases.iter().enumerate() {
            for (column, output) in self.sidecar.outputs.iter().enumerate() {
                let expected =
                    case.outputs.get(output).copied().ok_or_else(|| {
                        golden_error(format!("case {row} has no output `{output}`"))
                    })?;
                let ours = scores[row * self.outputs() + column] as f64;
                let relative = (ours - expected).abs() / expected.abs().max(1e-9);
                if relative > plan.golden_tolerance
                    && worst.as_ref().map(|w| relative > w.4).unwrap_or(true)
                {
                    worst = Some((row, output.clone(), expected, ours, relative));
                }
            }
        }
        match worst {
            None => Ok(()),
            Some((row, output, expected, ours, relative)) => Err(golden_error(format!(
                "case {row} of {}: `{output}` is {ours} here but the trainer saw {expected} (relative difference {relative:.2e} > tolerance {:.0e}); \
                 the ONNX file and its golden file do not belong together: retrain with scripts/train-models.sh or restore the file",
                plan.golden_path.display(),
                plan.golden_tolerance
            ))),
        }
    }
}

#[derive(serde::Deserialize)]
struct GoldenCase {
    inputs: std::collections::BTreeMap<String, serde_json::Value>,
    outputs: std::collections::BTreeMap<String, f64>,
}

/// Loads every model of the plan, in order, each checked against its golden file.
pub fn load_all(plan: &Plan) -> Result<Vec<LoadedModel>, ModelError> {
    plan.models.iter().map(LoadedModel::load).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// One-hot columns come from a map built at load; they must be the
    /// columns a scan of the categories finds, for every category of the
    /// shipped models, and none for a value outside them.
    #[test]
    fn one_hot_columns_are_those_a_scan_of_the_categories_finds() {
        let topology = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/listings.toml");
        let plan = crate::topology::load(&topology).unwrap_or_else(|d| panic!("{d:?}"));
        let models = load_all(&plan).unwrap();
        let mut checked = 0;
        for model in &models {
            let mut offset = 0;
            for (index, input) in model.sidecar.inputs.iter().enumerate() {
                let width = input.width();
                if let SidecarInput::OneHot { categories, .. } = input {
                    let values = categories.iter().map(String::as_str).chain([
                        "",
                        "not a category",
                        "E-CLASS",
                    ]);
                    for text in values {
                        let mut row = Vec::new();
                        model.encode_row(
                            |i| {
                                if i == index {
                                    InputValue::Text(text)
                                } else {
                                    InputValue::Missing
                                }
                            },
                            &mut row,
                        );
                        let mut expected = vec![0.0; width];
                        if let Some(hit) = categories.iter().position(|c| c == text) {
                            expected[hit] = 1.0;
                        }
                        assert_eq!(
                            row[offset..offset + width],
                            expected[..],
                            "model {}, input {index}, value {text:?}",
                            model.name
                        );
                        checked += 1;
                    }
                }
                offset += width;
            }
        }
        assert!(checked > 20, "{checked} values checked");
    }
}
