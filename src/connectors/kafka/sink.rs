//! Kafka sink: documents keyed by listing id (tombstone = null value), dead
//! letters with their reason in headers. Idempotent producer, `acks=all`.
//!
//! # Delivery
//! The ordered sink stage hands over one completed epoch at a time; `flush`
//! waits until librdkafka has delivered every record of it. Only then is the
//! epoch released, so a checkpoint never covers an undelivered document. While
//! the broker is away, librdkafka retries (`message.timeout.ms`, default here
//! 0 = forever) and the flush waits: back-pressure reaches the source through
//! the epochs in flight. A delivery that fails for good is an error, never a
//! silent drop.
//!
//! Within a partition, idempotence keeps order across retries, so one
//! listing's updates never overtake each other.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};

use super::client_config;
use crate::config::{KafkaBinding, KafkaConfig};
use crate::record::{DeadLetter, OutputDocument};

/// Collects delivery failures reported by librdkafka's callback thread.
#[derive(Clone, Default)]
pub struct DeliveryErrors(Arc<Mutex<Vec<String>>>);

impl ClientContext for DeliveryErrors {}

impl ProducerContext for DeliveryErrors {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).to_string())
                .unwrap_or_default();
            self.0
                .lock()
                .unwrap()
                .push(format!("{error} (key {key:?}, topic {})", message.topic()));
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("kafka sink `{topic}`: {detail}")]
pub struct KafkaSinkError {
    pub topic: String,
    pub detail: String,
}

pub struct KafkaSink {
    producer: ThreadedProducer<DeliveryErrors>,
    errors: DeliveryErrors,
    topic: String,
    source_topic: String,
    model_headers: Vec<(String, String)>,
}

impl KafkaSink {
    /// `source_topic` and `model_versions` are stamped on every record's headers.
    pub fn open(
        kafka: &KafkaConfig,
        binding: &KafkaBinding,
        source_topic: &str,
        model_versions: Vec<(String, String)>,
    ) -> Result<KafkaSink, KafkaSinkError> {
        let mut config = client_config(kafka, binding);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "0");
        for (key, value) in &binding.properties {
            config.set(key, value);
        }
        let errors = DeliveryErrors::default();
        let producer: ThreadedProducer<DeliveryErrors> = config
            .create_with_context(errors.clone())
            .map_err(|e| KafkaSinkError {
                topic: binding.topic.clone(),
                detail: e.to_string(),
            })?;
        let model_headers = model_versions
            .into_iter()
            .map(|(name, version)| (format!("assay.model.{name}"), version))
            .collect();
        Ok(KafkaSink {
            producer,
            errors,
            topic: binding.topic.clone(),
            source_topic: source_topic.to_string(),
            model_headers,
        })
    }

    fn send(
        &self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<(), KafkaSinkError> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&self.topic).headers(headers);
        record.key = key;
        record.payload = payload;
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    // the local queue is full (e.g. the broker is away): wait, do not drop
                    record = returned;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((error, _)) => {
                    return Err(KafkaSinkError {
                        topic: self.topic.clone(),
                        detail: error.to_string(),
                    });
                }
            }
        }
    }

    pub fn write_document(&mut self, document: &OutputDocument) -> Result<(), KafkaSinkError> {
        let version = document.version.to_string();
        let partition = document.position.partition.to_string();
        let offset = document.position.offset.to_string();
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "assay.version",
                value: Some(version.as_str()),
            })
            .insert(Header {
                key: "assay.source.topic",
                value: Some(self.source_topic.as_str()),
            })
            .insert(Header {
                key: "assay.source.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "assay.source.offset",
                value: Some(offset.as_str()),
            });
        if document.position.timestamp_ms > 0 {
            let timestamp = document.position.timestamp_ms.to_string();
            headers = headers.insert(Header {
                key: "assay.source.timestamp",
                value: Some(timestamp.as_str()),
            });
        }
        if document.body.is_some() {
            for (key, value) in &self.model_headers {
                headers = headers.insert(Header {
                    key: key.as_str(),
                    value: Some(value.as_str()),
                });
            }
        }
        self.send(
            Some(document.key.as_bytes()),
            document.body.as_deref().map(str::as_bytes),
            headers,
        )
    }

    pub fn write_dead_letter(&mut self, letter: &DeadLetter) -> Result<(), KafkaSinkError> {
        let partition = letter.position.partition.to_string();
        let offset = letter.position.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "assay.reason",
                value: Some(letter.reason.as_str()),
            })
            .insert(Header {
                key: "assay.stage",
                value: Some(letter.stage.as_str()),
            })
            .insert(Header {
                key: "assay.detail",
                value: Some(letter.detail.as_str()),
            })
            .insert(Header {
                key: "assay.source.topic",
                value: Some(self.source_topic.as_str()),
            })
            .insert(Header {
                key: "assay.source.partition",
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: "assay.source.offset",
                value: Some(offset.as_str()),
            });
        self.send(None, Some(&letter.bytes), headers)
    }

    /// Waits until every record sent so far is delivered; a failed delivery is an error.
    pub fn flush(&mut self) -> Result<(), KafkaSinkError> {
        loop {
            match self.producer.flush(Duration::from_secs(5)) {
                Ok(()) => break,
                Err(KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut)) => {
                    eprintln!(
                        "warning: kafka sink `{}`: {} record(s) not yet delivered, still trying",
                        self.topic,
                        self.producer.in_flight_count()
                    );
                }
                Err(error) => {
                    return Err(KafkaSinkError {
                        topic: self.topic.clone(),
                        detail: error.to_string(),
                    });
                }
            }
        }
        let mut errors = self.errors.0.lock().unwrap();
        if !errors.is_empty() {
            let detail = format!(
                "{} record(s) could not be delivered; first: {}",
                errors.len(),
                errors[0]
            );
            errors.clear();
            return Err(KafkaSinkError {
                topic: self.topic.clone(),
                detail,
            });
        }
        Ok(())
    }
}
