//! Building the timely dataflow from a plan, and the worker loop that feeds
//! it, applies back-pressure and checkpoints.
//!
//! ```text
//! input ─► decode ─┬─► listing_state ─┬─► score+shape ─► [exchange to 0] documents sink ─► probe
//!                  │ dead             │ dead
//!                  └──────────────────┴─► [exchange to 0] dead-letter sink ──────────────► probe
//! ```
//!
//! # Epochs and checkpoints
//! Epoch = line number / `epoch_records`, a pure function of the input, so
//! batching and output order never depend on timing. A worker checkpoints
//! when every epoch it has sent is complete (the probe has passed its input
//! time): its dirty listing states and its partitions' positions go to
//! RocksDB in one batch. Output for those epochs was flushed before the probe
//! could pass them (see `sink`).

pub mod decode;
pub mod listing_state;
pub mod score;
pub mod shape;
pub mod sink;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, Concat, Input, OkErr, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use crate::config::{Binding, EnvConfig};
use crate::connectors::file::sink::FileSink;
use crate::connectors::file::source::FileSource;
use crate::model::LoadedModel;
use crate::observe::{LatencyHistogram, ProgressBar, RunSummary, WorkerReport};
use crate::record::{DeadLetter, OutputDocument, RawRecord};
use crate::state::{StateError, Store, StoreTuning};
use crate::topology::Plan;
use listing_state::{Enriched, ListingStateStage};
use score::Scorer;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Sink(#[from] crate::connectors::file::sink::FileSinkError),
    #[error("worker {worker} failed: {detail}")]
    Worker { worker: usize, detail: String },
    #[error("cannot discard old state at {path}: {detail}")]
    Reset { path: PathBuf, detail: String },
}

/// Choices made on the command line rather than in the config.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Discard the state directory and the output files first.
    pub from_scratch: bool,
    /// Force the progress bar on or off (default: the config's choice).
    pub progress: Option<bool>,
    /// Benchmark baseline: decode and re-encode only (no state, no scoring).
    pub pass_through: bool,
}

/// What the sinks on worker 0 counted.
#[derive(Default)]
struct SinkCounts {
    upserts: u64,
    tombstones: u64,
    dead_letters: BTreeMap<String, u64>,
    latency: LatencyHistogram,
}

fn file_path(config: &EnvConfig, name: &str) -> PathBuf {
    match config.binding(name).expect("validated: every binding exists") {
        Binding::File(file) => file.path.clone(),
    }
}

/// Runs the topology to the end of its input and returns the summary.
pub fn run(plan: Arc<Plan>, config: &EnvConfig, models: Arc<Vec<LoadedModel>>, options: &RunOptions) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let state_path = config.state.dir.join(&plan.name);
    let documents_path = file_path(config, &plan.output_binding);
    let dead_letters_path = file_path(config, &plan.dead_letter_binding);
    if options.from_scratch && state_path.exists() {
        std::fs::remove_dir_all(&state_path).map_err(|e| RunError::Reset { path: state_path.clone(), detail: e.to_string() })?;
    }
    let tuning = StoreTuning { block_cache_bytes: config.state.block_cache_mb << 20, write_buffer_bytes: config.state.write_buffer_mb << 20 };
    let store = Store::open(&state_path, &plan.field_fingerprint(), tuning)?;
    let document_sink = Arc::new(Mutex::new(Some(FileSink::open(&documents_path, options.from_scratch)?)));
    let dead_letter_sink = Arc::new(Mutex::new(Some(FileSink::open(&dead_letters_path, options.from_scratch)?)));

    let input = config.input_file(&plan).clone();
    let runtime = config.runtime.clone();
    let workers = runtime.workers;
    let progress_enabled = options.progress.or(match runtime.progress {
        crate::config::ProgressMode::Always => Some(true),
        crate::config::ProgressMode::Never => Some(false),
        crate::config::ProgressMode::Auto => None,
    });

    let pass_through = options.pass_through;
    let worker_plan = plan.clone();
    let guards = timely::execute(timely::Config::process(workers), move |worker| -> Result<WorkerReport, String> {
        let plan = worker_plan.clone();
        let index = worker.index();
        let peers = worker.peers();
        let owned: Vec<u32> = (0..input.partitions).filter(|p| *p as usize % peers == index).collect();
        let checkpointed = store.positions(&plan.input_binding).map_err(|e| e.to_string())?;
        let mut source = FileSource::open(&input.path, &plan.key_field, input.partitions, &owned, &checkpointed, input.records_per_second, started)
            .map_err(|e| e.to_string())?;
        let stage = Rc::new(RefCell::new(ListingStateStage::new(plan.clone(), store.clone())));
        let counts = Rc::new(RefCell::new(SinkCounts::default()));
        let sink_error: Rc<RefCell<Option<String>>> = Rc::new(RefCell::new(None));
        let (mut documents_out, mut dead_out) = if index == 0 {
            (document_sink.lock().unwrap().take(), dead_letter_sink.lock().unwrap().take())
        } else {
            (None, None)
        };

        let mut input_handle: InputHandle<u64, timely::container::CapacityContainerBuilder<Vec<RawRecord>>> = InputHandle::new();
        let probe = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let raw = scope.input_from(&mut input_handle);
            let decode_plan = plan.clone();
            let max_record_bytes = input.max_record_bytes;
            let (events, decode_dead) = raw.ok_err::<Vec<_>, _, Vec<_>, _, _>(move |raw: RawRecord| decode::decode(&decode_plan, max_record_bytes, raw));

            let (documents, state_dead) = if pass_through {
                let encode_plan = plan.clone();
                let documents = events.unary::<timely::container::CapacityContainerBuilder<Vec<OutputDocument>>, _, _, _>(Pipeline, "PassThrough", move |_, _| {
                    move |input, output| {
                        input.for_each_stamp(|capability, containers| {
                            let mut session = output.session(&capability);
                            for container in containers {
                                session.give_iterator(container.drain(..).map(|event| shape::pass_through_document(&encode_plan, event)));
                            }
                        });
                    }
                });
                let no_dead = documents.clone().unary::<timely::container::CapacityContainerBuilder<Vec<DeadLetter>>, _, _, _>(Pipeline, "NoDeadLetters", |_, _| |input, _output| input.for_each(|_, _| {}));
                (documents, no_dead)
            } else {
                let state_stage = stage.clone();
                let gated = events.unary::<timely::container::CapacityContainerBuilder<Vec<Result<Enriched, DeadLetter>>>, _, _, _>(Pipeline, "ListingState", move |_, _| {
                    move |input, output| {
                        input.for_each_stamp(|capability, containers| {
                            let mut session = output.session(&capability);
                            for container in containers {
                                let batch = std::mem::take(container);
                                let results = state_stage.borrow_mut().process(batch).unwrap_or_else(|e| panic!("listing state: {e}"));
                                session.give_iterator(results.into_iter());
                            }
                        });
                    }
                });
                let (enriched, state_dead) = gated.ok_err::<Vec<_>, _, Vec<_>, _, _>(|result: Result<Enriched, DeadLetter>| result);

                let mut scorer = Scorer::new(plan.clone(), models.clone());
                let documents = enriched.unary_frontier::<timely::container::CapacityContainerBuilder<Vec<OutputDocument>>, _, _, _>(Pipeline, "Score", move |_, _| {
                    let mut pending: BTreeMap<u64, (Capability<u64>, Vec<Enriched>)> = BTreeMap::new();
                    move |(input, frontier), output| {
                        input.for_each_stamp(|capability, containers| {
                            let Some(capability) = capability.retain_least(0) else { return };
                            let entry = pending.entry(*capability.time()).or_insert_with(|| (capability, Vec::new()));
                            for container in containers {
                                entry.1.append(container);
                            }
                        });
                        while let Some(entry) = pending.first_entry() {
                            if frontier.less_equal(entry.key()) {
                                break;
                            }
                            let (capability, rows) = entry.remove();
                            let documents = scorer.score_batch(rows).unwrap_or_else(|e| panic!("{e}"));
                            output.session(&capability).give_iterator(documents.into_iter());
                        }
                    }
                });
                (documents, state_dead)
            };

            let document_counts = counts.clone();
            let document_error = sink_error.clone();
            sink::write_in_epoch_order(documents, "DocumentSink", |d: &OutputDocument| (d.position.offset, d.position.partition), move |_epoch, documents| {
                let Some(out) = documents_out.as_mut() else { return };
                let mut counts = document_counts.borrow_mut();
                let now = started.elapsed().as_nanos() as u64;
                for document in &documents {
                    if let Err(e) = out.write_document(document) {
                        *document_error.borrow_mut() = Some(e.to_string());
                        return;
                    }
                    if document.body.is_some() { counts.upserts += 1 } else { counts.tombstones += 1 }
                    counts.latency.record(now.saturating_sub(document.read_at_nanos));
                }
                if let Err(e) = out.flush() {
                    *document_error.borrow_mut() = Some(e.to_string());
                }
            })
            .probe_with(&probe);

            let dead_counts = counts.clone();
            let dead_error = sink_error.clone();
            let dead_binding = plan.input_binding.clone();
            sink::write_in_epoch_order(decode_dead.concat(state_dead), "DeadLetterSink", |d: &DeadLetter| (d.position.offset, d.position.partition), move |_epoch, letters| {
                let Some(out) = dead_out.as_mut() else { return };
                let mut counts = dead_counts.borrow_mut();
                let now = started.elapsed().as_nanos() as u64;
                for letter in &letters {
                    if let Err(e) = out.write_dead_letter(letter, &dead_binding) {
                        *dead_error.borrow_mut() = Some(e.to_string());
                        return;
                    }
                    *counts.dead_letters.entry(letter.reason.clone()).or_default() += 1;
                    counts.latency.record(now.saturating_sub(letter.read_at_nanos));
                }
                if let Err(e) = out.flush() {
                    *dead_error.borrow_mut() = Some(e.to_string());
                }
            })
            .probe_with(&probe);
        });

        let mut report = WorkerReport { resumed_from_line: source.next_line(), ..WorkerReport::default() };
        let mut progress = ProgressBar::new(if index == 0 { progress_enabled } else { Some(false) });
        let epoch_records = runtime.epoch_records;
        let mut epoch = source.next_line() / epoch_records;
        input_handle.advance_to(epoch);
        let checkpoint_interval = Duration::from_millis(runtime.checkpoint_interval_ms);
        let mut last_checkpoint = Instant::now();
        let mut batch: Vec<RawRecord> = Vec::with_capacity(epoch_records as usize);
        let checkpoint = |stage: &Rc<RefCell<ListingStateStage>>, source: &FileSource, report: &mut WorkerReport| -> Result<(), String> {
            if let Some(error) = sink_error.borrow().as_ref() {
                return Err(format!("output failed, no checkpoint written: {error}"));
            }
            stage.borrow_mut().checkpoint(&plan.input_binding, &source.positions()).map_err(|e| e.to_string())?;
            report.checkpoints += 1;
            Ok(())
        };
        while !source.finished() {
            source.read_until((epoch + 1) * epoch_records, &mut batch).map_err(|e| e.to_string())?;
            report.records_in += batch.len() as u64;
            if !batch.is_empty() {
                input_handle.send_batch(&mut batch);
                batch.clear();
            }
            epoch += 1;
            input_handle.advance_to(epoch);
            worker.step();
            // back-pressure: stay at most max_epochs_in_flight ahead of the sinks
            while probe.less_than(&epoch.saturating_sub(runtime.max_epochs_in_flight)) {
                worker.step();
            }
            let (done, total) = source.progress();
            progress.update(done, total, report.records_in * peers as u64);
            if last_checkpoint.elapsed() >= checkpoint_interval {
                while probe.less_than(input_handle.time()) {
                    worker.step();
                }
                checkpoint(&stage, &source, &mut report)?;
                last_checkpoint = Instant::now();
            }
        }
        drop(input_handle);
        while !probe.done() {
            worker.step();
        }
        checkpoint(&stage, &source, &mut report)?;
        progress.finish();
        let gate = stage.borrow().counts;
        report.stale = gate.stale;
        report.duplicates = gate.duplicates;
        let counts = counts.borrow();
        report.upserts = counts.upserts;
        report.tombstones = counts.tombstones;
        report.dead_letters = counts.dead_letters.clone();
        report.latency = counts.latency.clone();
        Ok(report)
    })
    .map_err(|e| RunError::Worker { worker: 0, detail: e })?;

    let mut total = WorkerReport::default();
    for (worker, result) in guards.join().into_iter().enumerate() {
        match result {
            Ok(Ok(report)) => total.merge(&report),
            Ok(Err(detail)) | Err(detail) => return Err(RunError::Worker { worker, detail }),
        }
    }
    Ok(RunSummary::new(&plan.name, workers, &total, started.elapsed()))
}
