//! Scoring: every model once per epoch batch, in topology order.
//!
//! A model's inputs come from fields, features or earlier models' outputs
//! (resolved at compile time). Tombstones skip scoring.

use std::sync::Arc;

use crate::dataflow::listing_state::Enriched;
use crate::dataflow::market::lookup_value;
use crate::dataflow::shape;
use crate::model::{InputValue, LoadedModel, ModelError};
use crate::topology::{Plan, ValueRef};

pub struct Scorer {
    plan: Arc<Plan>,
    models: Arc<Vec<LoadedModel>>,
    encoded: Vec<f32>,
    shaper: shape::Shaper,
}

impl Scorer {
    pub fn new(plan: Arc<Plan>, models: Arc<Vec<LoadedModel>>) -> Self {
        Scorer {
            shaper: shape::Shaper::new(&plan, &models),
            plan,
            models,
            encoded: Vec::new(),
        }
    }

    /// Scores one batch and shapes every row: the document body and where its
    /// output fields start (what the change gate compares), or `None` for a
    /// tombstone.
    pub fn score_batch(
        &mut self,
        rows: &[&Enriched],
    ) -> Result<Vec<Option<(String, usize)>>, ModelError> {
        let live: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.deleted)
            .map(|(i, _)| i)
            .collect();
        // outputs[model][live_row * outputs + column]
        let mut outputs: Vec<Vec<f32>> = Vec::with_capacity(self.models.len());
        for (model_index, model) in self.models.iter().enumerate() {
            let refs = &self.plan.models[model_index].input_refs;
            self.encoded.clear();
            self.encoded.reserve(live.len() * model.width());
            for (live_row, row_index) in live.iter().enumerate() {
                let row = &rows[*row_index];
                let outputs_so_far = &outputs;
                let mut encoded = std::mem::take(&mut self.encoded);
                let plan = &self.plan;
                model.encode_row(
                    |input| match refs[input] {
                        ValueRef::Field(i) => InputValue::of(row.state.fields[i].as_ref()),
                        ValueRef::Feature(i) => row.features[i]
                            .map(InputValue::Number)
                            .unwrap_or(InputValue::Missing),
                        ValueRef::Lookup(i) => {
                            InputValue::of(lookup_value(plan, i, &row.state.fields, &mut false))
                        }
                        ValueRef::Statistic {
                            aggregate,
                            statistic,
                        } => match row.market.get(plan.statistic_offset(aggregate, statistic)) {
                            Some(x) if !x.is_nan() => InputValue::Number(*x),
                            _ => InputValue::Missing,
                        },
                        ValueRef::ModelOutput { model: m, output } => {
                            let width = self.models[m].outputs();
                            InputValue::Number(outputs_so_far[m][live_row * width + output] as f64)
                        }
                        ValueRef::Derived(_) | ValueRef::Band(_) => InputValue::Missing,
                    },
                    &mut encoded,
                );
                self.encoded = encoded;
            }
            let encoded = std::mem::take(&mut self.encoded);
            let scores = model.score_batch(live.len(), encoded)?;
            outputs.push(scores);
        }
        let mut documents = Vec::with_capacity(rows.len());
        let mut live_row = 0;
        for row in rows {
            if row.deleted {
                documents.push(None);
                continue;
            }
            let model_values: smallvec::SmallVec<[&[f32]; 4]> = self
                .models
                .iter()
                .enumerate()
                .map(|(m, model)| {
                    let width = model.outputs();
                    &outputs[m][live_row * width..(live_row + 1) * width]
                })
                .collect();
            documents.push(Some(shape::document_body(
                &self.shaper,
                &self.plan,
                row,
                &model_values,
            )));
            live_row += 1;
        }
        Ok(documents)
    }
}
