//! The sidecar written beside each ONNX file by its training script: input
//! encoding in order, outputs, version. The engine builds the model's input
//! row from it, so the trainer and the engine cannot disagree on encoding.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Sidecar {
    pub name: String,
    /// Stamped on every document the model scores.
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// Name of the ONNX input tensor, float32 [batch, input_width].
    pub input_tensor: String,
    pub input_width: usize,
    pub inputs: Vec<SidecarInput>,
    /// One column per output, in the order of the output tensor's columns.
    pub outputs: Vec<String>,
    /// What the trainer measured; informational.
    #[serde(default)]
    pub metrics: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SidecarInput {
    /// A number: a missing value becomes `fill`, then clipped to [min, max],
    /// then ln(1 + x) when `log1p`.
    Numeric {
        name: String,
        fill: f64,
        min: f64,
        max: f64,
        #[serde(default)]
        log1p: bool,
    },
    /// A string: one column per category, 1.0 where it equals the value.
    OneHot {
        name: String,
        categories: Vec<String>,
    },
}

impl SidecarInput {
    pub fn width(&self) -> usize {
        match self {
            SidecarInput::Numeric { .. } => 1,
            SidecarInput::OneHot { categories, .. } => categories.len(),
        }
    }
}

impl Sidecar {
    pub fn load(path: &Path) -> Result<Sidecar, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read sidecar {}: {e}", path.display()))?;
        let sidecar: Sidecar = serde_json::from_str(&text).map_err(|e| {
            format!(
                "sidecar {}:{}:{}: {e}",
                path.display(),
                e.line(),
                e.column()
            )
        })?;
        let width: usize = sidecar.inputs.iter().map(SidecarInput::width).sum();
        if width != sidecar.input_width {
            return Err(format!(
                "sidecar {}: inputs encode to {width} columns but input_width is {}",
                path.display(),
                sidecar.input_width
            ));
        }
        if sidecar.outputs.is_empty() {
            return Err(format!("sidecar {}: no outputs", path.display()));
        }
        Ok(sidecar)
    }
}
