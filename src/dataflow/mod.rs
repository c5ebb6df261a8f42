//! Building the timely dataflow from a plan, and the worker loop that feeds
//! it, applies back-pressure and checkpoints.
//!
//! ```text
//! input ─► decode ─┬─► listing_state ─┬─► score+shape ─► [to the writer] documents sink ─► probe
//!                  │ dead             │ dead
//!                  └──────────────────┴─► [to the writer] dead-letter sink ──────────────► probe
//! ```
//!
//! The writer is worker 0 for a file (one deterministic file from every
//! worker's records) and each worker itself for Kafka (see `Sink::for_workers`).
//!
//! # Epochs and checkpoints
//! Epoch = line number / `epoch_records`, a pure function of the input, so
//! batching and output order never depend on timing (Kafka: a shared clock).
//! Dataflow times are epochs + 1: time `first_epoch` belongs to the rebuild of
//! the market arrangements after a restart. All workers checkpoint through the
//! same epoch, proposed by worker 0 (see the worker loop), once every epoch
//! they sent is complete (the probe has passed their input time): dirty
//! listing states and the partitions' positions go to RocksDB in one batch.
//! Output for those epochs was flushed before the probe could pass them (see
//! `sink`).

pub mod bucket_views;
pub mod decode;
pub mod deferred_evaluations;
pub mod evaluate;
pub mod listing_state;
pub mod market;
pub mod member_arrangement;
pub mod score;
pub mod segment_statistics;
pub mod shape;
pub mod signature_builder;
pub mod sink;
pub mod statistics;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::cell::Cell;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::operators::{Capability, Concat, Input, OkErr, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use crate::config::{Binding, EnvConfig};
use crate::connectors::file::sink::FileSink;
use crate::connectors::file::source::FileSource;
use crate::connectors::kafka::sink::KafkaSink;
use crate::connectors::kafka::source::KafkaSource;
use crate::connectors::{Sink, Source};
use crate::model::LoadedModel;
use crate::observe::{LatencyHistogram, ProgressBar, RunSummary, WorkerReport};
use crate::record::{DeadLetter, OutputDocument, RawRecord};
use crate::state::{StateError, Store, StoreTuning};
use crate::topology::Plan;
use listing_state::ListingStateStage;

/// How long a worker parks between steps when it waits (for records,
/// back-pressure, a checkpoint or the end). Timely wakes a parked worker as
/// soon as data or progress arrives for it, so this only bounds the wait for
/// what timely does not signal (new records). Timely first polls for
/// `idle_spin` (10 us), so a short wait never parks.
///
/// Every source parks, a file replay too. A replay that stepped without
/// parking spun in its back-pressure loop whenever the other worker was
/// behind, and on 2 cores the spinning worker took CPU from the one it waited
/// for: on 2 workers the full topology spent about 7% of its CPU polling empty
/// channels (`try_recv`), and parking gave it about 9% more events/s over
/// three alternating runs, pass-through and 1 worker moving less than their
/// spread (stop 29, docs/benchmarks.md). Spinning also took a core from the
/// broker on small machines.
const WAIT_PARK: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Sink(#[from] crate::connectors::file::sink::FileSinkError),
    #[error(transparent)]
    KafkaSink(#[from] crate::connectors::kafka::sink::KafkaSinkError),
    #[error(transparent)]
    KafkaSetup(#[from] crate::connectors::kafka::KafkaSetupError),
    #[error("worker {worker} failed: {detail}")]
    Worker { worker: usize, detail: String },
    #[error("cannot discard old state at {path}: {detail}")]
    Reset { path: PathBuf, detail: String },
    #[error(
        "output file {} already holds {bytes} bytes, but the state directory {} is new: this run would read its input from the beginning and append a second copy after them\n  hint: pass --from-scratch to start the outputs afresh, or move the file away to keep it",
        path.display(),
        state.display()
    )]
    OutputWithoutState {
        path: PathBuf,
        bytes: u64,
        state: PathBuf,
    },
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

/// What this worker's sinks counted (merged over the workers at the end).
#[derive(Default)]
pub(crate) struct SinkCounts {
    upserts: u64,
    tombstones: u64,
    /// Of the documents, those emitted because the market moved.
    market_documents: u64,
    dead_letters: BTreeMap<String, u64>,
    latency: LatencyHistogram,
}

/// Output order within an epoch: documents of events by source position, then
/// market re-emissions by (partition, listing id). Independent of the worker count.
fn document_order(a: &OutputDocument, b: &OutputDocument) -> std::cmp::Ordering {
    a.market.cmp(&b.market).then_with(|| {
        if a.market {
            (a.position.partition, &a.key).cmp(&(b.position.partition, &b.key))
        } else {
            (a.position.offset, a.position.partition)
                .cmp(&(b.position.offset, b.position.partition))
        }
    })
}

/// One output binding's sinks, a slot per worker (see `Sink::for_workers`).
struct WorkerSinks {
    slots: Mutex<Vec<Option<Sink>>>,
    /// whether each worker writes its own records, or sends them to worker 0
    every_worker: bool,
}

impl WorkerSinks {
    fn new(sink: Sink, workers: usize) -> Self {
        WorkerSinks {
            every_worker: sink.written_by_every_worker(),
            slots: Mutex::new(sink.for_workers(workers)),
        }
    }

    /// Worker `index`'s sink (`None` where it writes nothing), and the
    /// worker whose sink writes the records worker `index` makes.
    fn take(&self, index: usize) -> (Option<Sink>, u64) {
        let writer = if self.every_worker { index as u64 } else { 0 };
        (self.slots.lock().unwrap()[index].take(), writer)
    }
}

/// Opens an output binding (checking a Kafka topic first).
fn open_sink(
    config: &EnvConfig,
    name: &str,
    truncate: bool,
    source_topic: &str,
    model_versions: &[(String, String)],
) -> Result<Sink, RunError> {
    Ok(
        match config
            .binding(name)
            .expect("validated: every binding exists")
        {
            Binding::File(file) => Sink::File(FileSink::open(
                &file.path,
                truncate,
                file.write_behind_bytes,
            )?),
            Binding::Kafka(kafka) => {
                crate::connectors::kafka::ensure_topic(&config.kafka, kafka)?;
                Sink::Kafka(KafkaSink::open(
                    &config.kafka,
                    kafka,
                    source_topic,
                    model_versions.to_vec(),
                )?)
            }
        },
    )
}

/// Stops the process at once after an output failure: no checkpoint can be
/// written past output that was not delivered, and a restart replays from
/// the last good checkpoint (crash-only, as after `kill -9`).
pub(crate) fn fail_output(what: &str, error: &str) -> ! {
    eprintln!(
        "error: {what} failed: {error}\n  stopping without a checkpoint; rerun to resume from the last one"
    );
    std::process::exit(70);
}

/// Moves the containers received under one stamp into an epoch's stash:
/// the first whole when the stash is empty (the state stage hands each epoch
/// on in one vector, so that is the common case; appending copied every
/// 300-byte row once more), the rest appended after one reservation for all
/// of them (appended one by one, the stash grew by doubling and copied what
/// it held at each step).
pub(crate) fn take_or_append<D>(
    stash: &mut Vec<D>,
    mut containers: std::slice::IterMut<'_, Vec<D>>,
) {
    if stash.is_empty() {
        let Some(first) = containers.next() else {
            return;
        };
        std::mem::swap(stash, first);
    }
    stash.reserve(containers.as_slice().iter().map(Vec::len).sum());
    for container in containers {
        stash.append(container);
    }
}

/// Listings read per step of the market rebuild at start (see `rebuild_step`).
const REBUILD_STEP_LISTINGS: usize = 16_384;

/// Runs the topology to the end of its input and returns the summary.
pub fn run(
    plan: Arc<Plan>,
    config: &EnvConfig,
    models: Arc<Vec<LoadedModel>>,
    options: &RunOptions,
) -> Result<RunSummary, RunError> {
    let started = Instant::now();
    let state_path = config.state.dir.join(&plan.name);
    if options.from_scratch && state_path.exists() {
        std::fs::remove_dir_all(&state_path).map_err(|e| RunError::Reset {
            path: state_path.clone(),
            detail: e.to_string(),
        })?;
    }
    // A new state directory next to output files that already hold documents:
    // the state was deleted by hand or the config points elsewhere. Appending
    // would mix two runs in one file, so say so instead. (An existing state
    // directory without a checkpoint is a crash before the first one: its
    // rerun appends, as the restart rules allow.)
    if !options.from_scratch && !state_path.exists() {
        let outputs = [Some(&plan.output_binding), Some(&plan.dead_letter_binding)]
            .into_iter()
            .chain([plan.statistics_binding.as_ref()])
            .flatten();
        for name in outputs {
            if let Some(Binding::File(file)) = config.binding(name) {
                let bytes = std::fs::metadata(&file.path).map(|m| m.len()).unwrap_or(0);
                if bytes > 0 {
                    return Err(RunError::OutputWithoutState {
                        path: file.path.clone(),
                        bytes,
                        state: state_path.clone(),
                    });
                }
            }
        }
    }
    let tuning = StoreTuning {
        block_cache_bytes: config.state.block_cache_mb << 20,
        write_buffer_bytes: config.state.write_buffer_mb << 20,
    };
    let opening = Instant::now();
    let store = Store::open(&state_path, &plan.field_fingerprint(), tuning)?;
    let state_open_seconds = opening.elapsed().as_secs_f64();
    let input = config
        .binding(&plan.input_binding)
        .expect("validated: every binding exists")
        .clone();
    // see "Document versions" in evaluate.rs: only sources whose replay may
    // cut epochs elsewhere need a new incarnation per start
    // the rebuild runs at its own dataflow time, the input epoch before the
    // first (times are input epochs + 1); it evaluates nothing when the market
    // fingerprint stored by the last clean end is the current one
    let market_fingerprint = plan.market_fingerprint();
    let trusted_views =
        store.get_meta("market_fingerprint")?.as_deref() == Some(market_fingerprint.as_bytes());
    let incarnation = match &input {
        Binding::File(_) => 0,
        Binding::Kafka(_) => store.next_incarnation()?,
    };
    let (partitions, source_topic) = match &input {
        Binding::File(file) => (file.partitions, file.path.display().to_string()),
        Binding::Kafka(kafka) => (
            crate::connectors::kafka::ensure_topic(&config.kafka, kafka)?,
            kafka.topic.clone(),
        ),
    };
    let model_versions: Vec<(String, String)> = models
        .iter()
        .map(|m| (m.name.clone(), m.version.clone()))
        .collect();
    // documents and dead letters: each worker takes its own sink
    let document_sinks = Arc::new(WorkerSinks::new(
        open_sink(
            config,
            &plan.output_binding,
            options.from_scratch,
            &source_topic,
            &model_versions,
        )?,
        config.runtime.workers,
    ));
    let dead_letter_sinks = Arc::new(WorkerSinks::new(
        open_sink(
            config,
            &plan.dead_letter_binding,
            options.from_scratch,
            &source_topic,
            &model_versions,
        )?,
        config.runtime.workers,
    ));
    // the changelog is made on worker 0 (see `statistics_changelog`)
    let statistics_sink = Arc::new(Mutex::new(match &plan.statistics_binding {
        // optional: written only when the config binds it
        Some(binding) if !options.pass_through && config.binding(binding).is_some() => Some(
            open_sink(config, binding, options.from_scratch, &source_topic, &[])?,
        ),
        _ => None,
    }));
    let statistics_enabled = statistics_sink.lock().unwrap().is_some();
    let kafka = config.kafka.clone();
    let group_id = config
        .kafka
        .group_id
        .clone()
        .unwrap_or_else(|| format!("assay-{}", plan.name));
    let runtime = config.runtime.clone();
    // market re-evaluations per epoch and partition (0 for a file input)
    let evaluations_per_partition = config.market_evaluation_limit(&plan);
    let workers = runtime.workers;
    let progress_enabled = options.progress.or(match runtime.progress {
        crate::config::ProgressMode::Always => Some(true),
        crate::config::ProgressMode::Never => Some(false),
        crate::config::ProgressMode::Auto => None,
    });

    let pass_through = options.pass_through;
    // the epoch every worker checkpoints through next (0: none), and how many
    // checkpoints the workers have taken in all (see the worker loop)
    let checkpoint_request = Arc::new(AtomicU64::new(0));
    let checkpoint_served = Arc::new(AtomicU64::new(0));
    // the highest epoch any worker's Kafka source has moved to (see `KafkaSource::fill`)
    let highest_epoch = Arc::new(AtomicU64::new(0));
    // each worker's count of listings changed since its last checkpoint:
    // worker 0 starts a checkpoint early when their sum reaches the bound
    let dirty_listings: Arc<Vec<AtomicU64>> =
        Arc::new((0..workers).map(|_| AtomicU64::new(0)).collect());
    let max_dirty_listings = config.state.max_dirty_listings as u64;
    let flush_store = store.clone();
    let worker_plan = plan.clone();
    let mut timely_config = timely::Config::process(workers);
    market::configure_merging(&mut timely_config.worker);
    let guards = timely::execute(timely_config, move |worker| -> Result<WorkerReport, String> {
        let plan = worker_plan.clone();
        let index = worker.index();
        let peers = worker.peers();
        let owned: Vec<u32> = (0..partitions).filter(|p| *p as usize % peers == index).collect();
        let checkpointed = store.positions(&plan.input_binding).map_err(|e| e.to_string())?;
        let (mut source, max_record_bytes) = match &input {
            Binding::File(file) => (
                Source::File(FileSource::open(&file.path, &plan.key_field, partitions, &owned, &checkpointed, file.records_per_second, started).map_err(|e| e.to_string())?),
                file.max_record_bytes,
            ),
            Binding::Kafka(binding) => (
                Source::Kafka(KafkaSource::open(&kafka, binding, &group_id, &owned, &checkpointed, runtime.epoch_records as usize, started, highest_epoch.clone())?),
                // the broker's own message size limit applies; keep the same guard as files
                1 << 20,
            ),
        };
        let stage = Rc::new(RefCell::new(ListingStateStage::new(plan.clone(), store.clone())));
        // the market re-evaluations the last checkpoint left waiting
        // (deferred_evaluations.rs); only a live source defers (the config says why)
        let live_source = matches!(source, Source::Kafka(_));
        debug_assert!(live_source || evaluations_per_partition == 0);
        stage.borrow_mut().load_deferred(&plan.input_binding, &owned, evaluations_per_partition > 0).map_err(|e| e.to_string())?;
        let counts = Rc::new(RefCell::new(SinkCounts::default()));
        let evaluate_counts = Rc::new(RefCell::new(evaluate::EvaluateCounts::default()));
        let (mut documents_out, documents_writer) = document_sinks.take(index);
        let (mut dead_out, dead_letters_writer) = dead_letter_sinks.take(index);
        let mut statistics_out = if index == 0 { statistics_sink.lock().unwrap().take() } else { None };
        // dataflow times: the rebuild at `first_epoch`, input epoch e at e + 1
        let first_epoch = source.first_epoch(runtime.epoch_records);
        let skip_epoch = trusted_views.then_some(first_epoch);
        // epochs below this one have been evaluated (see the lockstep in the graph)
        let evaluated_below = Rc::new(Cell::new(first_epoch));
        let state_activator: Rc<RefCell<Option<timely::scheduling::Activator>>> = Rc::new(RefCell::new(None));

        let market_traces: Rc<RefCell<Option<market::MarketTraces>>> = Rc::new(RefCell::new(None));
        // the source reads nothing until the market rebuild is handed on: records
        // read earlier would only wait for it (their latency) and hold memory
        let rebuild_done = Rc::new(Cell::new(pass_through));
        let mut input_handle: InputHandle<u64, timely::container::CapacityContainerBuilder<Vec<RawRecord>>> = InputHandle::new();
        let probe = ProbeHandle::new();
        worker.dataflow::<u64, _, _>(|scope| {
            let raw = scope.input_from(&mut input_handle);
            let decode_plan = plan.clone();
            let decode_slots = decode::Slots::new(&plan);
            #[expect(clippy::result_large_err, reason = "as for `decode::decode`: the dead letter is the error")]
            let decode_record = move |raw: RawRecord| decode::decode(&decode_plan, &decode_slots, max_record_bytes, raw);
            let (events, decode_dead) = raw.ok_err::<Vec<_>, _, Vec<_>, _, _>(decode_record);

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
                // The state stage waits for the evaluator to finish epoch e-1 before it
                // applies epoch e. A market re-evaluation reads a neighbour's state,
                // which must be the state as of its epoch; and an event's row carries
                // its listing's gate memory (the last document's hash) as the stage
                // applies it, which must include the evaluator's decision on the
                // listing's previous event. Without aggregates this was once off: an
                // event applied before its predecessor was evaluated compared against
                // an older document, and 2-worker runs of the same input emitted a
                // few more or fewer identical re-sends from run to run.
                let state_stage = stage.clone();
                let done = evaluated_below.clone();
                let activator_slot = state_activator.clone();
                let rebuild_partitions = owned.clone();
                let rebuild_done = rebuild_done.clone();
                // One operator, four outputs: each kind of output leaves in the
                // vector the stage filled, handed on whole.
                let mut builder = OperatorBuilder::new("ListingState".to_owned(), events.scope());
                let info = builder.operator_info();
                let mut input = builder.new_input(events, Pipeline);
                let (events_output, events) = builder.new_output::<Vec<listing_state::Enriched>>();
                let (dead_output, state_dead) = builder.new_output::<Vec<DeadLetter>>();
                let (members_output, members) = builder.new_output::<Vec<market::MemberUpdate>>();
                let (labels_output, labels) = builder.new_output::<Vec<(u64, String)>>();
                let mut events_output = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(events_output);
                let mut dead_output = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(dead_output);
                let mut members_output = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(members_output);
                let mut labels_output = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(labels_output);
                // capabilities by output port, in the order the outputs were made
                let mut send = move |capabilities: &[Capability<u64>], out: &mut listing_state::StateOutputs| {
                    if !out.events.is_empty() {
                        events_output.activate().session(&capabilities[0]).give_container(&mut out.events);
                    }
                    if !out.dead.is_empty() {
                        dead_output.activate().session(&capabilities[1]).give_container(&mut out.dead);
                    }
                    if !out.members.is_empty() {
                        members_output.activate().session(&capabilities[2]).give_container(&mut out.members);
                    }
                    if !out.labels.is_empty() {
                        labels_output.activate().session(&capabilities[3]).give_container(&mut out.labels);
                    }
                };
                builder.build(move |capabilities| {
                    *activator_slot.borrow_mut() = Some(scope.activator_for(info.address.clone()));
                    let rebuild_activator = scope.activator_for(info.address.clone());
                    let mut rebuild_capabilities = Some(capabilities);
                    let mut pending: BTreeMap<u64, (Vec<Capability<u64>>, Vec<decode::ChangeEvent>)> = BTreeMap::new();
                    move |_frontiers| {
                        input.for_each_stamp(|capability, containers| {
                            let Some(capabilities) = (0..4).map(|port| capability.retain_least(port)).collect::<Option<Vec<_>>>() else { return };
                            let entry = pending.entry(*capabilities[0].time()).or_insert_with(|| (capabilities, Vec::new()));
                            take_or_append(&mut entry.1, containers);
                        });
                        // the rebuild goes in steps, each handed on before the next is
                        // read (memory), and before any event is applied (it reads the
                        // state as the last run left it)
                        if let Some(capabilities) = rebuild_capabilities.as_mut() {
                            for capability in capabilities.iter_mut() {
                                capability.downgrade(&first_epoch);
                            }
                            let mut out = listing_state::StateOutputs::default();
                            let done = state_stage.borrow_mut().rebuild_step(&rebuild_partitions, first_epoch, REBUILD_STEP_LISTINGS, &mut out)
                                .unwrap_or_else(|e| panic!("rebuilding the market from state: {e}"));
                            send(capabilities, &mut out);
                            if done {
                                rebuild_capabilities = None;
                                rebuild_done.set(true);
                            } else {
                                rebuild_activator.activate();
                                return;
                            }
                        }
                        while let Some(entry) = pending.first_entry() {
                            if *entry.key() > done.get() {
                                break;
                            }
                            let (time, (capabilities, batch)) = entry.remove_entry();
                            let mut out = listing_state::StateOutputs {
                                events: Vec::with_capacity(batch.len()),
                                members: Vec::with_capacity(batch.len() * 2),
                                ..Default::default()
                            };
                            state_stage.borrow_mut().process(batch, time, &mut out).unwrap_or_else(|e| panic!("listing state: {e}"));
                            send(&capabilities, &mut out);
                        }
                    }
                });

                let window = market::MarketWindow {
                    epochs: runtime.market_window_epochs,
                    phases: runtime.market_window_phases,
                    windows_per_sync: runtime.market_windows_per_sync,
                    rebuild_time: first_epoch,
                };
                let (market_updates, statistics_changes, traces) = market::build(plan.clone(), members, window);
                *market_traces.borrow_mut() = Some(traces);

                let mut evaluator = evaluate::Evaluator::new(plan.clone(), models.clone(), stage.clone(), incarnation, skip_epoch, evaluations_per_partition, first_epoch);
                let evaluator_counts = evaluate_counts.clone();
                let done = evaluated_below.clone();
                let activator_slot = state_activator.clone();
                let documents = events.binary_frontier::<_, timely::container::CapacityContainerBuilder<Vec<OutputDocument>>, _, _, _, _>(
                    market_updates,
                    Pipeline,
                    // market::build already sent signatures to owners and statistics to everyone
                    Pipeline,
                    "Evaluate",
                    move |_, _| {
                        // market updates stay in the containers they came in (most carry
                        // one time): appending them to one vector per epoch copied each
                        // one again every time the vector grew
                        type Pending = (Capability<u64>, Vec<listing_state::Enriched>, Vec<Vec<(market::MarketInput, u64, isize)>>);
                        let mut pending: BTreeMap<u64, Pending> = BTreeMap::new();
                        // While market re-evaluations wait (deferred_evaluations.rs), a
                        // capability at the next epoch not yet evaluated: each epoch that
                        // completes with no input here takes a chunk of the queue at its
                        // own time, and the input's end takes the rest.
                        let mut waiting_at: Option<Capability<u64>> = None;
                        move |(own_input, own_frontier), (market_input, market_frontier), output| {
                            own_input.for_each_stamp(|capability, containers| {
                                let Some(capability) = capability.retain_least(0) else { return };
                                let entry = pending.entry(*capability.time()).or_insert_with(|| (capability, Vec::new(), Vec::new()));
                                take_or_append(&mut entry.1, containers);
                            });
                            // By each update's own time, not its message's: differential may send
                            // an update at a later time than the capability it sends it with (a
                            // join of a member at epoch 170 with a view delayed to 176 can travel
                            // at 173), and evaluated at 173 it saw the statistics before the move
                            // it was about (a market window left stale documents in the index).
                            market_input.for_each_stamp(|capability, containers| {
                                let Some(capability) = capability.retain_least(0) else { return };
                                for container in containers {
                                    let Some(first) = container.first().map(|update| update.1) else { continue };
                                    if container.iter().all(|update| update.1 == first) {
                                        let stash = &mut pending.entry(first).or_insert_with(|| (capability.delayed(&first), Vec::new(), Vec::new())).2;
                                        stash.push(std::mem::take(container));
                                        continue;
                                    }
                                    for update in container.drain(..) {
                                        let time = update.1;
                                        let stash = &mut pending.entry(time).or_insert_with(|| (capability.delayed(&time), Vec::new(), Vec::new())).2;
                                        match stash.last_mut() {
                                            Some(batch) => batch.push(update),
                                            None => stash.push(vec![update]),
                                        }
                                    }
                                }
                            });
                            let passed = |time: &u64| !own_frontier.less_equal(time) && !market_frontier.less_equal(time);
                            // Completed epochs in order: each one with input here, and, while
                            // re-evaluations wait, each one without (a chunk of the queue at its
                            // own time: which epoch takes which listings is a function of the
                            // epochs alone, not of when this operator runs).
                            loop {
                                let pending_time = pending.first_key_value().map(|(time, _)| *time).filter(|time| passed(time));
                                let waiting_time = waiting_at.as_ref().map(|held| *held.time()).filter(|time| passed(time));
                                match (pending_time, waiting_time) {
                                    (None, None) => break,
                                    (Some(time), waiting) if waiting.is_none_or(|waiting| time <= waiting) => {
                                        let (capability, own, updates) = pending.remove(&time).expect("looked up");
                                        let documents = evaluator.evaluate_epoch(time, own, updates).unwrap_or_else(|e| panic!("{e}"));
                                        output.session(&capability).give_iterator(documents.into_iter());
                                        waiting_at = evaluator.has_deferred().then(|| capability.delayed(&(time + 1)));
                                    }
                                    (_, Some(time)) => {
                                        let held = waiting_at.take().expect("looked up");
                                        // the input's end: nothing comes after to take the rest
                                        let ended = own_frontier.is_empty() && market_frontier.is_empty();
                                        let documents = evaluator.evaluate_deferred(time, ended).unwrap_or_else(|e| panic!("{e}"));
                                        output.session(&held).give_iterator(documents.into_iter());
                                        waiting_at = evaluator.has_deferred().then(|| held.delayed(&(time + 1)));
                                    }
                                    (Some(_), None) => unreachable!("the first arm takes a pending epoch with nothing waiting"),
                                }
                            }
                            *evaluator_counts.borrow_mut() = evaluator.counts.clone();
                            // every epoch below both frontiers has been evaluated
                            let below = own_frontier.frontier().iter().chain(market_frontier.frontier().iter()).min().copied().unwrap_or(u64::MAX);
                            let below = pending.first_key_value().map(|(t, _)| (*t).min(below)).unwrap_or(below);
                            let below = waiting_at.as_ref().map(|held| (*held.time()).min(below)).unwrap_or(below);
                            if below > done.get() {
                                done.set(below);
                                if let Some(activator) = activator_slot.borrow().as_ref() {
                                    activator.activate();
                                }
                            }
                        }
                    },
                );

                // every worker builds the same graph (timely requires it); only
                // worker 0 holds the statistics sink
                if statistics_enabled {
                    let statistics_plan = plan.clone();
                    // written like the documents: without waiting for the
                    // broker on the worker thread, released once delivered
                    let changelog = statistics::statistics_changelog(statistics_changes, labels, statistics_plan, skip_epoch);
                    sink::write_in_epoch_order(changelog, "StatisticsSink", statistics::changelog_order, 0, sink::SinkWriter::new(statistics_out.take(), counts.clone(), started, plan.input_binding.clone()))
                        .probe_with(&probe);
                }
                (documents, state_dead)
            };

            sink::write_in_epoch_order(documents, "DocumentSink", document_order, documents_writer, sink::SinkWriter::new(documents_out.take(), counts.clone(), started, plan.input_binding.clone()))
                .probe_with(&probe);
            sink::write_in_epoch_order(
                decode_dead.concat(state_dead),
                "DeadLetterSink",
                |a: &DeadLetter, b: &DeadLetter| (a.position.offset, a.position.partition).cmp(&(b.position.offset, b.position.partition)),
                dead_letters_writer,
                sink::SinkWriter::new(dead_out.take(), counts.clone(), started, plan.input_binding.clone()),
            )
            .probe_with(&probe);
        });

        let wait_park = Some(WAIT_PARK);
        let mut report = WorkerReport { resumed_from_line: source.resume_offset(), ..WorkerReport::default() };
        let mut progress = ProgressBar::new(if index == 0 { progress_enabled } else { Some(false) });
        let epoch_records = runtime.epoch_records;
        let mut epoch = first_epoch;
        input_handle.advance_to(epoch + 1);
        let checkpoint_interval = Duration::from_millis(runtime.checkpoint_interval_ms);
        let mut last_checkpoint = Instant::now();
        let (mut served_request, mut served_request_count) = (0u64, 0u64);
        let mut batch: Vec<RawRecord> = Vec::with_capacity(epoch_records as usize);
        // A checkpoint is written in the background (see `begin_checkpoint`); the
        // source commits its positions only once they are durable.
        // A test hook: the process dies as by `kill -9` (no destructor, no
        // flush) as soon as this worker has made this many checkpoints
        // durable, so that a crash test can crash at a known point instead of
        // a random one (tests/integration/crash_resume.rs).
        let kill_after_checkpoints: Option<u64> = std::env::var("ASSAY_TEST_KILL_AFTER_CHECKPOINTS").ok().and_then(|n| n.parse().ok());
        let durable = |positions: Option<Vec<_>>, source: &Source, report: &mut WorkerReport| {
            if let Some(positions) = positions {
                source.checkpointed(&positions);
                report.checkpoints += 1;
                if kill_after_checkpoints == Some(report.checkpoints) {
                    // SAFETY: kill(2) on this process; nothing is shared with Rust
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
            }
        };
        // The stage seals its changes itself when an epoch past the checkpoint's
        // reaches it (`ListingStateStage::seal_after`), or here when none has.
        let begin_checkpoint = |stage: &Rc<RefCell<ListingStateStage>>, positions, source: &Source, report: &mut WorkerReport| -> Result<(), String> {
            let previous = stage.borrow_mut().begin_checkpoint(&plan.input_binding, positions).map_err(|e| e.to_string())?;
            durable(previous, source, report);
            Ok(())
        };
        // A checkpoint whose epoch is closed and sealed (or about to be), waiting
        // for the sinks: (the epoch it covers, the source's positions after it).
        let mut pending_checkpoint: Option<(u64, Vec<(u32, crate::state::CheckpointedPosition)>)> = None;
        // records were sent at the current input time, which is still open
        let mut open_epoch_has_records = false;
        while !rebuild_done.get() {
            worker.step();
        }
        let scheduled_before = crate::observe::thread_schedule_times();
        while !source.finished() {
            let read_at = Instant::now();
            let next_epoch = source.fill(epoch, epoch_records, &mut batch)?;
            report.records_in += batch.len() as u64;
            // a live source with nothing new: park until data or progress arrives for
            // the dataflow, or briefly, to look at the source again
            let idle = batch.is_empty() && next_epoch == epoch;
            if !batch.is_empty() {
                input_handle.send_batch(&mut batch);
                batch.clear();
                open_epoch_has_records = true;
            }
            if next_epoch > epoch {
                epoch = next_epoch;
                input_handle.advance_to(epoch + 1);
                open_epoch_has_records = false;
            }
            // An idle live source whose epochs run ahead of the clock goes straight to a
            // pending checkpoint's epoch, as far as back-pressure lets it without waiting.
            // Its epochs are empty, so nothing is held. After a backlog the epochs run
            // ahead (they filled faster than the clock ticked), and an idle source waited
            // for the clock to reach the proposal: no checkpoint, and no offsets committed
            // to the group, for as long as the epochs were ahead (about 8 s after 1M
            // records through pass-through). On the clock it does not jump: it reaches the
            // proposal within max_epochs_in_flight ticks anyway, and records that went into
            // a jumped epoch would wait for the other workers to reach it.
            if live_source && idle && !open_epoch_has_records && source.clock_tick().is_some_and(|tick| epoch > tick) {
                let requested = checkpoint_request.load(Ordering::SeqCst);
                if requested > served_request && epoch < requested {
                    let without_waiting = probe.with_frontier(|frontier| frontier.first().map(|done| (done + runtime.max_epochs_in_flight).saturating_sub(1)));
                    let to = without_waiting.map_or(requested, |bound| requested.min(bound));
                    if to > epoch {
                        epoch = to;
                        input_handle.advance_to(epoch + 1);
                    }
                }
            }
            if idle {
                worker.step_or_park(wait_park);
                report.time.source_empty += read_at.elapsed();
            } else {
                worker.step();
                report.time.busy += read_at.elapsed();
            }
            // back-pressure: stay at most max_epochs_in_flight ahead of the sinks
            let waited_at = Instant::now();
            while probe.less_than(&(epoch + 1).saturating_sub(runtime.max_epochs_in_flight)) {
                worker.step_or_park(wait_park);
            }
            report.time.back_pressured += waited_at.elapsed();
            let finished = stage.borrow_mut().finished_checkpoint().map_err(|e| e.to_string())?;
            durable(finished, &source, &mut report);
            if let Some((done, total)) = source.progress() {
                progress.update(done, total, report.records_in * peers as u64);
            }
            // Checkpoints are aligned: every worker checkpoints through the same
            // epoch, so that after a crash the rebuilt market holds all workers'
            // listings as of one instant. Worker 0 proposes the epoch, far enough
            // ahead that no worker has sent it yet (back-pressure bounds every
            // worker to max_epochs_in_flight past worker 0's input); each worker
            // checks before it sends the next epoch.
            dirty_listings[index].store(stage.borrow().dirty_listings() as u64, Ordering::Relaxed);
            let requested = checkpoint_request.load(Ordering::SeqCst);
            if index == 0 && requested == served_request && pending_checkpoint.is_none() && checkpoint_served.load(Ordering::SeqCst) == served_request_count * peers as u64
                && (last_checkpoint.elapsed() >= checkpoint_interval
                    || (max_dirty_listings > 0 && dirty_listings.iter().map(|d| d.load(Ordering::Relaxed)).sum::<u64>() >= max_dirty_listings))
            {
                checkpoint_request.store(
                    market::aligned_checkpoint(epoch + runtime.max_epochs_in_flight + 1, runtime.market_sync_epochs()),
                    Ordering::SeqCst,
                );
            }
            let requested = checkpoint_request.load(Ordering::SeqCst);
            // (a file's epochs are a pure function of line numbers: a paced file
            // checkpoints only between epochs, never closing one early)
            if requested > served_request && epoch >= requested && pending_checkpoint.is_none() && (live_source || !open_epoch_has_records) {
                // the positions cover every record sent, so the epoch they were sent in
                // must be complete too (a live source keeps an epoch open until its clock
                // tick ends; a file's next epoch has nothing sent yet)
                if open_epoch_has_records {
                    epoch += 1;
                    open_epoch_has_records = false;
                }
                // A live source's epoch can be past the requested window end (it follows
                // the clock when idle, and closing an open epoch moves it by one): go on
                // to the next window end, so that the checkpoint does not cut a window in
                // two. A restart trusts that the checkpointed documents saw every move of
                // the checkpointed state's statistics; a move still waiting for its
                // window's end would never re-evaluate anyone.
                if live_source {
                    epoch = market::aligned_checkpoint(epoch, runtime.market_sync_epochs());
                }
                input_handle.advance_to(epoch + 1);
                // The checkpoint covers the epochs through `epoch` and the positions
                // now. The source goes on reading: the stage seals these epochs'
                // changes before anything later reaches it, and the write begins once
                // the sinks are done with them (it was a drain of the whole pipeline,
                // with the source stopped: a stall of every record behind it).
                stage.borrow_mut().seal_after(epoch);
                pending_checkpoint = Some((epoch, source.positions()));
                served_request = requested;
            }
            if pending_checkpoint.as_ref().is_some_and(|(through, _)| !probe.less_than(&(through + 1))) {
                let (_, positions) = pending_checkpoint.take().expect("checked");
                let waited_at = Instant::now();
                begin_checkpoint(&stage, positions, &source, &mut report)?;
                report.time.checkpoint += waited_at.elapsed();
                served_request_count += 1;
                checkpoint_served.fetch_add(1, Ordering::SeqCst);
                last_checkpoint = Instant::now();
            }
        }
        drop(input_handle);
        while !probe.done() {
            worker.step_or_park(wait_park);
        }
        if let (Some(before), Some(after)) = (scheduled_before, crate::observe::thread_schedule_times()) {
            report.time.on_cpu = after.0.saturating_sub(before.0);
            report.time.waiting_for_cpu = after.1.saturating_sub(before.1);
        }
        if let Some((_, positions)) = pending_checkpoint.take() {
            begin_checkpoint(&stage, positions, &source, &mut report)?;
        }
        begin_checkpoint(&stage, source.positions(), &source, &mut report)?;
        let last = stage.borrow_mut().wait_checkpoint().map_err(|e| e.to_string())?;
        durable(last, &source, &mut report);
        progress.finish();
        if let Some(lag) = source.lag() {
            report.source_lag.merge(lag);
        }
        let gate = stage.borrow().counts;
        report.stale = gate.stale;
        report.duplicates = gate.duplicates;
        report.evaluate = evaluate_counts.borrow().clone();
        if let Some(traces) = market_traces.borrow().as_ref() {
            let memory = traces.memory();
            report.arrangement_member_bytes = memory.member_bytes;
            report.arrangement_statistics_bytes = memory.statistics_bytes;
        }
        let counts = counts.borrow();
        report.upserts = counts.upserts;
        report.tombstones = counts.tombstones;
        report.market_documents = counts.market_documents;
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
    // every worker checkpointed the views of this topology's market
    flush_store.put_meta("market_fingerprint", market_fingerprint.as_bytes())?;
    // a clean end: the next start reads table files instead of replaying the log
    flush_store.flush()?;
    let lookup_names: Vec<String> = plan.lookups.iter().map(|l| l.name.clone()).collect();
    let mut summary = RunSummary::new(
        &plan.name,
        workers,
        &total,
        started.elapsed(),
        &lookup_names,
    );
    summary.state_open_seconds = state_open_seconds;
    Ok(summary)
}
