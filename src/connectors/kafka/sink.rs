//! Kafka sink: documents keyed by listing id (tombstone = null value), dead
//! letters with their reason in headers. Idempotent producer, `acks=all`.
//!
//! # Delivery
//! The ordered sink stage hands over completed epochs and does not wait: each
//! record is sent with its epoch as the delivery opaque, and the
//! [`DeliveryTracker`] counts the records of each epoch not yet acknowledged.
//! A sink adds its records to the count once per epoch ([`KafkaSink::hand_over`]
//! and `begin_epoch`), not under the tracker's lock per record; an
//! acknowledgement may come first, so a count is signed and an epoch is
//! complete when it is zero.
//! The stage releases an epoch only when it and every earlier epoch are
//! acknowledged ([`KafkaSink::delivered_below`]), so a checkpoint never covers
//! an undelivered document, while several epochs' round trips to the broker
//! overlap and the worker keeps computing. (Waiting for each flush on the
//! worker thread bounded throughput by the broker's acknowledgement latency.)
//! The tracker wakes the stage when an epoch completes. While the broker is
//! away, librdkafka retries (`message.timeout.ms`, default here 0 = forever)
//! and epochs stay unacknowledged: back-pressure reaches the source through
//! the epochs in flight. A delivery that fails for good is an error, never a
//! silent drop.
//!
//! Within a partition, idempotence keeps order across retries, so one
//! listing's updates never overtake each other.
//!
//! # Every worker writes
//! Each worker writes the records it made through [`KafkaSink::share`]: one
//! producer, so one batch per output partition fills from every worker. A
//! listing's documents all come from the worker that owns its input
//! partition, in epoch order, so they still leave in order. The tracker
//! counts every worker's records together: a worker may hold an epoch a
//! little longer while another worker's records of it are in flight, which
//! the dataflow's frontier would hold anyway.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};
use timely::scheduling::SyncActivator;

use super::client_config;
use crate::config::{KafkaBinding, KafkaConfig};
use crate::record::{DeadLetter, OutputDocument};

/// Counts each epoch's records not yet acknowledged, and collects delivery
/// failures; runs on librdkafka's callback thread.
#[derive(Clone, Default)]
pub struct DeliveryTracker(Arc<Mutex<Tracking>>);

#[derive(Default)]
struct Tracking {
    /// epoch -> records handed over minus records acknowledged (absent:
    /// zero). Negative while a sink has not yet added the records whose
    /// acknowledgements came; a sink asks `delivered_below` only after its
    /// own are added, and another sink still adding holds the epoch itself.
    unacknowledged: BTreeMap<u64, i64>,
    errors: Vec<String>,
    /// wake the sink stages (one per worker) when an epoch is complete or a
    /// delivery failed
    wakers: Vec<SyncActivator>,
}

impl Tracking {
    /// Adds `records` to `epoch`'s count; true when that completed it.
    fn add(&mut self, epoch: u64, records: i64) -> bool {
        match self.unacknowledged.entry(epoch) {
            Entry::Vacant(vacant) => {
                vacant.insert(records);
                false
            }
            Entry::Occupied(mut count) => {
                *count.get_mut() += records;
                if *count.get() == 0 {
                    count.remove();
                    return true;
                }
                false
            }
        }
    }

    /// Wakes every worker's sink stage.
    fn wake_all(&self) {
        for waker in &self.wakers {
            // a stage is gone only when the dataflow is: nothing left to wake
            let _ = waker.activate();
        }
    }
}

impl ClientContext for DeliveryTracker {}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, epoch: usize) {
        let mut tracking = self.0.lock().unwrap();
        let mut wake = false;
        if let Err((error, message)) = result {
            let key = message
                .key()
                .map(|k| String::from_utf8_lossy(k).to_string())
                .unwrap_or_default();
            tracking
                .errors
                .push(format!("{error} (key {key:?}, topic {})", message.topic()));
            wake = true;
        }
        if tracking.add(epoch as u64, -1) {
            wake = true;
        }
        if wake {
            tracking.wake_all();
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
    /// shared by the workers' sinks (see "Every worker writes")
    producer: Arc<ThreadedProducer<DeliveryTracker>>,
    tracker: DeliveryTracker,
    /// the epoch the records this worker writes now belong to (see `begin_epoch`)
    epoch: u64,
    /// records of `epoch` sent and not yet added to the tracker's count
    sent_unhanded: i64,
    topic: String,
    source_topic: Arc<str>,
    model_headers: Arc<[(String, String)]>,
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
        let tracker = DeliveryTracker::default();
        let producer: ThreadedProducer<DeliveryTracker> = config
            .create_with_context(tracker.clone())
            .map_err(|e| KafkaSinkError {
                topic: binding.topic.clone(),
                detail: e.to_string(),
            })?;
        let model_headers = model_versions
            .into_iter()
            .map(|(name, version)| (format!("assay.model.{name}"), version))
            .collect();
        Ok(KafkaSink {
            producer: Arc::new(producer),
            tracker,
            epoch: 0,
            sent_unhanded: 0,
            topic: binding.topic.clone(),
            source_topic: source_topic.into(),
            model_headers,
        })
    }

    /// A sink for another worker, writing through the same producer.
    pub fn share(&self) -> KafkaSink {
        KafkaSink {
            producer: self.producer.clone(),
            tracker: self.tracker.clone(),
            epoch: 0,
            sent_unhanded: 0,
            topic: self.topic.clone(),
            source_topic: self.source_topic.clone(),
            model_headers: self.model_headers.clone(),
        }
    }

    fn send(
        &mut self,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: OwnedHeaders,
    ) -> Result<(), KafkaSinkError> {
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(&self.topic, self.epoch as usize).headers(headers);
        record.key = key;
        record.payload = payload;
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    self.sent_unhanded += 1;
                    return Ok(());
                }
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

    /// The records written from now on belong to `epoch` (epochs only grow).
    pub fn begin_epoch(&mut self, epoch: u64) {
        self.hand_over();
        self.epoch = epoch;
    }

    /// Adds the records sent since the last hand-over to their epoch's
    /// count. `delivered_below` knows only of records handed over.
    pub fn hand_over(&mut self) {
        if self.sent_unhanded == 0 {
            return;
        }
        let mut tracking = self.tracker.0.lock().unwrap();
        let completed = tracking.add(self.epoch, self.sent_unhanded);
        self.sent_unhanded = 0;
        if completed {
            // every record was acknowledged before it was counted: no
            // acknowledgement is left to wake the stages
            tracking.wake_all();
        }
    }

    /// Wakes this worker's sink stage whenever an epoch is acknowledged in full.
    pub fn wake_with(&mut self, waker: SyncActivator) {
        self.tracker.0.lock().unwrap().wakers.push(waker);
    }

    /// Every epoch below the returned one has been acknowledged in full (of
    /// the records handed over so far, by any worker); a delivery that failed
    /// for good is an error.
    pub fn delivered_below(&self) -> Result<u64, KafkaSinkError> {
        let tracking = self.tracker.0.lock().unwrap();
        if let Some(first) = tracking.errors.first() {
            return Err(KafkaSinkError {
                topic: self.topic.clone(),
                detail: format!(
                    "{} record(s) could not be delivered; first: {first}",
                    tracking.errors.len()
                ),
            });
        }
        Ok(tracking
            .unacknowledged
            .first_key_value()
            .map(|(epoch, _)| *epoch)
            .unwrap_or(u64::MAX))
    }

    pub fn write_document(&mut self, document: &OutputDocument) -> Result<(), KafkaSinkError> {
        // numbers formatted on the stack: librdkafka copies each header
        let (mut version, mut partition, mut offset) = (
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
        );
        let version = version.format(document.version);
        let partition = partition.format(document.position.partition);
        let offset = offset.format(document.position.offset);
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: "assay.version",
                value: Some(version),
            })
            .insert(Header {
                key: "assay.source.topic",
                value: Some(&*self.source_topic),
            })
            .insert(Header {
                key: "assay.source.partition",
                value: Some(partition),
            })
            .insert(Header {
                key: "assay.source.offset",
                value: Some(offset),
            });
        if document.position.timestamp_ms > 0 {
            let mut timestamp = itoa::Buffer::new();
            headers = headers.insert(Header {
                key: "assay.source.timestamp",
                value: Some(timestamp.format(document.position.timestamp_ms)),
            });
        }
        if document.body.is_some() {
            for (key, value) in self.model_headers.iter() {
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
                value: Some(&*self.source_topic),
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
}

#[cfg(test)]
mod tests {
    //! librdkafka's mock cluster, for the faults a real broker cannot be made
    //! to show on demand (the Kafka tests run the same sink against tansu).
    use std::time::Instant;

    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    use super::*;

    fn sink_on(
        cluster: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    ) -> KafkaSink {
        let kafka = KafkaConfig {
            bootstrap_servers: cluster.bootstrap_servers(),
            ..Default::default()
        };
        let binding = KafkaBinding {
            topic: "documents".into(),
            partitions: Some(1),
            create_topic: false,
            properties: Default::default(),
            epoch_ms: 5,
            stop_when_idle_ms: 0,
        };
        KafkaSink::open(&kafka, &binding, "listing_changes", Vec::new()).unwrap()
    }

    fn document(key: &str) -> OutputDocument {
        OutputDocument::for_test(key)
    }

    /// Polls `delivered_below` for up to 20 s until `done` says so.
    fn wait_until(
        sink: &KafkaSink,
        done: impl Fn(&Result<u64, KafkaSinkError>) -> bool,
    ) -> Result<u64, KafkaSinkError> {
        let started = Instant::now();
        loop {
            let now = sink.delivered_below();
            if done(&now) || started.elapsed() > Duration::from_secs(20) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn an_epoch_is_released_only_once_every_record_of_it_is_acknowledged() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("documents", 1, 1).unwrap();
        let mut sink = sink_on(&cluster);
        assert_eq!(
            sink.delivered_below().unwrap(),
            u64::MAX,
            "nothing written, nothing outstanding"
        );

        cluster.broker_down(1).unwrap();
        sink.begin_epoch(3);
        sink.write_document(&document("a")).unwrap();
        sink.begin_epoch(4);
        sink.write_document(&document("b")).unwrap();
        sink.hand_over();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            sink.delivered_below().unwrap(),
            3,
            "the broker is away: epoch 3 is not delivered"
        );

        cluster.broker_up(1).unwrap();
        let after = wait_until(&sink, |r| matches!(r, Ok(u64::MAX)));
        assert_eq!(
            after.unwrap(),
            u64::MAX,
            "the broker came back: both epochs are acknowledged"
        );
    }

    #[test]
    fn an_acknowledgement_before_its_record_is_counted_keeps_the_epoch_open_until_it_is() {
        let mut tracking = Tracking::default();
        // worker 1's record of epoch 5 is acknowledged before worker 1 hands it over
        assert!(!tracking.add(5, -1));
        assert_eq!(tracking.unacknowledged.first_key_value(), Some((&5, &-1)));
        // worker 0 hands over its record of epoch 5, still in flight: the sum
        // is zero, and worker 0 may let go of epoch 5; the frontier does not
        // pass it, because worker 1's stage, still writing it, holds it
        assert!(tracking.add(5, 1));
        // worker 1 hands over: worker 0's record is what is outstanding now,
        // and worker 1 holds epoch 5 until it is acknowledged
        assert!(!tracking.add(5, 1));
        assert_eq!(tracking.unacknowledged.first_key_value(), Some((&5, &1)));
        assert!(tracking.add(5, -1));
        assert!(tracking.unacknowledged.is_empty());
    }

    #[test]
    fn a_shared_sink_writes_through_the_same_producer_and_holds_the_same_epochs() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("documents", 1, 1).unwrap();
        let worker_0 = sink_on(&cluster);
        let mut worker_1 = worker_0.share();
        cluster.broker_down(1).unwrap();
        worker_1.begin_epoch(3);
        worker_1.write_document(&document("a")).unwrap();
        worker_1.hand_over();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            worker_0.delivered_below().unwrap(),
            3,
            "worker 0 sees the epoch worker 1's record holds"
        );
        cluster.broker_up(1).unwrap();
        let after = wait_until(&worker_0, |r| matches!(r, Ok(u64::MAX)));
        assert_eq!(after.unwrap(), u64::MAX);
        assert_eq!(worker_1.delivered_below().unwrap(), u64::MAX);
    }

    #[test]
    fn a_delivery_that_fails_for_good_is_an_error_not_a_release() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("documents", 1, 1).unwrap();
        let mut sink = sink_on(&cluster);
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        );
        sink.begin_epoch(7);
        sink.write_document(&document("a")).unwrap();
        sink.hand_over();
        let after = wait_until(&sink, |r| r.is_err());
        let error = after.expect_err("a record the broker refused must not let epoch 7 pass");
        assert!(error.detail.contains("could not be delivered"), "{error}");
    }
}
