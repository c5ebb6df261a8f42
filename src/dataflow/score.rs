//! Scoring: every model once per epoch batch, in topology order.
//!
//! A model's inputs come from fields, features or earlier models' outputs
//! (resolved at compile time). Tombstones skip scoring, and so do rows whose
//! outputs the caller already knows (a market re-evaluation of a listing
//! whose models read nothing of the market: see `Plan::scoring_fingerprint`).

use std::sync::Arc;

use smallvec::SmallVec;

use crate::dataflow::listing_state::Enriched;
use crate::dataflow::market::lookup_value;
use crate::dataflow::shape;
use crate::model::{InputValue, LoadedModel, ModelError};
use crate::topology::{Plan, ValueRef};

/// A shaped document and the model outputs it was shaped from.
pub struct ScoredDocument {
    pub body: String,
    /// Where the output fields start in `body`: what the change gate hashes.
    pub gate_start: usize,
    /// Every model's outputs, in topology order, flattened.
    pub scores: SmallVec<[f32; 4]>,
}

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

    /// Scores one batch and shapes every row: the document body, where its
    /// output fields start (what the change gate compares) and the models'
    /// outputs (every model's, flattened), or `None` for a tombstone.
    ///
    /// `kept[i]` is row i's model outputs when they are known already (see
    /// `Plan::scoring_stamp`): such a row is shaped from them, not scored.
    pub fn score_batch(
        &mut self,
        rows: &[&Enriched],
        kept: &[Option<&[f32]>],
    ) -> Result<Vec<Option<ScoredDocument>>, ModelError> {
        let scored_rows: Vec<usize> = rows
            .iter()
            .enumerate()
            .filter(|(i, r)| !r.deleted && kept[*i].is_none())
            .map(|(i, _)| i)
            .collect();
        // outputs[model][scored_row * outputs + column]
        let mut outputs: Vec<Vec<f32>> = Vec::with_capacity(self.models.len());
        for (model_index, model) in self.models.iter().enumerate() {
            let refs = &self.plan.models[model_index].input_refs;
            self.encoded.clear();
            self.encoded.reserve(scored_rows.len() * model.width());
            for (scored_row, row_index) in scored_rows.iter().enumerate() {
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
                            InputValue::Number(
                                outputs_so_far[m][scored_row * width + output] as f64,
                            )
                        }
                        ValueRef::Derived(_) | ValueRef::Band(_) => InputValue::Missing,
                    },
                    &mut encoded,
                );
                self.encoded = encoded;
            }
            let encoded = std::mem::take(&mut self.encoded);
            let scores = if scored_rows.is_empty() {
                Vec::new()
            } else {
                model.score_batch(scored_rows.len(), encoded)?
            };
            outputs.push(scores);
        }
        let mut documents = Vec::with_capacity(rows.len());
        let mut scored_row = 0;
        for (row_index, row) in rows.iter().enumerate() {
            if row.deleted {
                documents.push(None);
                continue;
            }
            let scores: SmallVec<[f32; 4]> = match kept[row_index] {
                // (from_slice copies at once; collecting from an iterator
                // pushes a value at a time)
                Some(scores) => SmallVec::from_slice(scores),
                None => {
                    let mut scores = SmallVec::new();
                    for (m, model) in self.models.iter().enumerate() {
                        let width = model.outputs();
                        scores.extend_from_slice(
                            &outputs[m][scored_row * width..(scored_row + 1) * width],
                        );
                    }
                    scored_row += 1;
                    scores
                }
            };
            let (body, gate_start) = {
                let mut model_values: SmallVec<[&[f32]; 4]> = SmallVec::new();
                let mut at = 0;
                for model in self.models.iter() {
                    model_values.push(&scores[at..at + model.outputs()]);
                    at += model.outputs();
                }
                shape::document_body(&self.shaper, &self.plan, row, &model_values)
            };
            documents.push(Some(ScoredDocument {
                body,
                gate_start,
                scores,
            }));
        }
        Ok(documents)
    }
}
