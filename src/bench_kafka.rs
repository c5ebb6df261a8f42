//! `assay bench-kafka`: the topology against a real broker, with a
//! pass-through baseline measured in the same invocation.
//!
//! For each pipeline (pass-through, full), on fresh topics:
//! 1. **Throughput**: the whole generated stream is produced first, then the
//!    engine (a child process) consumes it to the end; events/s excludes the
//!    idle wait that ends the run.
//! 2. **Latency at half the maximum**: the engine runs while a producer appends
//!    at half the measured rate (or at `--latency-rate` events/s); a consumer reads the output and records
//!    `now - input record timestamp` (header `assay.source.timestamp`), i.e.
//!    append to the input topic until readable from the output topic.
//!    Split at the engine's send (the output record's create time): append
//!    until sent (the broker's fetch path, the engine's queue and work) and
//!    sent until readable (the broker's produce path and the reader's fetch);
//!    the engine's own read-to-acknowledged comes from its summary, so what
//!    the broker and the clients add can be told from what the engine adds.
//! 3. **CPU per component**: engine (its own /proc), broker (its /proc, when
//!    `--broker-pid` is given), and this process's producer and consumer;
//!    also per 500 ms of the latency run (`CpuSampler`), which shows a
//!    component whose work per record grows through the run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use assay::bench::{Workload, generate};
use assay::observe::{LatencyHistogram, cpu_seconds};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const IDLE_MS: u64 = 2000;

/// How far ahead of its schedule the rate-limited producer may get before it
/// sleeps (see `produce`).
const PACING_STEP: Duration = Duration::from_millis(1);

fn create_topics(brokers: &str, names: &[&str], partitions: u32) -> anyhow::Result<()> {
    let kafka = assay::config::KafkaConfig {
        bootstrap_servers: brokers.into(),
        ..Default::default()
    };
    for name in names {
        let binding = assay::config::KafkaBinding {
            topic: name.to_string(),
            partitions: Some(partitions),
            create_topic: true,
            properties: Default::default(),
            epoch_ms: 5,
            stop_when_idle_ms: 0,
        };
        assay::connectors::kafka::ensure_topic(&kafka, &binding)?;
    }
    Ok(())
}

/// Produces `lines`, at most `rate` per second (0 = as fast as possible). Returns events/s.
fn produce(brokers: &str, topic: &str, lines: &[Vec<u8>], rate: f64) -> anyhow::Result<f64> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "2")
        .create()?;
    let started = Instant::now();
    for (index, line) in lines.iter().enumerate() {
        // Paced a millisecond at a time, not a record at a time: a sleep per
        // record (15 us apart at 68k/s) was a syscall and a wake-up each, and
        // the bench's clients took 2-3 s of CPU in a 5-9 s latency run, on
        // the 2 cores the engine and the broker share. The producer batches
        // for `linger.ms` = 2 anyway, so the broker sees the same arrivals.
        if rate > 0.0 {
            let due = Duration::from_secs_f64(index as f64 / rate);
            let elapsed = started.elapsed();
            if due > elapsed + PACING_STEP {
                std::thread::sleep(due - elapsed);
            }
        }
        let key = assay::connectors::file::source::find_top_level_key(line, b"\"listing_id\"");
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(line);
        record.key = key;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(lines.len() as f64 / started.elapsed().as_secs_f64())
}

/// The engine's config for one run: the shipped Kafka config (`--config`,
/// `config/kafka.toml`) with the bench's broker, topics, state directory and
/// worker count put in, and each engine flag given on the command line
/// overriding the file. So the bench measures what ships, and a setting
/// changed in the file needs no second edit here.
fn engine_config(
    dir: &Path,
    brokers: &str,
    prefix: &str,
    partitions: u32,
    options: &Options,
) -> anyhow::Result<PathBuf> {
    let shipped = std::fs::read_to_string(&options.config)
        .with_context(|| format!("reading {}", options.config.display()))?;
    let mut config: toml::Table = toml::from_str(&shipped)
        .with_context(|| format!("parsing {}", options.config.display()))?;
    let table = |config: &toml::Table, path: &[&str]| -> anyhow::Result<toml::Table> {
        let mut at = config;
        for key in path {
            at = at
                .get(*key)
                .and_then(toml::Value::as_table)
                .with_context(|| {
                    format!("{} has no [{}]", options.config.display(), path.join("."))
                })?;
        }
        Ok(at.clone())
    };
    let mut runtime = config
        .get("runtime")
        .and_then(toml::Value::as_table)
        .cloned()
        .unwrap_or_default();
    runtime.insert("workers".into(), (options.workers as i64).into());
    runtime.insert("progress".into(), "never".into());
    if let Some(epochs) = options.max_epochs_in_flight {
        runtime.insert("max_epochs_in_flight".into(), (epochs as i64).into());
    }
    if let Some(window) = options.market_window_epochs {
        runtime.insert("market_window_epochs".into(), (window as i64).into());
        // the shipped groups fit the shipped window: a smaller window takes at
        // most one group per epoch (the engine refuses more)
        let shipped_phases = runtime
            .get("market_window_phases")
            .and_then(toml::Value::as_integer)
            .unwrap_or(1);
        if options.market_window_phases.is_none() && shipped_phases > window as i64 {
            runtime.insert("market_window_phases".into(), (window.max(1) as i64).into());
        }
    }
    if let Some(phases) = options.market_window_phases {
        runtime.insert("market_window_phases".into(), (phases as i64).into());
    }
    config.insert("runtime".into(), runtime.into());
    let mut state = table(&config, &["state"]).unwrap_or_default();
    let state_dir = dir.join(format!("{prefix}-state"));
    state.insert("dir".into(), state_dir.to_string_lossy().as_ref().into());
    config.insert("state".into(), state.into());
    let mut kafka = table(&config, &["kafka"])?;
    kafka.insert("bootstrap_servers".into(), brokers.into());
    kafka.insert("group_id".into(), prefix.into());
    config.insert("kafka".into(), kafka.into());
    let mut bindings = table(&config, &["bindings"])?;
    for (name, suffix) in [
        ("listing_changes", "in"),
        ("search_documents", "out"),
        ("dead_letters", "dead"),
        ("market_statistics", "statistics"),
    ] {
        let Some(mut binding) = bindings.get(name).and_then(toml::Value::as_table).cloned() else {
            continue;
        };
        binding.insert("topic".into(), format!("{prefix}-{suffix}").into());
        // the bench makes the input, output and dead-letter topics itself,
        // with `--partitions` each; the engine makes the statistics topic
        binding.insert("create_topic".into(), true.into());
        if name != "market_statistics" {
            binding.insert("partitions".into(), (partitions as i64).into());
        }
        if name == "listing_changes" {
            binding.insert("stop_when_idle_ms".into(), (IDLE_MS as i64).into());
            if let Some(epoch_ms) = options.epoch_ms {
                binding.insert("epoch_ms".into(), (epoch_ms as i64).into());
            }
            if let Some(wait) = options.fetch_wait_ms {
                let mut properties = binding
                    .get("properties")
                    .and_then(toml::Value::as_table)
                    .cloned()
                    .unwrap_or_default();
                properties.insert("fetch.wait.max.ms".into(), wait.to_string().into());
                binding.insert("properties".into(), properties.into());
            }
        }
        bindings.insert(name.into(), binding.into());
    }
    config.insert("bindings".into(), bindings.into());
    let path = dir.join(format!("{prefix}.toml"));
    std::fs::write(&path, toml::to_string(&config)?)?;
    Ok(path)
}

/// The input binding's `epoch_ms` in a config `engine_config` wrote, as the
/// engine reads it (its default when the file leaves it out), for the report.
fn input_epoch_ms(config: &Path) -> anyhow::Result<u64> {
    let config =
        assay::config::load(Some(config), &[], None).map_err(|d| anyhow::anyhow!("{d}"))?;
    match config.binding("listing_changes") {
        Some(assay::config::Binding::Kafka(binding)) => Ok(binding.epoch_ms),
        other => bail!("listing_changes is bound to {other:?}, not to a topic"),
    }
}

fn start_engine(
    topology: &Path,
    config: &Path,
    summary: &Path,
    pass_through: bool,
) -> anyhow::Result<std::process::Child> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("run")
        .arg(topology)
        .arg("--config")
        .arg(config)
        .args(["--from-scratch", "--progress", "never", "--summary-json"])
        .arg(summary);
    if pass_through {
        command.arg("--pass-through");
    }
    Ok(command.stderr(std::process::Stdio::null()).spawn()?)
}

/// Reads `topic` from the start until `stop`, recording end-to-end latency.
fn measure_latency(
    brokers: &str,
    topic: &str,
    stop: Arc<AtomicBool>,
    histograms: Arc<Mutex<Latencies>>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "assay-bench")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p as i32, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    while !stop.load(Ordering::Relaxed) {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(50)) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            // the engine's documents carry their input's append time; a record
            // of the broker-only baseline has its own
            let appended = message.headers().and_then(|h| {
                h.iter()
                    .find(|h| h.key == "assay.source.timestamp")
                    .and_then(|h| h.value)
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok())
            });
            let created = message.timestamp().to_millis();
            let millis = |from: i64, to: i64| ((to - from).max(0) as u64) * 1_000_000;
            let mut histograms = histograms.lock().unwrap();
            if let Some(appended) = appended {
                histograms.over_time.push((appended, now - appended));
            }
            match (appended, created) {
                (Some(appended), Some(created)) => {
                    histograms.total.record(millis(appended, now));
                    histograms.until_sent.record(millis(appended, created));
                    histograms.after_sent.record(millis(created, now));
                }
                (Some(appended), None) => histograms.total.record(millis(appended, now)),
                // a market re-emission (no input record of its own) or a record
                // of the broker-only baseline: its own create time
                (None, Some(created)) => histograms.total.record(millis(created, now)),
                (None, None) => {}
            }
        }
    }
    Ok(())
}

/// What a `LatencyReader` records, per output record.
#[derive(Default)]
struct Latencies {
    /// Append to the input topic (or, without an input record, the engine's
    /// send) until readable from the output topic.
    total: LatencyHistogram,
    /// Append until the engine sent the document (records with an input record).
    until_sent: LatencyHistogram,
    /// The engine's send until readable (records with an input record).
    after_sent: LatencyHistogram,
    /// (append time, append -> readable) in ms, per document of an input record.
    over_time: Vec<(i64, i64)>,
}

/// p50 and p99 in ms of each of `Latencies`' histograms.
#[derive(Clone, Default)]
struct LatencyFigures {
    total: (f64, f64),
    until_sent: (f64, f64),
    after_sent: (f64, f64),
    /// The slowest document per `TREND_BUCKET_MS` of append time, in ms:
    /// steady means the tail is stalls, growing means a queue (the engine
    /// does not keep up at that rate).
    trend: Vec<i64>,
}

const TREND_BUCKET_MS: i64 = 500;

/// The slowest latency per bucket of append time, first append first.
fn latency_trend(over_time: &[(i64, i64)]) -> Vec<i64> {
    let Some(first) = over_time.iter().map(|(appended, _)| *appended).min() else {
        return Vec::new();
    };
    let mut trend = Vec::new();
    for (appended, latency) in over_time {
        let bucket = ((appended - first) / TREND_BUCKET_MS) as usize;
        if trend.len() <= bucket {
            trend.resize(bucket + 1, 0);
        }
        trend[bucket] = trend[bucket].max(*latency);
    }
    trend
}

fn p50_p99_ms(histogram: &LatencyHistogram) -> (f64, f64) {
    (
        histogram.quantile(0.5).as_secs_f64() * 1e3,
        histogram.quantile(0.99).as_secs_f64() * 1e3,
    )
}

/// The CPU of the broker, the engine and this process (the bench's producer
/// and reader), sampled every `TREND_BUCKET_MS` while a latency run produces:
/// at a steady rate a component whose share grows is doing more per record
/// as the run goes on. tansu 0.6.0's memory store lists every stored batch of
/// a partition on each fetch (`tansu-storage` `dynostore.rs`, `fetch`), so
/// its cost per fetch grows with the topic's length; this shows it in figures.
struct CpuSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<CpuTrend>,
}

/// Each component's share of one core, in percent, per `TREND_BUCKET_MS`.
#[derive(Clone, Default)]
struct CpuTrend {
    broker: Vec<i64>,
    engine: Vec<i64>,
    bench_clients: Vec<i64>,
}

impl CpuSampler {
    fn start(broker: Option<u32>, engine: Option<u32>) -> CpuSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = std::thread::spawn(move || {
            let read = || {
                (
                    broker.map(|p| cpu_seconds(Some(p))),
                    engine.map(|p| cpu_seconds(Some(p))),
                    cpu_seconds(None),
                )
            };
            let share = |after: Option<f64>, before: Option<f64>, seconds: f64| {
                after
                    .zip(before)
                    .map(|(after, before)| (100.0 * (after - before) / seconds).round() as i64)
            };
            let mut trend = CpuTrend::default();
            let (mut at, mut before) = (Instant::now(), read());
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(TREND_BUCKET_MS as u64));
                let (now, after) = (Instant::now(), read());
                let seconds = (now - at).as_secs_f64();
                trend.broker.extend(share(after.0, before.0, seconds));
                trend.engine.extend(share(after.1, before.1, seconds));
                trend
                    .bench_clients
                    .extend(share(Some(after.2), Some(before.2), seconds));
                (at, before) = (now, after);
            }
            trend
        });
        CpuSampler { stop, handle }
    }

    fn finish(self) -> CpuTrend {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// `measure_latency` on its own thread, from `start` until `finish`.
struct LatencyReader {
    stop: Arc<AtomicBool>,
    histograms: Arc<Mutex<Latencies>>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl LatencyReader {
    fn start(brokers: &str, topic: &str) -> LatencyReader {
        let stop = Arc::new(AtomicBool::new(false));
        let histograms = Arc::new(Mutex::new(Latencies::default()));
        let thread = {
            let (brokers, topic, stop, histograms) = (
                brokers.to_string(),
                topic.to_string(),
                stop.clone(),
                histograms.clone(),
            );
            std::thread::spawn(move || measure_latency(&brokers, &topic, stop, histograms))
        };
        LatencyReader {
            stop,
            histograms,
            thread,
        }
    }

    /// Stops reading; returns the p50 and p99 latencies in ms.
    fn finish(self) -> anyhow::Result<LatencyFigures> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("latency reader panicked"))?
            .context("latency reader")?;
        let histograms = self.histograms.lock().unwrap();
        Ok(LatencyFigures {
            total: p50_p99_ms(&histograms.total),
            until_sent: p50_p99_ms(&histograms.until_sent),
            after_sent: p50_p99_ms(&histograms.after_sent),
            trend: latency_trend(&histograms.over_time),
        })
    }
}

/// Waits until the engine reads every partition of `input`: one record it
/// cannot decode per partition, then its dead letters on `dead_letters`. The
/// warm-up is in the engine's counts (records in, dead letters), not in the
/// latency figures (dead letters are not on the output topic).
fn warm_up(brokers: &str, input: &str, dead_letters: &str, partitions: u32) -> anyhow::Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for partition in 0..partitions as i32 {
        let record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(input)
            .partition(partition)
            .payload(b"bench-kafka warm-up: not a listing change");
        producer
            .send(record)
            .map_err(|(error, _)| anyhow::anyhow!("warm-up record: {error}"))?;
    }
    producer.flush(Duration::from_secs(30))?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "assay-bench-warm-up")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        assignment.add_partition_offset(dead_letters, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while seen < partitions {
        if Instant::now() > deadline {
            bail!(
                "the engine did not dead-letter its warm-up records within 60 s ({seen} of {partitions} seen on {dead_letters})"
            );
        }
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(50)) {
            seen += 1;
        }
    }
    Ok(())
}

/// The broker alone: records produced at `rate` into `topic` and read back by
/// the same reader as the engine's output, with no engine in between. What
/// the engine adds is the difference to this.
fn broker_round_trip(
    brokers: &str,
    topic: &str,
    lines: &[Vec<u8>],
    rate: f64,
    partitions: u32,
    broker_pid: Option<u32>,
) -> anyhow::Result<((f64, f64), CpuTrend)> {
    create_topics(brokers, &[topic], partitions)?;
    let reader = LatencyReader::start(brokers, topic);
    std::thread::sleep(Duration::from_millis(500));
    eprintln!(
        "bench-kafka: broker alone: producing {} events at {rate:.0}/s and reading them back",
        lines.len()
    );
    let sampler = CpuSampler::start(broker_pid, None);
    produce(brokers, topic, lines, rate)?;
    let cpu_trend = sampler.finish();
    std::thread::sleep(Duration::from_millis(IDLE_MS));
    Ok((reader.finish()?.total, cpu_trend))
}

struct Row {
    /// The pipeline, with its round when there are several.
    label: String,
    pipeline: &'static str,
    round: u32,
    events_per_second: f64,
    latency_run_rate: f64,
    latencies: LatencyFigures,
    /// The engine's own read to acknowledged, p50 and p99 ms, from its summary.
    engine_latency: (f64, f64),
    /// The engine's record timestamp -> read (its source lag), p50 / p99.
    engine_source_lag: (f64, f64),
    /// The broker alone at the latency run's rate, p50 and p99 ms.
    broker_alone: (f64, f64),
    /// The broker's CPU while the broker alone ran, per `TREND_BUCKET_MS`.
    broker_alone_cpu_trend: CpuTrend,
    /// The latency run's CPU per component, per `TREND_BUCKET_MS`.
    cpu_trend: CpuTrend,
    engine_cpu: f64,
    broker_cpu: f64,
    client_cpu: f64,
    broker_load: Option<f64>,
    engine_load: f64,
    /// The latency run's worker time: busy, source empty, back-pressured,
    /// checkpoints, on a core, waiting for a core (seconds, summed over workers).
    engine_worker_time: [f64; 6],
    events: u64,
}

/// `assay bench-kafka`'s options.
#[derive(clap::Args, Debug)]
pub struct Options {
    #[arg(long, default_value = "topologies/listings.toml")]
    topology: PathBuf,
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events produced during the latency measurement. 600k at the full
    /// topology's half rate is 6-7 s here: long enough to show whether the
    /// engine keeps up (at that rate full's latency grew through the run; a
    /// 2 s run of 200k ended before it showed)
    #[arg(long, default_value_t = 600_000)]
    latency_events: u64,
    /// The latency run's rate as a fraction of the measured maximum (the target is set at 0.5).
    #[arg(long, default_value_t = 0.5)]
    latency_rate_fraction: f64,
    /// The latency run's rate in events/s, for every pipeline, instead of a
    /// fraction of each one's own maximum. Two binaries or settings compared
    /// at a fraction of their own maxima run at different rates (stop 32:
    /// 97.6k against 79.8k events/s in one pair), and a higher rate alone
    /// moves the latency; at one rate the latencies compare like with like.
    #[arg(long, conflicts_with = "latency_rate_fraction")]
    latency_rate: Option<f64>,
    /// Which pipelines to run, in this order in each round
    /// (`pass-through`, `full`); a figure "vs pass" needs pass-through in
    /// the same round.
    #[arg(long, value_delimiter = ',', default_values_t = [BenchPipeline::PassThrough, BenchPipeline::Full])]
    pipelines: Vec<BenchPipeline>,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Rounds of the whole measurement, interleaved (pass-through, full,
    /// pass-through, ...), each on fresh topics; with more than one, the
    /// medians follow the rounds. This machine's noise can be larger than a
    /// change being measured.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// The engine's config, with the bench's broker, topics, state directory
    /// and workers put in; the flags below override it.
    #[arg(long, default_value = "config/kafka.toml")]
    config: PathBuf,
    /// Override of the input binding's `epoch_ms` (`config/kafka.toml`: 20;
    /// at half of the full topology's maximum rate, 5 ms epochs left the
    /// engine behind and 20 ms epochs kept up).
    #[arg(long)]
    epoch_ms: Option<u64>,
    /// Override of `runtime.max_epochs_in_flight`.
    #[arg(long)]
    max_epochs_in_flight: Option<u64>,
    /// Override of `runtime.market_window_epochs` (`config/kafka.toml`: 25
    /// epochs of 20 ms). With 1, every tick re-evaluated the neighbours of
    /// every statistic that moved, and at half of the maximum rate the full
    /// topology fell behind (its trend line grew).
    #[arg(long)]
    market_window_epochs: Option<u64>,
    /// Override of `runtime.market_window_phases` (`config/kafka.toml`: 1).
    /// Without it, a `--market-window-epochs` below the shipped phases lowers
    /// them to the window.
    #[arg(long)]
    market_window_phases: Option<u64>,
    /// Override of the engine consumer's `fetch.wait.max.ms`
    /// (`config/kafka.toml`: 10): tansu 0.6.0 answers every fetch only after
    /// sleeping for at least half of the request's maximum wait (a full one
    /// below 250 ms), even when records are there at once, so librdkafka's
    /// default of 500 ms puts 250 ms into every fetch round trip. A Kafka
    /// broker answers as soon as records arrive.
    #[arg(long)]
    fetch_wait_ms: Option<u64>,
    /// The broker's process id, to report its CPU.
    #[arg(long)]
    broker_pid: Option<u32>,
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
}

/// A pipeline `bench-kafka` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchPipeline {
    /// Consume, produce the same bytes.
    PassThrough,
    /// The whole topology.
    Full,
}

impl BenchPipeline {
    fn name(self) -> &'static str {
        match self {
            BenchPipeline::PassThrough => "pass-through",
            BenchPipeline::Full => "full",
        }
    }
}

impl std::fmt::Display for BenchPipeline {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    let Options {
        topology,
        brokers,
        dir,
        ..
    } = options;
    let brokers = brokers.as_str();
    if let Some(rate) = options.latency_rate
        && !(rate > 0.0 && rate.is_finite())
    {
        bail!(
            "--latency-rate {rate}: a rate in events/s above 0 (0 would produce as fast as it can, a backlog)"
        );
    }
    let (events, workers, partitions) = (options.events, options.workers, options.partitions);
    let mut epoch_ms = None;
    std::fs::create_dir_all(dir)?;
    let sample = topology
        .parent()
        .unwrap_or(Path::new("."))
        .join("listings/data/listing_changes.jsonl");
    let stream = dir.join(format!("mixed-{events}.jsonl"));
    if !stream.exists() {
        eprintln!("bench-kafka: generating {events} events");
        generate(&sample, &stream, events, Workload::Mixed, 42)?;
    }
    let lines: Vec<Vec<u8>> = std::fs::read(&stream)?
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut rows = Vec::new();
    let rounds = options.rounds.max(1);
    let pipelines: Vec<(&str, bool)> = options
        .pipelines
        .iter()
        .map(|pipeline| (pipeline.name(), *pipeline == BenchPipeline::PassThrough))
        .collect();
    for (round, (pipeline, pass_through)) in (1..=rounds).flat_map(|round| {
        pipelines
            .iter()
            .copied()
            .map(move |pipeline| (round, pipeline))
    }) {
        let label = if rounds > 1 {
            format!("{pipeline} #{round}")
        } else {
            pipeline.to_string()
        };
        // 1. maximum throughput on a pre-filled topic
        let prefix = format!("bench{run_id}-r{round}-{pipeline}");
        create_topics(
            brokers,
            &[
                &format!("{prefix}-in"),
                &format!("{prefix}-out"),
                &format!("{prefix}-dead"),
            ],
            partitions,
        )?;
        eprintln!("bench-kafka: {label}: producing {} events", lines.len());
        let produce_rate = produce(brokers, &format!("{prefix}-in"), &lines, 0.0)?;
        eprintln!("bench-kafka: {label}: produced at {produce_rate:.0} events/s; consuming");
        let summary_path = dir.join(format!("{prefix}-summary.json"));
        let config = engine_config(dir, brokers, &prefix, partitions, options)?;
        epoch_ms = Some(input_epoch_ms(&config)?);
        let broker_cpu_before = options
            .broker_pid
            .map(|p| cpu_seconds(Some(p)))
            .unwrap_or(0.0);
        let status = start_engine(topology, &config, &summary_path, pass_through)?.wait()?;
        if !status.success() {
            bail!("{label} engine failed ({status})");
        }
        let broker_cpu = options
            .broker_pid
            .map(|p| cpu_seconds(Some(p)))
            .unwrap_or(0.0)
            - broker_cpu_before;
        let summary = crate::bench_command::summary_from(&summary_path)?;
        // the summary stays for reading; the engine's state would pile up run after run
        let _ = std::fs::remove_dir_all(dir.join(format!("{prefix}-state")));
        let busy = (summary.elapsed_seconds - IDLE_MS as f64 / 1000.0).max(1e-3);
        let events_per_second = summary.records_in as f64 / busy;

        // 2. latency at half of that rate (or the rate asked for), engine running while records arrive
        let latency_run_rate = options
            .latency_rate
            .unwrap_or(events_per_second * options.latency_rate_fraction);
        let latency_prefix = format!("{prefix}-latency");
        create_topics(
            brokers,
            &[
                &format!("{latency_prefix}-in"),
                &format!("{latency_prefix}-out"),
                &format!("{latency_prefix}-dead"),
            ],
            partitions,
        )?;
        let count = (options.latency_events as usize).min(lines.len());
        // the broker alone at the same rate and count, on a fresh topic: what
        // the latency run would see with no engine in between
        let (broker_alone, broker_alone_cpu_trend) = broker_round_trip(
            brokers,
            &format!("{prefix}-echo"),
            &lines[..count],
            latency_run_rate,
            partitions,
            options.broker_pid,
        )?;
        let latency_config = engine_config(dir, brokers, &latency_prefix, partitions, options)?;
        let latency_summary = dir.join(format!("{latency_prefix}-summary.json"));
        let mut engine = start_engine(topology, &latency_config, &latency_summary, pass_through)?;
        let reader = LatencyReader::start(brokers, &format!("{latency_prefix}-out"));
        // Records produced before the engine's consumers fetch wait for them:
        // with a fixed half-second pause, that start-up wait was most of the
        // reported p99 (pass-through p99 480 -> 55 ms once it was left out).
        warm_up(
            brokers,
            &format!("{latency_prefix}-in"),
            &format!("{latency_prefix}-dead"),
            partitions,
        )?;
        let client_cpu_before = cpu_seconds(None);
        let latency_started = Instant::now();
        let broker_cpu_before = options
            .broker_pid
            .map(|p| cpu_seconds(Some(p)))
            .unwrap_or(0.0);
        let engine_cpu_before = cpu_seconds(Some(engine.id()));
        eprintln!(
            "bench-kafka: {label}: producing {count} events at {latency_run_rate:.0}/s while the engine runs"
        );
        let sampler = CpuSampler::start(options.broker_pid, Some(engine.id()));
        produce(
            brokers,
            &format!("{latency_prefix}-in"),
            &lines[..count],
            latency_run_rate,
        )?;
        let cpu_trend = sampler.finish();
        // the engine's and the broker's share of one core while records were produced
        let producing = latency_started.elapsed().as_secs_f64();
        let engine_load = (cpu_seconds(Some(engine.id())) - engine_cpu_before) / producing;
        let broker_load = options
            .broker_pid
            .map(|p| (cpu_seconds(Some(p)) - broker_cpu_before) / producing);
        let status = engine.wait()?;
        let latencies = reader.finish()?;
        if !status.success() {
            bail!("{label} latency engine failed ({status})");
        }
        let latency_run = crate::bench_command::summary_from(&latency_summary)?;
        let _ = std::fs::remove_dir_all(dir.join(format!("{latency_prefix}-state")));
        let client_cpu = cpu_seconds(None) - client_cpu_before;
        rows.push(Row {
            label: label.clone(),
            pipeline,
            round,
            events_per_second,
            latency_run_rate,
            latencies,
            engine_latency: (latency_run.latency_p50_ms, latency_run.latency_p99_ms),
            engine_source_lag: (
                latency_run.source_lag_p50_ms.unwrap_or(f64::NAN),
                latency_run.source_lag_p99_ms.unwrap_or(f64::NAN),
            ),
            broker_alone,
            broker_alone_cpu_trend,
            cpu_trend,
            engine_cpu: summary.cpu_seconds,
            broker_cpu,
            client_cpu,
            broker_load,
            engine_load,
            engine_worker_time: [
                latency_run.worker_busy_seconds,
                latency_run.worker_source_empty_seconds,
                latency_run.worker_back_pressured_seconds,
                latency_run.worker_checkpoint_seconds,
                latency_run.worker_on_cpu_seconds,
                latency_run.worker_waiting_for_cpu_seconds,
            ],
            events: summary.records_in,
        });
    }
    println!(
        "\nassay bench-kafka: {events} generated events, {partitions} partitions, {workers} worker(s), epoch_ms {}, config {}, broker {brokers}",
        epoch_ms.unwrap_or_default(),
        options.config.display()
    );
    println!(
        "{:<13} {:>10} {:>8} {:>11} {:>8} {:>8}   CPU s for the max-rate run (engine, broker) / latency run (bench producer+consumer)",
        "pipeline", "events/s", "vs pass", "at rate/s", "p50 ms", "p99 ms"
    );
    let baseline = |round: u32| {
        rows.iter()
            .find(|r| r.round == round && r.pipeline == "pass-through")
            .map(|r| r.events_per_second)
            .unwrap_or(f64::NAN)
    };
    for r in &rows {
        println!(
            "{:<13} {:>10.0} {:>8} {:>11.0} {:>8.1} {:>8.1}   engine {:.1}, broker {}, bench clients {:.1} ({} events)",
            r.label,
            r.events_per_second,
            percent_or_na(100.0 * r.events_per_second / baseline(r.round)),
            r.latency_run_rate,
            r.latencies.total.0,
            r.latencies.total.1,
            r.engine_cpu,
            if options.broker_pid.is_some() {
                format!("{:.1}", r.broker_cpu)
            } else {
                "n/a (pass --broker-pid)".into()
            },
            r.client_cpu,
            r.events
        );
    }
    println!("\nbusy while the latency run produced its records (share of one core):");
    for r in &rows {
        println!(
            "  {:<13} engine {:>5.0}%   broker {}",
            r.label,
            100.0 * r.engine_load,
            r.broker_load
                .map(|l| format!("{:>5.0}%", 100.0 * l))
                .unwrap_or_else(|| "n/a (pass --broker-pid)".into())
        );
    }
    println!(
        "\nthe engine's workers in the latency run (seconds, all workers): a slow source leaves them empty, a slow pipeline or sink back-pressures them"
    );
    for r in &rows {
        let [busy, empty, back_pressured, checkpoint, on_cpu, waiting] = r.engine_worker_time;
        println!(
            "  {:<13} busy {busy:>6.2}   source empty {empty:>6.2}   back-pressured {back_pressured:>6.2}   checkpoints {checkpoint:>6.2}   (on a core {on_cpu:>6.2}, waiting for a core {waiting:>6.2})",
            r.label
        );
    }
    println!(
        "\nthe slowest document per {TREND_BUCKET_MS} ms of the latency run (append -> readable, ms): flat is stalls, growing is a queue"
    );
    for r in &rows {
        let trend: Vec<String> = r.latencies.trend.iter().map(|ms| ms.to_string()).collect();
        println!("  {:<13} {}", r.label, trend.join(" "));
    }
    println!(
        "\nCPU per {TREND_BUCKET_MS} ms of the latency run (share of one core, %): at a steady rate, a growing share is more work per record as the run goes on"
    );
    let joined = |values: &[i64]| {
        values
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    for r in &rows {
        // the broker's lines are empty without --broker-pid, and left out
        let lines = [
            ("broker", &r.cpu_trend.broker, false),
            ("engine", &r.cpu_trend.engine, true),
            ("bench clients", &r.cpu_trend.bench_clients, true),
            ("broker alone", &r.broker_alone_cpu_trend.broker, false),
        ];
        for (component, values, always) in lines {
            if always || !values.is_empty() {
                println!("  {:<13} {component:<13} {}", r.label, joined(values));
            }
        }
    }
    println!(
        "\nwhere the latency goes (p50 / p99 ms): documents of an input record, split at the engine's send (output record timestamp);\n\
         the engine's own split of its input records at their read (append -> read) and their acknowledgement"
    );
    for r in &rows {
        println!(
            "  {:<13} append -> sent {:>7.1} / {:>7.1}   sent -> readable {:>6.1} / {:>6.1}   engine: append -> read {:>7.1} / {:>7.1}   read -> acknowledged {:>7.1} / {:>7.1}",
            r.label,
            r.latencies.until_sent.0,
            r.latencies.until_sent.1,
            r.latencies.after_sent.0,
            r.latencies.after_sent.1,
            r.engine_source_lag.0,
            r.engine_source_lag.1,
            r.engine_latency.0,
            r.engine_latency.1,
        );
    }
    println!(
        "\nthe broker alone at each latency run's rate and count (the bench's producer and reader, no engine):"
    );
    for r in &rows {
        println!(
            "  {:<13} at {:>7.0}/s   p50 {:>7.1} ms   p99 {:>7.1} ms",
            r.label, r.latency_run_rate, r.broker_alone.0, r.broker_alone.1
        );
    }
    if rounds > 1 {
        println!("\nmedians of {rounds} rounds:");
        for &(pipeline, _) in &pipelines {
            let of = |figure: &dyn Fn(&Row) -> f64| {
                median(
                    rows.iter()
                        .filter(|r| r.pipeline == pipeline)
                        .map(figure)
                        .collect(),
                )
            };
            println!(
                "  {:<13} {:>8.0} events/s {:>6} of pass-through   append -> readable p50 {:>7.1} ms p99 {:>7.1} ms   source lag p50 {:>7.1} ms p99 {:>7.1} ms",
                pipeline,
                of(&|r| r.events_per_second),
                percent_or_na(of(&|r| 100.0 * r.events_per_second / baseline(r.round))),
                of(&|r| r.latencies.total.0),
                of(&|r| r.latencies.total.1),
                of(&|r| r.engine_source_lag.0),
                of(&|r| r.engine_source_lag.1),
            );
        }
    }
    println!(
        "\nlatency: append to the input topic until readable from the output topic; {} on a shared 2-core machine",
        if rounds > 1 { "rounds" } else { "one run" }
    );
    Ok(())
}

/// A share in percent, or `n/a` when there was nothing to compare with (no
/// pass-through in the round: `--pipelines full`).
fn percent_or_na(share: f64) -> String {
    if share.is_finite() {
        format!("{share:.0}%")
    } else {
        "n/a".to_string()
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::{Options, engine_config, input_epoch_ms, latency_trend, median, percent_or_na};
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Command {
        #[command(flatten)]
        options: Options,
    }

    fn bound_topic(config: &assay::config::EnvConfig, name: &str) -> (String, Option<u32>) {
        match config.binding(name) {
            Some(assay::config::Binding::Kafka(binding)) => {
                (binding.topic.clone(), binding.partitions)
            }
            other => panic!("{name} is bound to {other:?}"),
        }
    }

    #[test]
    fn the_engine_config_is_the_shipped_one_with_the_benchs_topics_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kafka.toml");
        let shipped_config = assay::config::load(Some(&shipped), &[], None).unwrap();
        let as_shipped = Command::parse_from([
            "bench",
            "--config",
            shipped.to_str().unwrap(),
            "--workers",
            "3",
        ])
        .options;
        let path = engine_config(dir.path(), "127.0.0.1:1", "run7", 6, &as_shipped).unwrap();
        let config =
            assay::config::load(Some(&path), &[], None).unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(config.runtime.workers, 3);
        assert_eq!(config.kafka.bootstrap_servers, "127.0.0.1:1");
        assert_eq!(config.state.dir, dir.path().join("run7-state"));
        assert_eq!(
            bound_topic(&config, "listing_changes"),
            ("run7-in".into(), Some(6))
        );
        assert_eq!(
            bound_topic(&config, "search_documents"),
            ("run7-out".into(), Some(6))
        );
        assert_eq!(
            bound_topic(&config, "dead_letters"),
            ("run7-dead".into(), Some(6))
        );
        assert_eq!(
            bound_topic(&config, "market_statistics").0,
            "run7-statistics"
        );
        // what the bench does not set comes from the file
        assert_eq!(
            config.runtime.market_window_epochs,
            shipped_config.runtime.market_window_epochs
        );
        assert_eq!(
            config.runtime.market_window_phases,
            shipped_config.runtime.market_window_phases
        );
        assert_eq!(
            config.runtime.max_epochs_in_flight,
            shipped_config.runtime.max_epochs_in_flight
        );
        let shipped_epoch_ms = match shipped_config.binding("listing_changes") {
            Some(assay::config::Binding::Kafka(binding)) => binding.epoch_ms,
            other => panic!("{other:?}"),
        };
        assert_eq!(input_epoch_ms(&path).unwrap(), shipped_epoch_ms);
        match config.binding("search_documents") {
            Some(assay::config::Binding::Kafka(binding)) => {
                assert_eq!(
                    binding
                        .properties
                        .get("compression.type")
                        .map(String::as_str),
                    Some("lz4")
                )
            }
            other => panic!("{other:?}"),
        }

        let overridden = Command::parse_from([
            "bench",
            "--config",
            shipped.to_str().unwrap(),
            "--epoch-ms",
            "7",
            "--market-window-epochs",
            "3",
            "--max-epochs-in-flight",
            "9",
            "--fetch-wait-ms",
            "4",
        ])
        .options;
        let path = engine_config(dir.path(), "127.0.0.1:1", "run8", 4, &overridden).unwrap();
        let config =
            assay::config::load(Some(&path), &[], None).unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(config.runtime.market_window_epochs, 3);
        // shipped groups that do not fit a window of 3 are lowered to it
        assert_eq!(
            config.runtime.market_window_phases,
            shipped_config.runtime.market_window_phases.min(3)
        );
        assert_eq!(config.runtime.max_epochs_in_flight, 9);
        assert_eq!(input_epoch_ms(&path).unwrap(), 7);
        match config.binding("listing_changes") {
            Some(assay::config::Binding::Kafka(binding)) => {
                assert_eq!(binding.epoch_ms, 7);
                assert_eq!(
                    binding
                        .properties
                        .get("fetch.wait.max.ms")
                        .map(String::as_str),
                    Some("4")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn latency_trend_is_the_slowest_per_bucket_of_append_time() {
        let over_time = [
            (1_000, 40),
            (1_100, 70),
            (1_600, 30),
            (2_700, 90),
            (2_999, 95),
        ];
        // buckets of 500 ms from the first append: [1000, 1500), [1500, 2000), ..., [2500, 3000)
        assert_eq!(latency_trend(&over_time), vec![70, 30, 0, 95]);
        assert!(latency_trend(&[]).is_empty());
    }

    #[test]
    fn a_share_without_a_baseline_reads_n_a() {
        assert_eq!(percent_or_na(53.4), "53%");
        assert_eq!(percent_or_na(f64::NAN), "n/a");
        assert_eq!(percent_or_na(100.0 * 180_000.0 / f64::NAN), "n/a");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}
