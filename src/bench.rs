//! `assay bench`: a generated stream calibrated on the real sample, run
//! through the full topology and through a pass-through baseline in the same
//! invocation, each run in its own process so that peak RSS is its own.
//!
//! # The generated stream
//! - Event kinds in the sample's proportions (creates 40 %, price changes
//!   19 %, edits 7 %, removals 34 %), listing fields copied from the sample's
//!   real create events (their noise included: ~14 % are dead-lettered).
//! - Updates and removals pick a live listing with Zipf(1)-skewed popularity
//!   (`floor(n^u)`, u uniform: density ∝ 1/rank).
//! - 2 % of events are delivered twice, 1 % of updates are followed by a stale
//!   re-delivery, as in the sample.
//! - Event time advances 10 s per event. A fixed seed: the same file every time.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};

/// splitmix64: tiny, fast, deterministic.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }
    /// Zipf(1)-like rank in [0, n).
    pub fn zipf(&mut self, n: usize) -> usize {
        if n <= 1 {
            return 0;
        }
        ((n as f64).powf(self.uniform()).floor() as usize)
            .saturating_sub(1)
            .min(n - 1)
    }
}

/// What kind of stream to generate.
#[derive(Debug, Clone, Copy)]
pub enum Workload {
    /// The sample's mix of kinds over Zipf-skewed listings.
    Mixed,
    /// Only creates of distinct listings: every event adds a live listing.
    CreatesOnly,
}

/// Writes `events` generated events to `out`, using the create events of
/// `sample` as listing templates. Returns the number written.
pub fn generate(
    sample: &Path,
    out: &Path,
    events: u64,
    workload: Workload,
    seed: u64,
) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(sample)?;
    let templates: Vec<Map<String, Json>> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|v| v["kind"] == "create")
        .filter_map(|v| match v {
            Json::Object(map) => Some(map),
            _ => None,
        })
        .collect();
    assert!(!templates.is_empty(), "the sample has no create events");
    let mut rng = Rng::new(seed);
    let mut writer = BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    // live listings: (id number, version, last event)
    let mut live: Vec<(u64, u64, Map<String, Json>)> = Vec::new();
    let mut next_id: u64 = 0;
    let mut written: u64 = 0;
    let mut time: i64 = 1_640_995_200;
    let mut line = Vec::with_capacity(512);
    let mut emit = |event: &Map<String, Json>,
                    writer: &mut BufWriter<std::fs::File>,
                    written: &mut u64|
     -> std::io::Result<()> {
        line.clear();
        serde_json::to_writer(&mut line, event).expect("json");
        line.push(b'\n');
        writer.write_all(&line)?;
        *written += 1;
        Ok(())
    };
    while written < events {
        time += 10;
        let roll = rng.uniform();
        let create = matches!(workload, Workload::CreatesOnly) || live.is_empty() || roll < 0.40;
        let mut event;
        if create {
            event = templates[rng.below(templates.len())].clone();
            event.insert("listing_id".into(), Json::String(format!("g-{next_id:08}")));
            event.insert("version".into(), Json::from(1));
            event.insert("event_time".into(), Json::from(time));
            live.push((next_id, 1, event.clone()));
            next_id += 1;
        } else {
            let index = rng.zipf(live.len());
            let (id, version, last) = &mut live[index];
            let previous = last.clone();
            *version += 1;
            event = Map::new();
            event.insert("listing_id".into(), Json::String(format!("g-{id:08}")));
            event.insert("version".into(), Json::from(*version));
            event.insert("event_time".into(), Json::from(time));
            if roll < 0.59 {
                event.insert("kind".into(), Json::from("price_change"));
                let price = previous
                    .get("price")
                    .and_then(Json::as_f64)
                    .unwrap_or(20_000.0);
                let cut = (price * (0.90 + 0.09 * rng.uniform()) / 50.0).round() * 50.0;
                event.insert("price".into(), Json::from(cut as i64));
            } else if roll < 0.66 {
                event.insert("kind".into(), Json::from("edit"));
                event.insert(
                    "odometer".into(),
                    Json::from(5_000 + rng.below(150_000) as i64),
                );
            } else {
                event.insert("kind".into(), Json::from("remove"));
                event.insert("reason".into(), Json::from("sold"));
            }
            let mut merged = previous.clone();
            for (k, v) in &event {
                merged.insert(k.clone(), v.clone());
            }
            *last = merged;
            if event["kind"] == "remove" {
                live.swap_remove(index);
            }
            if written + 1 < events && rng.uniform() < 0.01 {
                // a stale re-delivery of the listing's previous event
                emit(&event, &mut writer, &mut written)?;
                event = previous;
            }
        }
        if written + 1 < events && rng.uniform() < 0.02 {
            emit(&event, &mut writer, &mut written)?;
        }
        emit(&event, &mut writer, &mut written)?;
    }
    writer.flush()?;
    Ok(written)
}

/// The topology without its market aggregates and everything that reads
/// them (features, derived values and bands over `<aggregate>_...`
/// statistics, output fields, rounding, the statistics changelog), written to
/// `dir`; `None` when the topology has no aggregates. It is the pipeline of
/// per-listing state, features, scoring and shaping alone, so the bench can
/// show what the market costs. Relative model and lookup paths are made
/// absolute, as the file moves.
pub fn core_topology(topology: &Path, dir: &Path) -> std::io::Result<Option<PathBuf>> {
    use toml::Value;
    let text = std::fs::read_to_string(topology)?;
    let mut table: toml::Table = toml::from_str(&text).map_err(std::io::Error::other)?;
    let Some(Value::Array(aggregates)) = table.remove("aggregate") else {
        return Ok(None);
    };
    let prefixes: Vec<String> = aggregates
        .iter()
        .filter_map(|a| a.get("name").and_then(Value::as_str))
        .map(|name| format!("{name}_"))
        .collect();
    let mut removed: std::collections::BTreeSet<String> = Default::default();
    let reads_removed = |name: &str, removed: &std::collections::BTreeSet<String>| {
        removed.contains(name) || prefixes.iter().any(|p| name.starts_with(p.as_str()))
    };
    // drop what reads a removed name, until nothing more goes
    loop {
        let before = removed.len();
        for section in ["feature", "derived", "band"] {
            if let Some(Value::Array(entries)) = table.get_mut(section) {
                entries.retain(|entry| {
                    let Some(fields) = entry.as_table() else {
                        return true;
                    };
                    let reads = fields.iter().any(|(key, value)| {
                        key != "name"
                            && key != "function"
                            && value.as_str().is_some_and(|v| reads_removed(v, &removed))
                    });
                    if reads && let Some(name) = fields.get("name").and_then(Value::as_str) {
                        removed.insert(name.to_string());
                    }
                    !reads
                });
            }
        }
        if removed.len() == before {
            break;
        }
    }
    if let Some(Value::Table(output)) = table.get_mut("output") {
        output.remove("statistics");
        if let Some(Value::Array(fields)) = output.get_mut("fields") {
            fields.retain(|f| f.as_str().is_none_or(|f| !reads_removed(f, &removed)));
        }
        if let Some(Value::Table(round)) = output.get_mut("round") {
            round.retain(|name, _| !reads_removed(name, &removed));
        }
    }
    let base = topology.parent().unwrap_or(Path::new(".")).canonicalize()?;
    for section in ["model", "lookup"] {
        if let Some(Value::Array(entries)) = table.get_mut(section) {
            for entry in entries.iter_mut().filter_map(Value::as_table_mut) {
                for key in ["onnx", "sidecar", "golden", "file"] {
                    if let Some(Value::String(path)) = entry.get_mut(key) {
                        *path = base.join(&*path).display().to_string();
                    }
                }
            }
        }
    }
    let stem = topology
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("topology");
    let path = dir.join(format!("{stem}-core.toml"));
    std::fs::write(
        &path,
        toml::to_string(&table).map_err(std::io::Error::other)?,
    )?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_ranks_are_skewed_and_in_range() {
        let mut rng = Rng::new(1);
        let n = 10_000;
        let mut top_ten = 0;
        for _ in 0..100_000 {
            let rank = rng.zipf(n);
            assert!(rank < n);
            if rank < 10 {
                top_ten += 1;
            }
        }
        // Zipf(1): P(rank < 10) = ln(10)/ln(10000) = 25 %; uniform would give 0.1 %
        assert!((20_000..30_000).contains(&top_ten), "{top_ten}");
    }

    #[test]
    fn generation_is_deterministic_and_sized() {
        let dir = tempfile::tempdir().unwrap();
        let sample = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/listings/data/listing_changes.jsonl"
        );
        let a = dir.path().join("a.jsonl");
        let b = dir.path().join("b.jsonl");
        assert_eq!(
            generate(Path::new(sample), &a, 5_000, Workload::Mixed, 7).unwrap(),
            5_000
        );
        generate(Path::new(sample), &b, 5_000, Workload::Mixed, 7).unwrap();
        let text = std::fs::read_to_string(&a).unwrap();
        assert_eq!(text, std::fs::read_to_string(&b).unwrap());
        assert_eq!(text.lines().count(), 5_000);
        let creates = text
            .lines()
            .filter(|l| l.contains("\"kind\":\"create\""))
            .count();
        assert!((1_700..2_400).contains(&creates), "creates: {creates}");
    }

    #[test]
    fn the_core_topology_drops_the_market_and_what_reads_it_and_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let topology = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/listings.toml");
        let core = core_topology(&topology, dir.path())
            .unwrap()
            .expect("listings has aggregates");
        let plan = crate::topology::load(&core).unwrap_or_else(|d| panic!("{d:?}"));
        let full = crate::topology::load(&topology).unwrap_or_else(|d| panic!("{d:?}"));
        assert!(plan.aggregates.is_empty());
        assert!(!full.aggregates.is_empty());
        let text = std::fs::read_to_string(&core).unwrap();
        for gone in [
            "segment_",
            "price_position",
            "market_supply",
            "market_statistics",
        ] {
            assert!(!text.contains(gone), "{gone} is still in the core topology");
        }
        for kept in [
            "valuation",
            "price_indicator",
            "days_to_sell",
            "days_on_market",
        ] {
            assert!(text.contains(kept), "{kept} was dropped");
        }
        // a topology without aggregates has no core variant
        assert!(core_topology(&core, dir.path()).unwrap().is_none());
    }
}
