//! Tools for people: produce a JSONL file into a topic, tail a topic.

use std::io::{BufRead, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::connectors::file::source::find_top_level_key;

/// Produces every line of `file` to `topic`, keyed by the line's top-level
/// `key_field` so that one listing's events share a partition and keep their
/// order. Returns the number of records.
pub fn produce_file(
    brokers: &str,
    topic: &str,
    file: &Path,
    key_field: &str,
) -> Result<u64, String> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create()
        .map_err(|e| e.to_string())?;
    let reader = std::io::BufReader::new(
        std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?,
    );
    let quoted_key = format!("\"{key_field}\"");
    let mut count = 0;
    for line in reader.split(b'\n') {
        let line = line.map_err(|e| e.to_string())?;
        if line.is_empty() {
            continue;
        }
        let key = find_top_level_key(&line, quoted_key.as_bytes()).map(<[u8]>::to_vec);
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).payload(&line);
        record.key = key.as_deref();
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    returned,
                )) => {
                    record = returned;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((error, _)) => return Err(error.to_string()),
            }
        }
        count += 1;
    }
    producer
        .flush(Duration::from_secs(60))
        .map_err(|e| e.to_string())?;
    Ok(count)
}

/// Prints a topic's records as JSON lines: partition, offset, key, headers, value.
/// Stops after `count` records or when nothing arrived for `idle`.
pub fn tail(
    brokers: &str,
    topic: &str,
    from_beginning: bool,
    count: Option<u64>,
    idle: Duration,
    out: &mut dyn Write,
) -> Result<u64, String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "assay-tail")
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let partitions = metadata
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0);
    if partitions == 0 {
        return Err(format!("topic `{topic}` does not exist"));
    }
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(
                topic,
                p as i32,
                if from_beginning {
                    Offset::Beginning
                } else {
                    Offset::End
                },
            )
            .map_err(|e| e.to_string())?;
    }
    consumer.assign(&assignment).map_err(|e| e.to_string())?;
    let mut seen = 0;
    let mut last = Instant::now();
    while count.map(|c| seen < c).unwrap_or(true) && last.elapsed() < idle {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                let headers: serde_json::Map<String, serde_json::Value> = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    serde_json::Value::String(
                                        h.value
                                            .map(|v| String::from_utf8_lossy(v).to_string())
                                            .unwrap_or_default(),
                                    ),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let value = message.payload().map(|p| {
                    serde_json::from_slice::<serde_json::Value>(p).unwrap_or_else(|_| {
                        serde_json::Value::String(String::from_utf8_lossy(p).to_string())
                    })
                });
                let line = serde_json::json!({
                    "partition": message.partition(),
                    "offset": message.offset(),
                    "key": message.key().map(|k| String::from_utf8_lossy(k).to_string()),
                    "headers": headers,
                    "value": value,
                });
                writeln!(out, "{line}").map_err(|e| e.to_string())?;
                seen += 1;
                last = Instant::now();
            }
            Some(Err(error)) => eprintln!("warning: {error}"),
            None => {}
        }
    }
    Ok(seen)
}
