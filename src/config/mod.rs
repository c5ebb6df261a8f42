//! Environment config: where the topology's logical inputs and outputs are
//! bound, and how the engine runs.
//!
//! # Layering
//! 1. Built-in defaults (the `default_*` functions below).
//! 2. The file: `--config <path>`, or the embedded `config/default.toml`.
//! 3. Environment variables `ASSAY_<SECTION>__<KEY>`, e.g. `ASSAY_RUNTIME__WORKERS=2`
//!    or `ASSAY_BINDINGS__SEARCH_DOCUMENTS__PATH=out/docs.jsonl`. The value is
//!    read as TOML when it parses as a value, otherwise as a string.
//!
//! Unknown keys are errors. Every error is collected before anything starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::diagnostics::{Diagnostics, SourceText, deserialize_collecting};
use crate::topology::Plan;

/// The embedded default: every binding is a file under the repository.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../config/default.toml");
pub const EMBEDDED_DEFAULT_NAME: &str = "config/default.toml (embedded)";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvConfig {
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub state: StateConfig,
    /// Settings shared by every Kafka binding.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Logical name (as the topology uses it) to a concrete place.
    pub bindings: BTreeMap<String, Binding>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Timely worker threads in this process. Each owns whole input partitions.
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Records per epoch. An epoch is the unit of batching, scoring, output
    /// ordering and checkpointing: larger epochs batch better, smaller ones
    /// lower latency. For files the epoch is a pure function of the line
    /// number, so output order never depends on timing.
    #[serde(default = "default_epoch_records")]
    pub epoch_records: u64,
    /// Epochs a source may run ahead of the sink: bounds memory when a later
    /// stage is slower than the source (back-pressure).
    #[serde(default = "default_max_epochs_in_flight")]
    pub max_epochs_in_flight: u64,
    /// Time between checkpoints. Shorter means less replay after a crash, at
    /// the cost of a pipeline drain and a RocksDB batch each time.
    #[serde(default = "default_checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// Epochs over which moves of the market statistics are gathered before
    /// neighbours are re-evaluated (and before documents see them). With 1,
    /// every epoch's moves re-evaluate at once. With K, the statistics seen
    /// change only at epochs that are multiples of K, so a statistic that
    /// moves and moves back within the window re-evaluates nobody: fewer
    /// documents and less work when epochs are small (Kafka's are ticks of
    /// `epoch_ms`), at the price of documents seeing statistics up to K
    /// epochs old. The exact statistics changelog stays per epoch.
    #[serde(default = "default_market_window_epochs")]
    pub market_window_epochs: u64,
    /// With a market window (K > 1): groups of segments whose windows end at
    /// different epochs, K / this apart (segments fall into groups by a
    /// hash). A window end's join and re-evaluations then come in this many
    /// smaller rounds instead of one, and the records behind them wait less.
    /// 1: every segment's window ends at the multiples of K. Each group's
    /// round costs a round of the join and the arrangements, so one group
    /// per epoch (K) cost more CPU than it saved (`docs/benchmarks.md`,
    /// Stop 32). 5 groups of 25 epochs did not lower Kafka's p99 clearly on
    /// the test machine, so `config/kafka.toml` keeps 1.
    #[serde(default = "default_market_window_phases")]
    pub market_window_phases: u64,
    /// With staggered windows (`market_window_phases` > 1): windows between
    /// sync points, where every group's window ends and the statistics seen
    /// are the exact ones. Checkpoints fall only there (a restart must
    /// rebuild where no move is waiting), so they come at most once per K x
    /// this epochs, however short `checkpoint_interval_ms` is.
    #[serde(default = "default_market_windows_per_sync")]
    pub market_windows_per_sync: u64,
    /// Market re-evaluations (neighbours whose signature moved) evaluated per
    /// epoch and input partition, at most; the others wait, first in first
    /// out, for the next epochs (0 = all in the epoch of the move). A window
    /// end's re-evaluations and their documents are then spread over the
    /// epochs after it, and the records read meanwhile, whose documents are
    /// written after the window end's in epoch order, wait for a chunk of it
    /// instead of all of it. A waiting listing is evaluated with the
    /// statistics of the epoch it comes out at (an own event of it takes it
    /// out first), and the queue is checkpointed with the state. Every epoch
    /// that passes takes a chunk, and the input's end the rest.
    ///
    /// Live (Kafka) inputs only: a file input evaluates every re-evaluation
    /// in the epoch of its move whatever this says. A file is a replay whose
    /// output is a function of its lines, and which epochs pass while
    /// listings wait would make it one of timing too; nobody waits on a
    /// replay's latency anyway.
    #[serde(default)]
    pub market_evaluations_per_epoch_and_partition: u64,
    /// Progress bar on stderr: `auto` (when stderr is a terminal), `always`, `never`.
    #[serde(default)]
    pub progress: ProgressMode,
}

fn default_workers() -> usize {
    1
}
fn default_epoch_records() -> u64 {
    1024
}
fn default_max_epochs_in_flight() -> u64 {
    8
}
fn default_checkpoint_interval_ms() -> u64 {
    1000
}
fn default_market_window_epochs() -> u64 {
    1
}
fn default_market_window_phases() -> u64 {
    1
}
fn default_market_windows_per_sync() -> u64 {
    4
}

impl RuntimeConfig {
    /// Epochs between the market's sync points, where checkpoints can fall
    /// (1 without a market window): see `market_windows_per_sync`.
    pub fn market_sync_epochs(&self) -> u64 {
        crate::dataflow::market::sync_epochs(
            self.market_window_epochs,
            self.market_window_phases,
            self.market_windows_per_sync,
        )
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            workers: default_workers(),
            epoch_records: default_epoch_records(),
            max_epochs_in_flight: default_max_epochs_in_flight(),
            checkpoint_interval_ms: default_checkpoint_interval_ms(),
            market_window_epochs: default_market_window_epochs(),
            market_window_phases: default_market_window_phases(),
            market_windows_per_sync: default_market_windows_per_sync(),
            market_evaluations_per_epoch_and_partition: 0,
            progress: ProgressMode::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProgressMode {
    #[default]
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Root of the state directories; each topology gets `<dir>/<topology name>`.
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// RocksDB block cache: hot listings are read from memory.
    #[serde(default = "default_block_cache_mb")]
    pub block_cache_mb: usize,
    /// RocksDB memtable: absorbs writes between flushes.
    #[serde(default = "default_write_buffer_mb")]
    pub write_buffer_mb: usize,
    /// Listings changed since the last checkpoint are held in memory until
    /// the next one writes them with the source positions. When they reach
    /// this many (over all workers), a checkpoint starts before
    /// `checkpoint_interval_ms` is up: it bounds that memory (a listing's
    /// state is a few hundred bytes) whatever the event rate, give or take
    /// what the epochs in flight change before the checkpoint's epoch
    /// (`max_epochs_in_flight` past the bound). 0: no bound.
    #[serde(default = "default_max_dirty_listings")]
    pub max_dirty_listings: usize,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}
/// Kafka Streams' budget for one store (50 MB cache, 16 MB memtables) is the
/// model: 953,862 live listings' state with their market arrangements then
/// fit in 280-298 MB (`assay bench`'s memory scenario, stop 16). At 64/32
/// RocksDB alone held 115 MB (the cache filled with the blocks market
/// re-evaluations read; up to two memtables), for no throughput measurable
/// on `assay bench`. 16 MB of cache saved another 15-19 MB on the mixed
/// stream and ran 0-8% slower.
fn default_block_cache_mb() -> usize {
    32
}
fn default_write_buffer_mb() -> usize {
    16
}
/// Measured on `assay bench` (1M creates): see README, `state.max_dirty_listings`.
const MAX_DIRTY_LISTINGS_DEFAULT: usize = 16_384;
fn default_max_dirty_listings() -> usize {
    MAX_DIRTY_LISTINGS_DEFAULT
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: default_state_dir(),
            block_cache_mb: default_block_cache_mb(),
            write_buffer_mb: default_write_buffer_mb(),
            max_dirty_listings: default_max_dirty_listings(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated host:port list, for every Kafka binding.
    #[serde(default = "default_bootstrap_servers")]
    pub bootstrap_servers: String,
    /// How long to wait for a broker at start before giving up with an error.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Consumer group for offset commits (lag monitoring); default `assay-<topology>`.
    pub group_id: Option<String>,
}

fn default_bootstrap_servers() -> String {
    "127.0.0.1:9092".into()
}
/// 30 s: long enough for a broker that is still starting, short enough to fail visibly.
fn default_connect_timeout_ms() -> u64 {
    30_000
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            bootstrap_servers: default_bootstrap_servers(),
            connect_timeout_ms: default_connect_timeout_ms(),
            group_id: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Binding {
    File(FileBinding),
    Kafka(KafkaBinding),
}

/// A Kafka topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaBinding {
    pub topic: String,
    /// Expected partition count (checked at start), and the count used by `create_topic`.
    pub partitions: Option<u32>,
    /// Create the topic at start when it does not exist (replication factor 1).
    #[serde(default)]
    pub create_topic: bool,
    /// Any librdkafka property, passed through; applied after assay's own.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// As an input: the longest an epoch stays open. Shorter lowers latency,
    /// longer batches better.
    #[serde(default = "default_epoch_ms")]
    pub epoch_ms: u64,
    /// As an input: stop when nothing arrived for this long (0 = run forever).
    /// For replays, tests and benchmarks.
    #[serde(default)]
    pub stop_when_idle_ms: u64,
}

fn default_epoch_ms() -> u64 {
    5
}

/// A JSONL file: one record per line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBinding {
    pub path: PathBuf,
    /// As an input: records are spread over this many partitions by a hash of
    /// their key (like a keyed Kafka topic), and partitions over workers.
    /// Keep it fixed for a state directory: it is part of the state key.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// As an input: longer lines are dead-lettered (`record_too_large`).
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// As an input: replay at most this many records per second (0 = unlimited),
    /// to watch a replay or to test a crash mid-run.
    #[serde(default)]
    pub records_per_second: u64,
    /// As an output: every this many bytes appended are written back to disk
    /// at once and dropped from the page cache once written (0 = left to the
    /// kernel). A run's output then reuses a few megabytes of page cache
    /// instead of filling it with dirty pages; see
    /// `connectors/file/write_behind.rs`.
    #[serde(default = "default_write_behind_bytes")]
    pub write_behind_bytes: u64,
}

fn default_partitions() -> u32 {
    8
}
/// 8 MiB: a window's writeback has the next window's writing to finish in;
/// 2 to 32 MiB gave the same system time in a 1.5 GB test (stop 34).
fn default_write_behind_bytes() -> u64 {
    8 << 20
}
/// 1 MiB: far above any real listing, far below what would hurt memory.
fn default_max_record_bytes() -> usize {
    1 << 20
}

impl EnvConfig {
    pub fn binding(&self, name: &str) -> Option<&Binding> {
        self.bindings.get(name)
    }

    /// The limit on market re-evaluations per epoch and partition that a run
    /// of `plan` applies: the runtime's for a Kafka input, 0 (none) for a
    /// file. A file is a replay, whose output must be a function of its
    /// lines alone, and a queue drained per tick would make it one of timing
    /// too (its latency is no one's to wait for anyway). `assay run` says so
    /// when the two differ.
    pub fn market_evaluation_limit(&self, plan: &Plan) -> u64 {
        match self.bindings.get(&plan.input_binding) {
            Some(Binding::Kafka(_)) => self.runtime.market_evaluations_per_epoch_and_partition,
            _ => 0,
        }
    }

    /// Input partitions for `explain`; Kafka's are known only from the broker.
    pub fn input_partitions(&self, plan: &Plan) -> Option<u32> {
        match &self.bindings[&plan.input_binding] {
            Binding::File(file) => Some(file.partitions),
            Binding::Kafka(kafka) => kafka.partitions,
        }
    }
}

/// Loads the config (file or embedded default, then environment) and checks
/// it against the topology. `env` is the environment, passed in for tests.
pub fn load(
    path: Option<&Path>,
    env: &[(String, String)],
    plan: Option<&Plan>,
) -> Result<EnvConfig, Diagnostics> {
    let source = match path {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => SourceText {
                path: path.to_path_buf(),
                text,
            },
            Err(error) => {
                let mut diagnostics = Diagnostics::default();
                diagnostics.error(
                    path,
                    format!("cannot read the config: {error}"),
                    Some("pass the path of a config/*.toml file".into()),
                );
                return Err(diagnostics);
            }
        },
        None => SourceText {
            path: PathBuf::from(EMBEDDED_DEFAULT_NAME),
            text: EMBEDDED_DEFAULT.to_string(),
        },
    };
    // located errors first, from the file as written
    let mut config: EnvConfig = deserialize_collecting(&source)?;
    let mut diagnostics = Diagnostics::default();
    let overrides: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with("ASSAY_") && k.contains("__"))
        .collect();
    if !overrides.is_empty() {
        let mut table: toml::Table =
            toml::from_str(&source.text).expect("the text deserialized a moment ago");
        for (name, value) in &overrides {
            let path: Vec<String> = name["ASSAY_".len()..]
                .split("__")
                .map(|p| p.to_lowercase())
                .collect();
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.clone()));
            let mut cursor = &mut table;
            for part in &path[..path.len() - 1] {
                let entry = cursor
                    .entry(part.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(inner) => cursor = inner,
                    _ => {
                        diagnostics.error(
                            Path::new(name),
                            format!("`{part}` is not a table"),
                            Some("ASSAY_<SECTION>__<KEY>=value".into()),
                        );
                        return Err(diagnostics);
                    }
                }
            }
            cursor.insert(path[path.len() - 1].clone(), parsed);
        }
        match toml::Value::Table(table).try_into::<EnvConfig>() {
            Ok(layered) => config = layered,
            Err(error) => {
                let names: Vec<&str> = overrides.iter().map(|(k, _)| k.as_str()).collect();
                diagnostics.error(
                    Path::new(&format!("environment ({})", names.join(", "))),
                    error.message().to_string(),
                    Some("ASSAY_<SECTION>__<KEY>=value, e.g. ASSAY_RUNTIME__WORKERS=2".into()),
                );
                return Err(diagnostics);
            }
        }
    }
    check(&config, &source.path, plan, &mut diagnostics);
    diagnostics.into_result(config)
}

fn check(config: &EnvConfig, file: &Path, plan: Option<&Plan>, diagnostics: &mut Diagnostics) {
    if config.runtime.workers == 0 {
        diagnostics.error(file, "runtime.workers must be at least 1", None);
    }
    if config.runtime.epoch_records == 0 {
        diagnostics.error(file, "runtime.epoch_records must be at least 1", None);
    }
    if config.runtime.market_window_epochs == 0 {
        diagnostics.error(
            file,
            "runtime.market_window_epochs must be at least 1",
            Some(
                "1 re-evaluates neighbours every epoch; K gathers K epochs of market moves".into(),
            ),
        );
    }
    let (window, phases) = (
        config.runtime.market_window_epochs,
        config.runtime.market_window_phases,
    );
    if phases == 0 || (window > 0 && phases > window) {
        diagnostics.error(
            file,
            format!("runtime.market_window_phases is {phases}; it must be between 1 and market_window_epochs ({window})"),
            Some("1 ends every segment's window together; P splits the segments into P groups whose windows end K / P epochs apart".into()),
        );
    }
    if config.runtime.market_windows_per_sync == 0 {
        diagnostics.error(
            file,
            "runtime.market_windows_per_sync must be at least 1",
            Some("with staggered windows, every N windows all groups' windows end together, and checkpoints fall there".into()),
        );
    }
    if config.runtime.max_epochs_in_flight == 0 {
        diagnostics.error(
            file,
            "runtime.max_epochs_in_flight must be at least 1",
            None,
        );
    }
    for (name, binding) in &config.bindings {
        match binding {
            Binding::File(file_binding) if file_binding.partitions == 0 => {
                diagnostics.error(
                    file,
                    format!("bindings.{name}.partitions must be at least 1"),
                    None,
                );
            }
            Binding::Kafka(kafka) if kafka.topic.trim().is_empty() => {
                diagnostics.error(file, format!("bindings.{name}.topic is empty"), None);
            }
            Binding::Kafka(kafka) if kafka.partitions == Some(0) => {
                diagnostics.error(
                    file,
                    format!("bindings.{name}.partitions must be at least 1"),
                    None,
                );
            }
            _ => {}
        }
    }
    let Some(plan) = plan else { return };
    let known: Vec<&str> = config.bindings.keys().map(String::as_str).collect();
    for (role, name) in [
        ("input", &plan.input_binding),
        ("output", &plan.output_binding),
        ("dead letters", &plan.dead_letter_binding),
    ] {
        if !config.bindings.contains_key(name) {
            diagnostics.error(file, format!("the topology's {role} `{name}` is not bound"),
                Some(format!("add [bindings.{name}] with type = \"file\" and a path, or type = \"kafka\" and a topic; bound here: {}", known.join(", "))));
        }
    }
    if let Some(Binding::File(input)) = config.bindings.get(&plan.input_binding)
        && !input.path.is_file()
    {
        diagnostics.error(
            file,
            format!("input file {} does not exist", input.path.display()),
            Some("relative paths are resolved from the directory you run assay in".into()),
        );
    }
}
