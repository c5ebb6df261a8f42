//! Kafka (rdkafka): source, sink, topic checks and the people tools
//! (`assay produce`, `assay tail`).
//!
//! Every binding's `properties` are passed to librdkafka as they are, after
//! assay's own settings, so an operator can override anything.

pub mod sink;
pub mod source;
pub mod tools;

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::{KafkaBinding, KafkaConfig};

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error(
        "cannot reach Kafka at {brokers} within {timeout_ms} ms: {detail}\n  hint: is the broker running? check kafka.bootstrap_servers (or ASSAY_KAFKA__BOOTSTRAP_SERVERS) and kafka.connect_timeout_ms"
    )]
    Unreachable {
        brokers: String,
        timeout_ms: u64,
        detail: String,
    },
    #[error(
        "topic `{topic}` does not exist on {brokers}\n  hint: create it, or set create_topic = true in its binding"
    )]
    MissingTopic { topic: String, brokers: String },
    #[error(
        "topic `{topic}` has {actual} partitions but its binding expects {expected}\n  hint: partitions are part of the state key; fix the binding's `partitions` or use the right topic"
    )]
    PartitionCount {
        topic: String,
        actual: u32,
        expected: u32,
    },
    #[error("cannot create topic `{topic}`: {detail}")]
    Create { topic: String, detail: String },
    #[error("Kafka client error: {0}")]
    Client(String),
}

/// The client config for a binding: brokers, then the binding's properties.
pub fn client_config(kafka: &KafkaConfig, binding: &KafkaBinding) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", &kafka.bootstrap_servers);
    for (key, value) in &binding.properties {
        config.set(key, value);
    }
    config
}

/// Checks that the binding's topic exists with the expected partition count,
/// creating it when the binding says so. Returns the partition count. Fails
/// with a clear message when no broker answers within the connect timeout.
pub fn ensure_topic(kafka: &KafkaConfig, binding: &KafkaBinding) -> Result<u32, KafkaSetupError> {
    let brokers = kafka.bootstrap_servers.clone();
    let timeout = Duration::from_millis(kafka.connect_timeout_ms);
    let consumer: BaseConsumer = client_config(kafka, binding)
        .set("group.id", "assay-metadata")
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| KafkaSetupError::Client(e.to_string()))?;
    let partitions = |consumer: &BaseConsumer| -> Result<Option<u32>, KafkaSetupError> {
        let metadata = consumer
            .fetch_metadata(Some(&binding.topic), timeout)
            .map_err(|e| KafkaSetupError::Unreachable {
                brokers: brokers.clone(),
                timeout_ms: kafka.connect_timeout_ms,
                detail: e.to_string(),
            })?;
        Ok(metadata
            .topics()
            .iter()
            .find(|t| {
                t.name() == binding.topic && t.error().is_none() && !t.partitions().is_empty()
            })
            .map(|t| t.partitions().len() as u32))
    };
    let count = match partitions(&consumer)? {
        Some(count) => count,
        None if binding.create_topic => {
            let admin: AdminClient<DefaultClientContext> =
                client_config(kafka, binding)
                    .create()
                    .map_err(|e| KafkaSetupError::Client(e.to_string()))?;
            let wanted = binding.partitions.unwrap_or(1);
            let topic = NewTopic::new(&binding.topic, wanted as i32, TopicReplication::Fixed(1));
            let options = AdminOptions::new().operation_timeout(Some(timeout));
            let results = futures_executor::block_on(admin.create_topics(&[topic], &options))
                .map_err(|e| KafkaSetupError::Create {
                    topic: binding.topic.clone(),
                    detail: e.to_string(),
                })?;
            for result in results {
                if let Err((_, code)) = result
                    && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
                {
                    return Err(KafkaSetupError::Create {
                        topic: binding.topic.clone(),
                        detail: code.to_string(),
                    });
                }
            }
            // metadata can lag creation by a moment
            let deadline = std::time::Instant::now() + timeout;
            loop {
                if let Some(count) = partitions(&consumer)? {
                    break count;
                }
                if std::time::Instant::now() > deadline {
                    return Err(KafkaSetupError::Create {
                        topic: binding.topic.clone(),
                        detail: "created, but not visible in metadata".into(),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        None => {
            return Err(KafkaSetupError::MissingTopic {
                topic: binding.topic.clone(),
                brokers,
            });
        }
    };
    if let Some(expected) = binding.partitions
        && expected != count
    {
        return Err(KafkaSetupError::PartitionCount {
            topic: binding.topic.clone(),
            actual: count,
            expected,
        });
    }
    Ok(count)
}
