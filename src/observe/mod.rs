//! What a person sees: the progress bar, the end-of-run summary, latency
//! percentiles. Every count is named once, here.
//!
//! # Reconciliation
//! `records_in = event documents + unchanged + dead_letters + stale + duplicates`:
//! every record read ends in exactly one of those terms (an event document is
//! an upsert or tombstone for the record's own listing; `unchanged` is an
//! event whose document the change gate held back). Market re-emissions come
//! on top: `documents = event documents + market documents`, and every market
//! re-evaluation is either emitted or suppressed. The summary checks both and
//! says so.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency histogram with ~1% relative precision: log-linear buckets.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    count: u64,
    max_nanos: u64,
}

const SUB_BUCKETS: u64 = 64;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: vec![0; (64 * SUB_BUCKETS) as usize],
            count: 0,
            max_nanos: 0,
        }
    }
}

impl LatencyHistogram {
    fn bucket_of(nanos: u64) -> usize {
        if nanos < SUB_BUCKETS {
            return nanos as usize;
        }
        let magnitude = 63 - nanos.leading_zeros() as u64; // >= 6
        let shift = magnitude - 6;
        let sub = (nanos >> shift) - SUB_BUCKETS; // 0..64
        ((shift + 1) * SUB_BUCKETS + sub) as usize
    }

    fn bucket_upper(bucket: usize) -> u64 {
        let bucket = bucket as u64;
        if bucket < SUB_BUCKETS {
            return bucket;
        }
        let shift = bucket / SUB_BUCKETS - 1;
        let sub = bucket % SUB_BUCKETS;
        ((SUB_BUCKETS + sub + 1) << shift) - 1
    }

    pub fn record(&mut self, nanos: u64) {
        self.buckets[Self::bucket_of(nanos)] += 1;
        self.count += 1;
        self.max_nanos = self.max_nanos.max(nanos);
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max_nanos = self.max_nanos.max(other.max_nanos);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0..=1), as the upper edge of its bucket.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (bucket, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Duration::from_nanos(Self::bucket_upper(bucket).min(self.max_nanos));
            }
        }
        Duration::from_nanos(self.max_nanos)
    }
}

/// Counts from one worker; merged at the end.
#[derive(Debug, Default, Clone)]
pub struct WorkerReport {
    pub records_in: u64,
    pub upserts: u64,
    pub tombstones: u64,
    pub dead_letters: BTreeMap<String, u64>,
    pub stale: u64,
    pub duplicates: u64,
    pub checkpoints: u64,
    pub resumed_from_line: u64,
    pub latency: LatencyHistogram,
    /// Record timestamp until read, for sources that know it (Kafka).
    pub source_lag: LatencyHistogram,
    /// Documents the sink wrote because the market moved.
    pub market_documents: u64,
    pub evaluate: crate::dataflow::evaluate::EvaluateCounts,
    /// Bytes the market arrangements held at the end (members; statistics).
    pub arrangement_member_bytes: u64,
    pub arrangement_statistics_bytes: u64,
    pub time: WorkerTime,
}

/// Where a worker's loop spent its time, as Flink reports busy, idle and
/// back-pressured time: it tells a slow source from a slow pipeline from a
/// slow sink.
#[derive(Debug, Default, Clone, Copy)]
pub struct WorkerTime {
    /// Reading the source and stepping the dataflow after new records.
    pub busy: Duration,
    /// The source had nothing new: stepping earlier epochs along, or parked.
    pub source_empty: Duration,
    /// Not reading: `max_epochs_in_flight` epochs were not yet delivered.
    pub back_pressured: Duration,
    /// Waiting for every sent epoch to complete before a checkpoint.
    pub checkpoint: Duration,
    /// Of the loop's wall time, the worker thread's time on a core, and its
    /// time runnable but waiting for one (the kernel's schedstat): the rest
    /// it was parked. Waiting for a core means other processes (a broker on
    /// the same machine) or threads took the CPU.
    pub on_cpu: Duration,
    pub waiting_for_cpu: Duration,
}

impl WorkerTime {
    fn merge(&mut self, other: &WorkerTime) {
        self.busy += other.busy;
        self.source_empty += other.source_empty;
        self.back_pressured += other.back_pressured;
        self.checkpoint += other.checkpoint;
        self.on_cpu += other.on_cpu;
        self.waiting_for_cpu += other.waiting_for_cpu;
    }
}

/// The calling thread's time on a core and time runnable but waiting for
/// one, from `/proc/thread-self/schedstat`; `None` where the kernel does not
/// keep them.
pub fn thread_schedule_times() -> Option<(Duration, Duration)> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let on_cpu = fields.next()??;
    let waiting = fields.next()??;
    Some((Duration::from_nanos(on_cpu), Duration::from_nanos(waiting)))
}

impl WorkerReport {
    pub fn merge(&mut self, other: &WorkerReport) {
        self.records_in += other.records_in;
        self.upserts += other.upserts;
        self.tombstones += other.tombstones;
        for (reason, n) in &other.dead_letters {
            *self.dead_letters.entry(reason.clone()).or_default() += n;
        }
        self.stale += other.stale;
        self.duplicates += other.duplicates;
        self.checkpoints += other.checkpoints;
        self.latency.merge(&other.latency);
        self.source_lag.merge(&other.source_lag);
        self.market_documents += other.market_documents;
        self.arrangement_member_bytes += other.arrangement_member_bytes;
        self.arrangement_statistics_bytes += other.arrangement_statistics_bytes;
        self.time.merge(&other.time);
        let (mine, theirs) = (&mut self.evaluate, &other.evaluate);
        mine.event_emitted += theirs.event_emitted;
        mine.event_suppressed += theirs.event_suppressed;
        mine.market_emitted += theirs.market_emitted;
        mine.market_suppressed += theirs.market_suppressed;
        mine.market_scored += theirs.market_scored;
        mine.market_waited += theirs.market_waited;
        mine.lookup_misses
            .resize(theirs.lookup_misses.len().max(mine.lookup_misses.len()), 0);
        for (a, b) in mine.lookup_misses.iter_mut().zip(&theirs.lookup_misses) {
            *a += b;
        }
    }
}

/// The end-of-run summary, printed for people and written as JSON for tools
/// (and read back by the benches; a key missing from the JSON reads as its
/// default).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunSummary {
    pub topology: String,
    pub workers: usize,
    pub records_in: u64,
    pub documents_emitted: u64,
    pub upserts: u64,
    pub tombstones: u64,
    pub dead_letters: u64,
    pub dead_letters_by_reason: BTreeMap<String, u64>,
    pub stale: u64,
    pub duplicates: u64,
    /// Events whose document equalled the last one emitted (change gate).
    pub unchanged: u64,
    /// Listings re-evaluated because their segment's statistics moved, and of
    /// those, the documents emitted (the rest were unchanged).
    pub market_reevaluations: u64,
    pub market_documents: u64,
    /// Market re-evaluations that ran the models; the others reused the
    /// outputs kept from the listing's own last evaluation.
    pub market_scored: u64,
    /// Market re-evaluations that waited for a later epoch than their move's
    /// (`runtime.market_evaluations_per_epoch_and_partition`; live inputs).
    pub market_waited: u64,
    /// Documents emitted per record in.
    pub fan_out: f64,
    /// Records whose lookup key was missing from the table, per lookup.
    pub lookup_misses: BTreeMap<String, u64>,
    pub reconciled: bool,
    pub checkpoints: u64,
    pub elapsed_seconds: f64,
    pub events_per_second: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// Record timestamp (its append to a Kafka input) until the engine read
    /// it: broker fetch, librdkafka's queue and back-pressure. Absent for
    /// files, whose records carry no append time.
    pub source_lag_p50_ms: Option<f64>,
    pub source_lag_p99_ms: Option<f64>,
    pub peak_rss_mb: f64,
    /// CPU time (user + system) this process used.
    pub cpu_seconds: f64,
    /// Of `elapsed_seconds`, opening the state store (RocksDB's recovery).
    pub state_open_seconds: f64,
    /// Bytes held by the market arrangements at the end, counted from their
    /// batches: the member arrangement (per live listing) and the statistics.
    pub arrangement_member_bytes: u64,
    pub arrangement_statistics_bytes: u64,
    /// Worker loop time, summed over the workers (see `WorkerTime`).
    pub worker_busy_seconds: f64,
    pub worker_source_empty_seconds: f64,
    pub worker_back_pressured_seconds: f64,
    pub worker_checkpoint_seconds: f64,
    pub worker_on_cpu_seconds: f64,
    pub worker_waiting_for_cpu_seconds: f64,
}

impl RunSummary {
    pub fn new(
        topology: &str,
        workers: usize,
        report: &WorkerReport,
        elapsed: Duration,
        lookup_names: &[String],
    ) -> RunSummary {
        let dead_letters: u64 = report.dead_letters.values().sum();
        let emitted = report.upserts + report.tombstones;
        let evaluate = &report.evaluate;
        let event_documents = emitted.saturating_sub(report.market_documents);
        RunSummary {
            topology: topology.to_string(),
            workers,
            records_in: report.records_in,
            documents_emitted: emitted,
            upserts: report.upserts,
            tombstones: report.tombstones,
            dead_letters,
            dead_letters_by_reason: report.dead_letters.clone(),
            stale: report.stale,
            duplicates: report.duplicates,
            unchanged: evaluate.event_suppressed,
            market_reevaluations: evaluate.market_emitted + evaluate.market_suppressed,
            market_documents: report.market_documents,
            market_scored: evaluate.market_scored,
            market_waited: evaluate.market_waited,
            fan_out: emitted as f64 / report.records_in.max(1) as f64,
            lookup_misses: lookup_names
                .iter()
                .cloned()
                .zip(
                    evaluate
                        .lookup_misses
                        .iter()
                        .copied()
                        .chain(std::iter::repeat(0)),
                )
                .collect(),
            reconciled: report.records_in
                == event_documents
                    + evaluate.event_suppressed
                    + dead_letters
                    + report.stale
                    + report.duplicates
                && report.market_documents == evaluate.market_emitted,
            checkpoints: report.checkpoints,
            elapsed_seconds: elapsed.as_secs_f64(),
            events_per_second: report.records_in as f64 / elapsed.as_secs_f64().max(1e-9),
            latency_p50_ms: report.latency.quantile(0.50).as_secs_f64() * 1e3,
            latency_p99_ms: report.latency.quantile(0.99).as_secs_f64() * 1e3,
            latency_max_ms: report.latency.quantile(1.0).as_secs_f64() * 1e3,
            source_lag_p50_ms: (report.source_lag.count() > 0)
                .then(|| report.source_lag.quantile(0.50).as_secs_f64() * 1e3),
            source_lag_p99_ms: (report.source_lag.count() > 0)
                .then(|| report.source_lag.quantile(0.99).as_secs_f64() * 1e3),
            peak_rss_mb: peak_rss_bytes() as f64 / (1024.0 * 1024.0),
            cpu_seconds: cpu_seconds(None),
            state_open_seconds: 0.0,
            arrangement_member_bytes: report.arrangement_member_bytes,
            arrangement_statistics_bytes: report.arrangement_statistics_bytes,
            worker_busy_seconds: report.time.busy.as_secs_f64(),
            worker_source_empty_seconds: report.time.source_empty.as_secs_f64(),
            worker_back_pressured_seconds: report.time.back_pressured.as_secs_f64(),
            worker_checkpoint_seconds: report.time.checkpoint.as_secs_f64(),
            worker_on_cpu_seconds: report.time.on_cpu.as_secs_f64(),
            worker_waiting_for_cpu_seconds: report.time.waiting_for_cpu.as_secs_f64(),
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "assay run: topology {} on {} worker(s)\n",
            self.topology, self.workers
        ));
        out.push_str(&format!("  records in          {:>10}\n", self.records_in));
        out.push_str(&format!(
            "  documents emitted   {:>10}  ({} upserts, {} tombstones)\n",
            self.documents_emitted, self.upserts, self.tombstones
        ));
        out.push_str(&format!(
            "  dead letters        {:>10}\n",
            self.dead_letters
        ));
        for (reason, n) in &self.dead_letters_by_reason {
            out.push_str(&format!("    {reason:<22}{n:>8}\n"));
        }
        out.push_str(&format!("  stale events        {:>10}\n", self.stale));
        out.push_str(&format!("  duplicate events    {:>10}\n", self.duplicates));
        out.push_str(&format!(
            "  unchanged (gated)   {:>10}  (events whose document did not change)\n",
            self.unchanged
        ));
        if self.market_reevaluations > 0 || self.market_documents > 0 {
            out.push_str(&format!(
                "  market re-evaluated {:>10}  ({} emitted, {} unchanged; {} scored, the rest reused kept model outputs)\n",
                self.market_reevaluations,
                self.market_documents,
                self.market_reevaluations - self.market_documents.min(self.market_reevaluations),
                self.market_scored
            ));
        }
        if self.market_waited > 0 {
            out.push_str(&format!(
                "  market waited       {:>10}  (re-evaluations taken at a later epoch than their move: the per-epoch limit)\n",
                self.market_waited
            ));
        }
        out.push_str(&format!(
            "  fan-out             {:>10.3}  documents per record in\n",
            self.fan_out
        ));
        for (lookup, misses) in &self.lookup_misses {
            out.push_str(&format!(
                "  lookup misses       {:>10}  ({lookup}: key not in the table, default used)\n",
                misses
            ));
        }
        out.push_str(&format!(
            "  reconciled          {:>10}  (in = event documents + unchanged + dead letters + stale + duplicates)\n",
            if self.reconciled { "yes" } else { "NO" }
        ));
        out.push_str(&format!(
            "  throughput          {:>10.0} events/s over {:.2} s, {} checkpoint(s)\n",
            self.events_per_second, self.elapsed_seconds, self.checkpoints
        ));
        out.push_str(&format!(
            "  latency             p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (read to written)\n",
            self.latency_p50_ms, self.latency_p99_ms, self.latency_max_ms
        ));
        out.push_str(&format!(
            "  worker time         busy {:.2} s, source empty {:.2} s, back-pressured {:.2} s, checkpoints {:.2} s\n",
            self.worker_busy_seconds,
            self.worker_source_empty_seconds,
            self.worker_back_pressured_seconds,
            self.worker_checkpoint_seconds
        ));
        out.push_str(&format!(
            "                      on a core {:.2} s, waiting for a core {:.2} s\n",
            self.worker_on_cpu_seconds, self.worker_waiting_for_cpu_seconds
        ));
        if let (Some(p50), Some(p99)) = (self.source_lag_p50_ms, self.source_lag_p99_ms) {
            out.push_str(&format!(
                "  source lag          p50 {p50:.2} ms, p99 {p99:.2} ms (record timestamp to read)\n"
            ));
        }
        out.push_str(&format!(
            "  peak memory (RSS)   {:>10.1} MB, CPU {:.2} s\n",
            self.peak_rss_mb, self.cpu_seconds
        ));
        out
    }
}

/// CPU time (user + system) of a process (`None`: this one) from /proc, 0 when unknown.
pub fn cpu_seconds(pid: Option<u32>) -> f64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // fields after the command name (which may contain spaces) start at ") "
    let Some(rest) = stat.rfind(") ").map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name; in clock ticks (100/s on Linux)
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set size of this process (Linux `VmHWM`), 0 when unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// A one-line progress bar on stderr, redrawn at most every 200 ms.
pub struct ProgressBar {
    enabled: bool,
    last_draw: std::time::Instant,
    started: std::time::Instant,
}

impl ProgressBar {
    pub fn new(enabled: Option<bool>) -> ProgressBar {
        let enabled = enabled.unwrap_or_else(|| std::io::stderr().is_terminal());
        let now = std::time::Instant::now();
        ProgressBar {
            enabled,
            last_draw: now - Duration::from_secs(1),
            started: now,
        }
    }

    pub fn update(&mut self, done_bytes: u64, total_bytes: u64, records: u64) {
        if !self.enabled || self.last_draw.elapsed() < Duration::from_millis(200) {
            return;
        }
        self.last_draw = std::time::Instant::now();
        let fraction = if total_bytes == 0 {
            1.0
        } else {
            done_bytes as f64 / total_bytes as f64
        };
        let width = 30;
        let filled = ((fraction * width as f64) as usize).min(width);
        let rate = records as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let mut stderr = std::io::stderr();
        let _ = write!(
            stderr,
            "\r[{}{}] {:>5.1}%  {:>9} records  {:>8.0}/s ",
            "#".repeat(filled),
            ".".repeat(width - filled),
            fraction * 100.0,
            records,
            rate
        );
        let _ = stderr.flush();
    }

    pub fn finish(&mut self) {
        if self.enabled {
            let _ = writeln!(std::io::stderr());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_within_two_percent() {
        let mut h = LatencyHistogram::default();
        for v in 1..=100_000u64 {
            h.record(v * 1_000);
        }
        for (q, exact) in [(0.5, 50_000_000u64), (0.99, 99_000_000), (1.0, 100_000_000)] {
            let got = h.quantile(q).as_nanos() as f64;
            assert!(
                (got - exact as f64).abs() / exact as f64 <= 0.02,
                "q{q}: {got} vs {exact}"
            );
        }
        let mut other = LatencyHistogram::default();
        other.record(5);
        h.merge(&other);
        assert_eq!(h.count(), 100_001);
        assert_eq!(LatencyHistogram::default().quantile(0.5), Duration::ZERO);
    }
}
