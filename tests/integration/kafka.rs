//! Kafka in, Kafka out, against a real broker (tansu on loopback).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::broker::Broker;
use crate::common::*;
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

struct KafkaTestConfig {
    path: PathBuf,
}

/// The shipped Kafka config, `config/kafka.toml`: the tests run with its
/// epoch length and market window, read from the file so that they follow it.
fn shipped_kafka_config() -> assay::config::EnvConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/kafka.toml");
    assay::config::load(Some(&path), &[], None)
        .unwrap_or_else(|d| panic!("config/kafka.toml: {d:?}"))
}

/// `runtime.market_window_epochs` as `config/kafka.toml` ships it (with its
/// `market_window_phases`, `phases_for`). The poison
/// test runs with 1: it checks exact document counts, and its few records
/// would otherwise also be re-emitted when their window ends.
fn shipped_market_window() -> u64 {
    shipped_kafka_config().runtime.market_window_epochs
}

/// `runtime.market_window_phases` as `config/kafka.toml` ships it, for the
/// tests that run its window (with a window of 1 there is one phase).
fn phases_for(window: u64) -> u64 {
    let shipped = shipped_kafka_config().runtime;
    if window == shipped.market_window_epochs {
        shipped.market_window_phases
    } else {
        1
    }
}

/// `runtime.market_evaluations_per_epoch_and_partition` for the tests that
/// run the shipped window: 5 (`config/kafka.toml` sets none; 100 would never
/// be reached by the sample's few re-evaluations per window end). So
/// listings wait in the queue across clock-driven epochs, checkpoints and the
/// `kill -9`, and the input's end takes the rest.
fn limit_for(window: u64) -> u64 {
    if window == shipped_market_window() && window > 1 {
        5
    } else {
        0
    }
}

/// The input binding's `epoch_ms` as `config/kafka.toml` ships it.
fn shipped_epoch_ms() -> u64 {
    match shipped_kafka_config().binding("listing_changes") {
        Some(assay::config::Binding::Kafka(binding)) => binding.epoch_ms,
        other => panic!("config/kafka.toml binds listing_changes to {other:?}"),
    }
}

fn kafka_config(
    dir: &Path,
    brokers: &str,
    workers: usize,
    input_partitions: u32,
    idle_ms: u64,
    window: u64,
) -> KafkaTestConfig {
    let text = format!(
        r#"[runtime]
workers = {workers}
epoch_records = 512
checkpoint_interval_ms = 100
market_window_epochs = {window}
market_window_phases = {phases}
market_evaluations_per_epoch_and_partition = {limit}
progress = "never"

[state]
dir = {state:?}

[kafka]
bootstrap_servers = "{brokers}"
connect_timeout_ms = 10000

[bindings.listing_changes]
type = "kafka"
topic = "listing_changes"
partitions = {input_partitions}
create_topic = true
stop_when_idle_ms = {idle_ms}
epoch_ms = {epoch_ms}

[bindings.search_documents]
type = "kafka"
topic = "search_documents"
partitions = 4
create_topic = true

[bindings.dead_letters]
type = "kafka"
topic = "dead_letters"
partitions = 1
create_topic = true
"#,
        state = dir.join("state"),
        epoch_ms = shipped_epoch_ms(),
        phases = phases_for(window),
        limit = limit_for(window),
    );
    let path = dir.join("kafka.toml");
    std::fs::write(&path, text).unwrap();
    KafkaTestConfig { path }
}

fn create_topic(brokers: &str, topic: &str, partitions: u32) {
    let kafka = assay::config::KafkaConfig {
        bootstrap_servers: brokers.into(),
        ..Default::default()
    };
    let binding = assay::config::KafkaBinding {
        topic: topic.into(),
        partitions: Some(partitions),
        create_topic: true,
        properties: Default::default(),
        epoch_ms: 5,
        stop_when_idle_ms: 0,
    };
    assay::connectors::kafka::ensure_topic(&kafka, &binding)
        .unwrap_or_else(|e| panic!("create {topic}: {e}"));
}

fn producer(brokers: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

fn produce_lines(
    producer: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    lines: &[Vec<u8>],
) {
    for line in lines {
        let key = assay::connectors::file::source::find_top_level_key(line, b"\"listing_id\"")
            .map(<[u8]>::to_vec);
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(line);
        record.key = key.as_deref();
        let mut record = record;
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, returned)) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

fn sample_lines() -> Vec<Vec<u8>> {
    std::fs::read(sample_stream())
        .unwrap()
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

/// (key, version, value) of every record in a topic.
fn read_topic(brokers: &str, topic: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    assay::connectors::kafka::tools::tail(
        brokers,
        topic,
        true,
        None,
        Duration::from_secs(3),
        &mut out,
    )
    .unwrap();
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The documents as (key, version, document JSON) from the topic.
fn documents_from_topic(records: &[serde_json::Value]) -> Vec<(String, u64, String)> {
    records
        .iter()
        .map(|r| {
            (
                r["key"].as_str().unwrap().to_string(),
                r["headers"]["assay.version"]
                    .as_str()
                    .unwrap()
                    .parse()
                    .unwrap(),
                r["value"].to_string(),
            )
        })
        .collect()
}

/// The documents of a file run in the same form.
fn documents_from_file(path: &Path) -> Vec<(String, u64, String)> {
    read_lines(path)
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["key"].as_str().unwrap().to_string(),
                v["version"].as_u64().unwrap(),
                v["doc"].to_string(),
            )
        })
        .collect()
}

fn file_run_documents(dir: &Path) -> (Vec<(String, u64, String)>, TestConfig) {
    let config = write_config(dir, &sample_stream(), 1, 512, "");
    run_in_process(&listings_topology(), &config, true);
    (documents_from_file(&config.documents), config)
}

fn run_kafka(config: &KafkaTestConfig) -> assay::observe::RunSummary {
    let prepared = assay::prepare(&listings_topology(), Some(&config.path), &[])
        .unwrap_or_else(|e| panic!("{e}"));
    let options = assay::dataflow::RunOptions {
        from_scratch: false,
        progress: Some(false),
        pass_through: false,
    };
    assay::dataflow::run(prepared.plan, &prepared.config, prepared.models, &options)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// What a search index holding external versions ends with: per listing, the
/// first document of the highest version (an equal version is rejected), as
/// (listing version, document). The revision part of the version is left out:
/// how many market re-emissions happened depends on where epochs fell.
fn indexed(documents: &[(String, u64, String)]) -> BTreeMap<String, (u64, String)> {
    let mut index: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for (key, version, body) in documents {
        match index.get(key) {
            Some((held, _)) if held >= version => {}
            _ => {
                index.insert(key.clone(), (*version, body.clone()));
            }
        }
    }
    index
        .into_iter()
        .map(|(key, (version, body))| (key, (version >> 32, body)))
        .collect()
}

/// The first listing whose indexed document differs, if any.
fn first_difference(
    got: &BTreeMap<String, (u64, String)>,
    want: &BTreeMap<String, (u64, String)>,
) -> Option<String> {
    let keys: BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    keys.into_iter()
        .find(|k| got.get(*k) != want.get(*k))
        .map(|k| format!("{k}:\n  got  {:?}\n  want {:?}", got.get(k), want.get(k)))
}

fn sorted<T: Ord + Clone>(items: &[T]) -> Vec<T> {
    let mut items = items.to_vec();
    items.sort();
    items
}

/// At-least-once with versioned output: per listing, first occurrences have
/// increasing versions, and a repeated version repeats the same document.
fn assert_versions_monotone_and_duplicates_identical(documents: &[(String, u64, String)]) {
    let mut seen: BTreeMap<&str, BTreeMap<u64, &str>> = BTreeMap::new();
    let mut highest: BTreeMap<&str, u64> = BTreeMap::new();
    for (key, version, body) in documents {
        let versions = seen.entry(key).or_default();
        match versions.get(version) {
            Some(earlier) => assert_eq!(
                earlier, body,
                "listing {key} version {version} was emitted twice with different content"
            ),
            None => {
                let top = highest.entry(key).or_insert(0);
                assert!(
                    *version > *top,
                    "listing {key}: new version {version} after {top}"
                );
                *top = *version;
                versions.insert(*version, body);
            }
        }
    }
}

#[test]
fn the_sample_through_kafka_on_four_partitions_and_two_workers_equals_the_file_run() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::memory(dir.path());
    let brokers = broker.address();
    create_topic(&brokers, "listing_changes", 4);
    let produced_from = std::time::Instant::now();
    produce_lines(&producer(&brokers), "listing_changes", &sample_lines());

    let config = kafka_config(dir.path(), &brokers, 2, 4, 2000, shipped_market_window());
    let summary = run_kafka(&config);
    assert!(summary.reconciled, "{summary:?}");
    assert_eq!(summary.records_in, sample_lines().len() as u64);
    // with the limit the tests set, neighbours waited in the queue for later
    // epochs (and the input's end took the rest: the index below is complete)
    if limit_for(shipped_market_window()) > 0 {
        assert!(summary.market_waited > 0, "{summary:?}");
    }
    // every record was appended after `produced_from` and read before now: its
    // source lag is at most that long (histogram buckets round up by < 2%)
    let (lag_p50, lag_p99) = (
        summary
            .source_lag_p50_ms
            .expect("a Kafka source reports its lag"),
        summary
            .source_lag_p99_ms
            .expect("a Kafka source reports its lag"),
    );
    let at_most = produced_from.elapsed().as_secs_f64() * 1e3 * 1.02 + 1.0;
    assert!(
        lag_p50 <= lag_p99 && lag_p99 <= at_most && lag_p50 >= 0.0,
        "source lag p50 {lag_p50} ms, p99 {lag_p99} ms, appended at most {at_most} ms ago"
    );

    let file_dir = tempfile::tempdir().unwrap();
    let (expected, file_config) = file_run_documents(file_dir.path());
    let documents = documents_from_topic(&read_topic(&brokers, "search_documents"));
    // Kafka epochs follow the clock, so which market re-emissions happen
    // differs from the file run; what the index ends with does not
    let difference = first_difference(&indexed(&documents), &indexed(&expected));
    assert!(
        difference.is_none(),
        "the Kafka run leaves the index differently from the file run: {}",
        difference.unwrap()
    );
    assert_eq!(
        summary.documents_emitted,
        documents.len() as u64,
        "every document counted reached the topic, once"
    );
    // each listing's updates left in order (one listing lives in one output partition)
    assert_versions_monotone_and_duplicates_identical(&documents);

    let dead = read_topic(&brokers, "dead_letters");
    let mut reasons: Vec<String> = dead
        .iter()
        .map(|r| r["headers"]["assay.reason"].as_str().unwrap().to_string())
        .collect();
    let mut expected_reasons: Vec<String> = read_lines(&file_config.dead_letters)
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["reason"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    reasons.sort();
    expected_reasons.sort();
    assert_eq!(reasons, expected_reasons);
}

#[test]
fn poison_records_go_to_the_dead_letter_topic_and_the_partition_keeps_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::memory(dir.path());
    let brokers = broker.address();
    create_topic(&brokers, "listing_changes", 1);
    let lines: Vec<Vec<u8>> = vec![
        br#"{"kind":"create","listing_id":"a","version":1,"event_time":1640995200,"price":20000,"model":"c-class","year":2015}"#.to_vec(),
        br#"{"kind":"create","listing_id":"a","version":2,"event_ti"#.to_vec(),
        vec![0xff, 0x00, 0xfe],
        br#"{"kind":"create","listing_id":"b","version":1,"event_time":1640995200,"price":0,"model":"c-class","year":2015}"#.to_vec(),
        br#"{"kind":"price_change","listing_id":"a","version":3,"event_time":1640995300,"price":19000}"#.to_vec(),
        br#"{"kind":"create","listing_id":"c","version":1,"event_time":1640995400,"price":30000,"model":"e-class","year":2018}"#.to_vec(),
    ];
    produce_lines(&producer(&brokers), "listing_changes", &lines);
    let summary = run_kafka(&kafka_config(dir.path(), &brokers, 1, 1, 1500, 1));
    assert!(summary.reconciled);
    assert_eq!(
        (summary.upserts, summary.dead_letters),
        (3, 3),
        "{summary:?}"
    );

    let dead = read_topic(&brokers, "dead_letters");
    let reasons: Vec<&str> = dead
        .iter()
        .map(|r| r["headers"]["assay.reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, vec!["invalid_json", "not_utf8", "out_of_range"]);
    let offsets: Vec<&str> = dead
        .iter()
        .map(|r| r["headers"]["assay.source.offset"].as_str().unwrap())
        .collect();
    assert_eq!(offsets, vec!["1", "2", "3"]);
    assert_eq!(
        dead[0]["value"].as_str().unwrap().as_bytes(),
        &lines[1][..],
        "original bytes are kept"
    );
    let documents = documents_from_topic(&read_topic(&brokers, "search_documents"));
    let keys: Vec<(&str, u64)> = documents
        .iter()
        .map(|(k, v, _)| (k.as_str(), *v >> 32))
        .collect();
    assert_eq!(sorted(&keys), vec![("a", 1), ("a", 3), ("c", 1)]);
    // version = listing version << 32 | incarnation << 16 | market re-emissions:
    // the store's first start, and no market re-emission
    assert!(
        documents.iter().all(|(_, v, _)| v & 0xFFFF_FFFF == 1 << 16),
        "{documents:?}"
    );
}

/// Records in a topic, roughly: the sum of its partitions' high watermarks
/// (tansu's can lag what a consumer reads; used only to see progress).
fn topic_count(brokers: &str, topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "assay-test-count")
        .create()
        .unwrap();
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) else {
        return 0;
    };
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    (0..partitions as i32)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .map(|(_, high)| high.max(0) as usize)
                .unwrap_or(0)
        })
        .sum()
}

/// The sum over `partitions` of `group`'s committed offsets in `topic` (the
/// records it has consumed, when it started at 0).
fn committed_offsets(brokers: &str, group: &str, topic: &str, partitions: i32) -> u64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut list = rdkafka::TopicPartitionList::new();
    for partition in 0..partitions {
        list.add_partition(topic, partition);
    }
    let Ok(committed) = consumer.committed_offsets(list, Duration::from_secs(5)) else {
        return 0;
    };
    committed
        .elements()
        .iter()
        .map(|element| match element.offset() {
            rdkafka::Offset::Offset(offset) => offset.max(0) as u64,
            _ => 0,
        })
        .sum()
}

#[test]
fn engine_killed_mid_stream_and_restarted_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::memory(dir.path());
    let brokers = broker.address();
    create_topic(&brokers, "listing_changes", 4);
    let config = kafka_config(dir.path(), &brokers, 2, 4, 3000, shipped_market_window());
    let lines = sample_lines();

    // the engine runs while the changes arrive; it is killed half way
    let mut engine = spawn_engine(assay_command(), &config.path);
    let producer = producer(&brokers);
    let chunks: Vec<&[Vec<u8>]> = lines.chunks(2000).collect();
    for (index, chunk) in chunks.iter().enumerate() {
        produce_lines(&producer, "listing_changes", chunk);
        if index == chunks.len() / 2 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while topic_count(&brokers, "search_documents") < 3000 {
                assert!(Instant::now() < deadline, "no output before the kill");
            }
            engine.kill(); // SIGKILL
        }
    }
    let status = run_engine(assay_command(), &config.path);
    assert!(status.success());

    let file_dir = tempfile::tempdir().unwrap();
    let (expected, _) = file_run_documents(file_dir.path());
    let documents = documents_from_topic(&read_topic(&brokers, "search_documents"));
    let difference = first_difference(&indexed(&documents), &indexed(&expected));
    if let Some(difference) = difference {
        let input = read_topic(&brokers, "listing_changes").len();
        panic!(
            "the crash changed what the index ends with ({} documents read, input topic has {input} records): {difference}",
            documents.len()
        );
    }
}

/// With the re-evaluation limit at 1 per tick and partition, a window end
/// leaves hundreds of neighbours waiting, so every checkpoint stores a long
/// queue. After a clean run of the first half, the engine reads the second
/// half and dies right after its fifth durable checkpoint (the test hook:
/// no destructor, no flush); the restart puts the queue back, the input's
/// end takes the rest, and the index ends as the file run's. A listing left
/// out of the stored queue would keep the document of before its move.
#[test]
fn waiting_re_evaluations_survive_a_kill_right_after_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::memory(dir.path());
    let brokers = broker.address();
    create_topic(&brokers, "listing_changes", 4);
    let lines = sample_lines();
    let (first_half, second_half) = lines.split_at(lines.len() / 2);
    produce_lines(&producer(&brokers), "listing_changes", first_half);
    let window = shipped_market_window();
    let config = kafka_config(dir.path(), &brokers, 2, 4, 2000, window);
    let text = std::fs::read_to_string(&config.path).unwrap().replace(
        &format!(
            "market_evaluations_per_epoch_and_partition = {}\n",
            limit_for(window)
        ),
        "market_evaluations_per_epoch_and_partition = 1\n",
    );
    assert!(text.contains("market_evaluations_per_epoch_and_partition = 1\n"));
    std::fs::write(&config.path, text).unwrap();

    // A clean end first: the stored market views are then trusted at the
    // next start, so the restart below does not re-evaluate every listing
    // whose view lags (its rebuild would mend a lost queue by itself).
    let summary = run_kafka(&config);
    assert_eq!(summary.records_in, first_half.len() as u64);
    produce_lines(&producer(&brokers), "listing_changes", second_half);
    // (the first checkpoints of a start can come before its first fetch)
    let mut command = assay_command();
    command.env("ASSAY_TEST_KILL_AFTER_CHECKPOINTS", "5");
    let status = run_engine(command, &config.path);
    assert!(!status.success(), "the run was to die after 5 checkpoints");
    let summary = run_kafka(&config);
    assert!(summary.reconciled, "{summary:?}");
    assert!(
        summary.records_in < second_half.len() as u64,
        "the killed run checkpointed none of the second half"
    );
    assert!(summary.market_waited > 0, "{summary:?}");

    let file_dir = tempfile::tempdir().unwrap();
    let (expected, _) = file_run_documents(file_dir.path());
    let documents = documents_from_topic(&read_topic(&brokers, "search_documents"));
    if let Some(difference) = first_difference(&indexed(&documents), &indexed(&expected)) {
        panic!("the kill changed what the index ends with: {difference}");
    }
}

/// The broker stops answering mid-stream for several seconds, then comes
/// back: the engine waits (back-pressure, retries), loses nothing, and
/// finishes by itself.
///
/// The issue asks for a stop and restart on a durable store. With tansu 0.6.0
/// that loses the broker's own data: after a `kill -9` under load, its SQLite
/// store served 1,018 of 4,000 records of a topic (and SIGTERM does not stop
/// it). A frozen broker (SIGSTOP, then SIGCONT) is the outage this broker can
/// survive, so that is what this test injects.
#[test]
fn broker_lost_mid_stream_the_engine_waits_and_resumes_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::memory(dir.path());
    let brokers = broker.address();
    create_topic(&brokers, "listing_changes", 4);
    produce_lines(&producer(&brokers), "listing_changes", &sample_lines());
    let config = kafka_config(dir.path(), &brokers, 2, 4, 15000, shipped_market_window());
    let mut engine = spawn_engine(assay_command(), &config.path);
    let deadline = Instant::now() + Duration::from_secs(60);
    while topic_count(&brokers, "search_documents") < 2000 {
        assert!(Instant::now() < deadline, "no output before the outage");
        assert!(
            engine.0.try_wait().unwrap().is_none(),
            "the engine stopped early"
        );
    }
    broker.pause();
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        engine.0.try_wait().unwrap().is_none(),
        "the engine gave up during the outage"
    );
    broker.resume();
    let status = engine.0.wait().unwrap();
    let stderr = std::io::read_to_string(engine.0.stderr.take().unwrap()).unwrap();
    assert!(status.success(), "{stderr}");

    let file_dir = tempfile::tempdir().unwrap();
    let (expected, _) = file_run_documents(file_dir.path());
    let documents = documents_from_topic(&read_topic(&brokers, "search_documents"));
    let difference = first_difference(&indexed(&documents), &indexed(&expected));
    assert!(
        difference.is_none(),
        "the outage changed what the index ends with: {}",
        difference.unwrap()
    );
    assert_versions_monotone_and_duplicates_identical(&documents);
}

#[test]
fn unreachable_broker_at_start_is_a_clear_error_after_the_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let config = kafka_config(dir.path(), &format!("127.0.0.1:{port}"), 1, 1, 1000, 1);
    let text = std::fs::read_to_string(&config.path)
        .unwrap()
        .replace("connect_timeout_ms = 10000", "connect_timeout_ms = 1500");
    std::fs::write(&config.path, text).unwrap();
    let started = Instant::now();
    let output = assay_command()
        .args(["run", "topologies/listings.toml", "--config"])
        .arg(&config.path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("cannot reach Kafka"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

/// Epochs that fill up before their tick ends (a backlog) run ahead of the
/// clock. Neither the checkpoint after the backlog nor the first record after
/// it may wait for the clock to catch up with them: both used to, as long as
/// the backlog had run ahead (here about 100 ticks of 1 s), and the last
/// records of a burst did too.
#[test]
fn after_a_backlog_a_new_record_is_not_held_and_positions_are_committed_without_waiting_for_the_clock()
 {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::memory(dir.path());
    let brokers = broker.address();
    create_topic(&brokers, "listing_changes", 2);
    let producer = producer(&brokers);
    // 8 records per epoch and worker, ticks of 1 s: 1,600 records are about
    // 100 epochs per worker, read in a few seconds. (The new record alone must
    // not fill an epoch: a full epoch closes at once.)
    let backlog: Vec<Vec<u8>> = sample_lines().into_iter().take(1600).collect();
    produce_lines(&producer, "listing_changes", &backlog);
    let config = kafka_config(dir.path(), &brokers, 2, 2, 600_000, 1);
    let text = std::fs::read_to_string(&config.path).unwrap();
    let text = text
        .replacen("epoch_records = 512", "epoch_records = 8", 1)
        .replacen(
            &format!("epoch_ms = {}", shipped_epoch_ms()),
            "epoch_ms = 1000",
            1,
        );
    assert!(text.contains("epoch_records = 8") && text.contains("epoch_ms = 1000"));
    std::fs::write(&config.path, text).unwrap();
    let _engine = spawn_engine(assay_command(), &config.path);

    // the backlog is through once the output stops growing
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = topic_count(&brokers, "search_documents");
        if now > 0 && now == seen {
            break;
        }
        seen = now;
        assert!(
            Instant::now() < deadline,
            "the backlog is still not through"
        );
    }

    // the positions are checkpointed and committed to the consumer group
    // while the engine idles, not only once the clock reaches the epochs the
    // backlog ran ahead to (about 100 ticks of 1 s here)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let committed = committed_offsets(&brokers, "assay-listings", "listing_changes", 2);
        if committed == backlog.len() as u64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group's committed offsets cover {committed} of {} records after the backlog",
            backlog.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let late = br#"{"kind":"create","listing_id":"late-1","version":1,"event_time":1700000000,"price":20000,"model":"c-class","year":2015}"#.to_vec();
    let produced_at = Instant::now();
    produce_lines(&producer, "listing_changes", &[late]);
    let deadline = produced_at + Duration::from_secs(30);
    loop {
        let documents = documents_from_topic(&read_topic(&brokers, "search_documents"));
        if documents.iter().any(|(key, _, _)| key == "late-1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new record's document is not out {:?} after it was produced ({} documents out)",
            produced_at.elapsed(),
            documents.len()
        );
    }
}
