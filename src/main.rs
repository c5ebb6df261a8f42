//! The `assay` command line.

use std::path::PathBuf;
use std::process::ExitCode;

mod bench_command;
mod bench_kafka;
mod bench_market;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "assay",
    version,
    about = "Enrich marketplace listing changes for search: decode, per-listing state, features, ONNX scoring, documents out.",
    long_about = "assay consumes a stream of listing changes, keeps per-listing state in RocksDB, computes features, \
scores them with ONNX models and writes enriched documents (upserts and tombstones) for a search indexer.\n\n\
Start with:  assay run topologies/listings.toml\n\
It reads the committed sample stream and writes out/search_documents.jsonl and out/dead_letters.jsonl."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a topology until its input is consumed, then print a summary.
    Run {
        /// The topology file, e.g. topologies/listings.toml.
        topology: PathBuf,
        /// Environment config (bindings, workers, state); default: the embedded config/default.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Discard the topology's state and truncate its output files before running.
        #[arg(long)]
        from_scratch: bool,
        /// Progress bar on stderr: auto (when a terminal), always or never.
        #[arg(long, default_value = "auto")]
        progress: String,
        /// Also write the summary as JSON to this file.
        #[arg(long)]
        summary_json: Option<PathBuf>,
        /// Benchmark baseline: decode and re-encode only (no state, features or models).
        #[arg(long, hide = true)]
        pass_through: bool,
    },
    /// Produce a JSONL file into a Kafka topic, one record per line, keyed by the listing id.
    Produce {
        /// The JSONL file, e.g. topologies/listings/data/listing_changes.jsonl.
        file: PathBuf,
        #[arg(long, default_value = "listing_changes")]
        topic: String,
        #[arg(
            long,
            default_value = "127.0.0.1:9092",
            env = "ASSAY_KAFKA__BOOTSTRAP_SERVERS"
        )]
        brokers: String,
        /// Top-level field whose value is the record key.
        #[arg(long, default_value = "listing_id")]
        key_field: String,
        /// Create the topic with this many partitions first, if it does not exist.
        #[arg(long)]
        create_partitions: Option<u32>,
    },
    /// Print a topic's records as JSON lines (partition, offset, key, headers, value).
    Tail {
        #[arg(long, default_value = "search_documents")]
        topic: String,
        #[arg(
            long,
            default_value = "127.0.0.1:9092",
            env = "ASSAY_KAFKA__BOOTSTRAP_SERVERS"
        )]
        brokers: String,
        /// Start at the beginning of the topic instead of its end.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<u64>,
        /// Stop when nothing arrived for this long.
        #[arg(long, default_value_t = 5000)]
        idle_ms: u64,
    },
    /// Benchmark against a running broker: pass-through and full topology,
    /// throughput, end-to-end latency at half the maximum rate, CPU.
    BenchKafka(bench_kafka::Options),
    /// Benchmark: generate a stream calibrated on the sample, run the full
    /// topology and a pass-through baseline on 1 and 2 workers, print
    /// throughput, latency percentiles and peak memory.
    Bench {
        #[arg(long, default_value = "topologies/listings.toml")]
        topology: PathBuf,
        /// Events in the mixed stream.
        #[arg(long, default_value_t = 1_000_000)]
        events: u64,
        /// Live listings for the memory scenario (a stream of creates only); 0 skips it.
        #[arg(long, default_value_t = 1_000_000)]
        live_listings: u64,
        /// Worker counts to measure, comma-separated.
        #[arg(long, default_value = "1,2")]
        workers: String,
        #[arg(long, default_value_t = 1024)]
        epoch_records: u64,
        /// Also run the full topology with this `market_window_epochs` (a
        /// row of its own, `full-wK`); 1 skips it.
        #[arg(long, default_value_t = 8)]
        market_window_epochs: u64,
        /// Where generated streams, state and outputs go.
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
    },
    /// Benchmark market aggregates: a generated market of live listings over
    /// Zipf-sized segments, then updates; with and without aggregates in the
    /// same invocation: throughput, fan-out, arrangement memory, rebuild time.
    BenchMarket {
        #[arg(long, default_value_t = 1_000_000)]
        listings: u64,
        #[arg(long, default_value_t = 1_000_000)]
        updates: u64,
        #[arg(long, default_value_t = 5_000)]
        segments: usize,
        #[arg(long, default_value_t = 1)]
        workers: usize,
        #[arg(long, default_value_t = 4096)]
        epoch_records: u64,
        #[arg(long, default_value = "target/bench-market")]
        dir: PathBuf,
    },
    /// Check a topology and config: every error at once, with file, line and a hint.
    Validate {
        topology: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the compiled plan: stages, keys, state, models.
    Explain {
        topology: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn environment() -> Vec<(String, String)> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("ASSAY_"))
        .collect()
}

fn prepare(
    topology: &std::path::Path,
    config: Option<&std::path::Path>,
) -> Result<assay::Prepared, ExitCode> {
    match assay::prepare(topology, config, &environment()) {
        Ok(prepared) => Ok(prepared),
        Err(assay::PrepareError::Invalid(diagnostics)) => {
            eprintln!("{diagnostics}");
            eprintln!("{} error(s); nothing was started", diagnostics.errors.len());
            Err(ExitCode::from(2))
        }
        Err(error) => {
            eprintln!("error: {error}");
            Err(ExitCode::from(2))
        }
    }
}

/// jemalloc instead of glibc's malloc: the pipeline allocates and frees many
/// small values per event (states, rows, documents, batches); with glibc
/// malloc and free were a fifth of a run's CPU. Without the `jemalloc`
/// feature (`--no-default-features`) glibc's serves, so heap profilers
/// (heaptrack) see every allocation.
///
/// jemalloc is built unprefixed: its `malloc` and `free` replace glibc's for
/// the whole process, so librdkafka and RocksDB (C and C++) allocate through
/// it too. With glibc's (one arena, below) librdkafka's per-message
/// allocations on the worker and its frees on the producer's poll thread
/// took a lock each: glibc's malloc and free were 14% of the engine's CPU
/// in a Kafka run of the full topology (`perf`, 1M events, 2 workers). The
/// memory scenario of `assay bench` (1M creates, full topology) also peaked
/// lower: 263-268 MB against 283-284 MB with RocksDB on glibc.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL_ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start (`MALLOC_CONF` overrides them): a
/// background thread returns freed pages to the system after 1 s, instead
/// of whichever allocation happens to come by, and freed pages are not kept
/// "muzzy". The arrangements' merges free large batches at once; with the
/// defaults the memory scenario of `assay bench` (1M creates, full
/// topology) peaked about 15 MB higher, at the same throughput.
///
/// The thread cache holds more freed objects per size class (up to 2,000,
/// eight times the defaults' per-class counts) and is trimmed only after
/// 1 MiB of allocation instead of 64 KiB. An epoch allocates a thousand-odd
/// documents, rows and states of a few sizes and frees them together once
/// the sink has written them; with the default cache most of those went to
/// the arena in batches and came back the same way. Callgrind, first 100,000
/// events, 1 worker: 2.4% fewer instructions in the core topology, 2.7% in
/// the full one; the memory scenario peaked 2.4 MB higher (279.1 against
/// 276.7 MB).
///
/// (jemalloc reads a `const char *`: a reference to a byte array is one thin
/// pointer to a NUL-terminated text.)
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "malloc_conf")]
pub static malloc_conf: &[u8; 141] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,\
tcache_nslots_small_max:2000,lg_tcache_nslots_mul:3,tcache_gc_incr_bytes:1048576\0";

/// Without jemalloc, RocksDB (C++), librdkafka and the pipeline allocate
/// through glibc's malloc. glibc gives each thread that contends for the
/// heap an arena of its own (up to 8 per core) and keeps what is freed in
/// each, so the memory scenario of `assay bench` held about 10 MB more with
/// arenas per thread than with one (298-300 MB against 308-310 MB peak RSS,
/// at the same throughput). A heap profile wants the memory a run holds,
/// not glibc's arenas.
fn limit_glibc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "jemalloc")))]
    // SAFETY: called first in `main`, before any thread exists; mallopt only
    // sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Errors end the process as `error: ...` with their causes, like the
/// validation messages, and without a backtrace even when RUST_BACKTRACE is
/// set: they are answers for the person running assay, not crashes.
fn main() -> ExitCode {
    limit_glibc_arenas();
    match run_command() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_command() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { topology, config } => {
            let prepared = match prepare(&topology, config.as_deref()) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            println!(
                "{}: ok ({} fields, {} features, {} models passed their golden checks)",
                topology.display(),
                prepared.plan.fields.len(),
                prepared.plan.features.len(),
                prepared.models.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { topology, config } => {
            let prepared = match prepare(&topology, config.as_deref()) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let partitions = prepared.config.input_partitions(&prepared.plan);
            print!(
                "{}",
                assay::topology::explain(
                    &prepared.plan,
                    prepared.config.runtime.workers,
                    partitions
                )
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Produce {
            file,
            topic,
            brokers,
            key_field,
            create_partitions,
        } => {
            if let Some(partitions) = create_partitions {
                let kafka = assay::config::KafkaConfig {
                    bootstrap_servers: brokers.clone(),
                    ..Default::default()
                };
                let binding = assay::config::KafkaBinding {
                    topic: topic.clone(),
                    partitions: Some(partitions),
                    create_topic: true,
                    properties: Default::default(),
                    epoch_ms: 5,
                    stop_when_idle_ms: 0,
                };
                assay::connectors::kafka::ensure_topic(&kafka, &binding)?;
            }
            let count =
                assay::connectors::kafka::tools::produce_file(&brokers, &topic, &file, &key_field)
                    .map_err(anyhow::Error::msg)?;
            eprintln!(
                "produced {count} records from {} to topic {topic}",
                file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Tail {
            topic,
            brokers,
            from_beginning,
            count,
            idle_ms,
        } => {
            let mut stdout = std::io::stdout().lock();
            let seen = assay::connectors::kafka::tools::tail(
                &brokers,
                &topic,
                from_beginning,
                count,
                std::time::Duration::from_millis(idle_ms),
                &mut stdout,
            )
            .map_err(anyhow::Error::msg)?;
            eprintln!("{seen} record(s) from topic {topic}");
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchKafka(options) => {
            bench_kafka::run(&options)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            topology,
            events,
            live_listings,
            workers,
            epoch_records,
            market_window_epochs,
            dir,
        } => {
            let workers: Vec<usize> = workers
                .split(',')
                .map(|w| w.trim().parse())
                .collect::<Result<_, _>>()
                .context("--workers takes numbers like 1,2")?;
            bench_command::run(
                &topology,
                events,
                live_listings,
                &workers,
                epoch_records,
                market_window_epochs,
                &dir,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchMarket {
            listings,
            updates,
            segments,
            workers,
            epoch_records,
            dir,
        } => {
            bench_market::run(listings, updates, segments, workers, epoch_records, &dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            topology,
            config,
            from_scratch,
            progress,
            summary_json,
            pass_through,
        } => {
            let prepared = match prepare(&topology, config.as_deref()) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            let progress = match progress.as_str() {
                "auto" => None,
                "always" => Some(true),
                "never" => Some(false),
                other => anyhow::bail!("--progress takes auto, always or never, not {other:?}"),
            };
            let limit = prepared
                .config
                .runtime
                .market_evaluations_per_epoch_and_partition;
            if limit > 0 && prepared.config.market_evaluation_limit(&prepared.plan) == 0 {
                eprintln!(
                    "note: runtime.market_evaluations_per_epoch_and_partition = {limit} applies to Kafka inputs; \
                     this file input evaluates every market re-evaluation in the epoch of its move (a replay's output stays a function of its lines)"
                );
            }
            let options = assay::dataflow::RunOptions {
                from_scratch,
                progress,
                pass_through,
            };
            let summary = assay::dataflow::run(
                prepared.plan.clone(),
                &prepared.config,
                prepared.models.clone(),
                &options,
            )?;
            eprint!("{}", summary.render());
            if let Some(path) = summary_json {
                std::fs::write(&path, serde_json::to_string_pretty(&summary)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(if summary.reconciled {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
    }
}
