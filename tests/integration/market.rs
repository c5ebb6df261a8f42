//! Market aggregates against an oracle, on the second domain (rentals).
//!
//! - Seeded random creates, rent changes, edits (including moves between
//!   segments) and removals across many segments: after every epoch the
//!   engine's statistics changelog equals a from-scratch recomputation over
//!   the live listings, and at the end the current document of every listing
//!   equals what the oracle computes from the final market.
//! - A run stopped in the middle and resumed (the arrangements rebuilt from
//!   RocksDB) writes the same documents as an uninterrupted run.
//! - The change gate on a workload where most changes are immaterial.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use assay::dataflow::market::round_significant;
use assay::features::round_to_step;
use serde_json::{Value as Json, json};

use crate::common::*;

const EPOCH: usize = 25;

fn rentals_topology() -> PathBuf {
    repo().join("topologies/rentals.toml")
}

struct RentalConfig {
    path: PathBuf,
    documents: PathBuf,
    statistics: PathBuf,
}

fn rental_config(dir: &Path, input: &Path, workers: usize) -> RentalConfig {
    rental_config_windowed(dir, input, workers, 1)
}

/// With `runtime.market_window_epochs` = `window`.
fn rental_config_windowed(dir: &Path, input: &Path, workers: usize, window: u64) -> RentalConfig {
    rental_config_staggered(dir, input, workers, window, 1)
}

/// With `runtime.market_window_epochs` = `window` in `phases` groups.
fn rental_config_staggered(
    dir: &Path,
    input: &Path,
    workers: usize,
    window: u64,
    phases: u64,
) -> RentalConfig {
    let documents = dir.join("documents.jsonl");
    let statistics = dir.join("statistics.jsonl");
    let text = format!(
        "[runtime]\nworkers = {workers}\nepoch_records = {EPOCH}\nmarket_window_epochs = {window}\nmarket_window_phases = {phases}\ncheckpoint_interval_ms = 50\nprogress = \"never\"\n\n[state]\ndir = {:?}\n\n\
         [bindings.rental_changes]\ntype = \"file\"\npath = {input:?}\npartitions = 4\n\n\
         [bindings.rental_documents]\ntype = \"file\"\npath = {documents:?}\n\n\
         [bindings.rental_dead_letters]\ntype = \"file\"\npath = {:?}\n\n\
         [bindings.rental_statistics]\ntype = \"file\"\npath = {statistics:?}\n",
        dir.join("state"),
        dir.join("dead.jsonl")
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    RentalConfig {
        path,
        documents,
        statistics,
    }
}

fn run(config: &RentalConfig, from_scratch: bool) -> assay::observe::RunSummary {
    run_topology(&rentals_topology(), config, from_scratch)
}

fn run_topology(
    topology: &Path,
    config: &RentalConfig,
    from_scratch: bool,
) -> assay::observe::RunSummary {
    let prepared = assay::prepare(topology, Some(&config.path), &[])
        .unwrap_or_else(|e| panic!("prepare failed: {e}"));
    let options = assay::dataflow::RunOptions {
        from_scratch,
        progress: Some(false),
        pass_through: false,
    };
    let summary = assay::dataflow::run(prepared.plan, &prepared.config, prepared.models, &options)
        .unwrap_or_else(|e| panic!("run failed: {e}"));
    assert!(summary.reconciled, "counts do not reconcile: {summary:?}");
    summary
}

/// xorshift64*: a seeded generator with no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug)]
struct Flat {
    version: u64,
    /// The version of the last event that changed a field the document shows
    /// (rent, bedrooms): the change gate may hold back later ones.
    shown_version: u64,
    rent: f64,
    city: String,
    bedrooms: i64,
    area: Option<f64>,
}

const CITIES: [&str; 7] = [
    "amsterdam",
    "rotterdam",
    "utrecht",
    "groningen",
    "maastricht",
    "zwolle",
    "delft",
];

/// Valid events only (the oracle applies each one), with versions increasing per flat.
fn random_events(seed: u64, count: usize) -> Vec<Json> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut live: BTreeMap<String, Flat> = BTreeMap::new();
    let mut versions: HashMap<String, u64> = HashMap::new();
    let mut events = Vec::with_capacity(count);
    let mut time = 1_767_225_600i64;
    let mut next_id = 0;
    while events.len() < count {
        time += rng.below(3600) as i64;
        let roll = rng.below(100);
        if live.len() < 20 || roll < 30 {
            let id = format!("f-{next_id:04}");
            next_id += 1;
            let flat = Flat {
                version: 1,
                shown_version: 1,
                rent: (500 + rng.below(40) * 25) as f64,
                city: CITIES[rng.below(CITIES.len() as u64) as usize].to_string(),
                bedrooms: rng.below(3) as i64,
                area: if rng.below(5) == 0 {
                    None
                } else {
                    Some(30.0 + rng.below(60) as f64)
                },
            };
            let mut event = json!({"kind": "listed", "rental_id": id, "version": 1, "event_time": time, "rent": flat.rent, "city": flat.city, "bedrooms": flat.bedrooms});
            if let Some(area) = flat.area {
                event["area_sqm"] = json!(area);
            }
            versions.insert(id.clone(), 1);
            live.insert(id, flat);
            events.push(event);
            continue;
        }
        let id = live
            .keys()
            .nth(rng.below(live.len() as u64) as usize)
            .unwrap()
            .clone();
        let version = versions[&id] + 1 + rng.below(2);
        versions.insert(id.clone(), version);
        let flat = live.get_mut(&id).unwrap();
        flat.version = version;
        let event = match roll {
            30..=59 => {
                flat.rent = (flat.rent * (0.85 + rng.below(20) as f64 / 100.0)).round();
                json!({"kind": "rent_changed", "rental_id": id, "version": version, "event_time": time, "rent": flat.rent})
            }
            60..=69 => {
                // a move to another segment
                flat.bedrooms = rng.below(3) as i64;
                json!({"kind": "updated", "rental_id": id, "version": version, "event_time": time, "bedrooms": flat.bedrooms})
            }
            70..=79 => {
                json!({"kind": "updated", "rental_id": id, "version": version, "event_time": time, "description": format!("text {}", rng.below(5))})
            }
            _ => {
                live.remove(&id);
                json!({"kind": if roll < 90 { "let" } else { "withdrawn" }, "rental_id": id, "version": version, "event_time": time})
            }
        };
        events.push(event);
    }
    events
}

fn write_events(path: &Path, events: &[Json]) {
    let mut text = String::new();
    for event in events {
        text.push_str(&event.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// What the oracle keeps per segment: the exact statistics, recomputed from scratch.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let position = (sorted.len() - 1) as f64 * q;
    let (low, high) = (position.floor() as usize, position.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (position - low as f64)
}

fn measure_stats(mut values: Vec<f64>) -> Json {
    if values.is_empty() {
        return json!({"mean": null, "p25": null, "median": null, "p75": null});
    }
    values.sort_by(f64::total_cmp);
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    json!({"mean": mean, "p25": quantile(&values, 0.25), "median": quantile(&values, 0.5), "p75": quantile(&values, 0.75)})
}

/// `aggregate/{label}` with the label's keys in one order.
fn normalized_segment(key: &str) -> String {
    let (aggregate, label) = key.split_once('/').unwrap();
    let label: BTreeMap<String, Json> = serde_json::from_str(label).unwrap();
    format!("{aggregate}/{}", serde_json::to_string(&label).unwrap())
}

fn segment_key(city: &str, bedrooms: i64) -> String {
    normalized_segment(&format!(
        "comparable/{}",
        json!({"bedrooms": bedrooms, "city": city})
    ))
}

fn oracle_statistics(live: &BTreeMap<String, Flat>) -> BTreeMap<String, Json> {
    let mut segments: BTreeMap<String, Vec<&Flat>> = BTreeMap::new();
    for flat in live.values() {
        segments
            .entry(segment_key(&flat.city, flat.bedrooms))
            .or_default()
            .push(flat);
    }
    segments.into_iter().map(|(key, flats)| {
        let rents = flats.iter().map(|f| f.rent).collect();
        let areas = flats.iter().filter_map(|f| f.area).collect();
        (key, json!({"count": flats.len(), "rent": measure_stats(rents), "area_sqm": measure_stats(areas)}))
    }).collect()
}

fn close(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-9 * x.abs().max(1.0)
        }
        (Json::Object(x), Json::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}

fn apply(live: &mut BTreeMap<String, Flat>, event: &Json) {
    let id = event["rental_id"].as_str().unwrap().to_string();
    let version = event["version"].as_u64().unwrap();
    match event["kind"].as_str().unwrap() {
        "listed" => {
            live.insert(
                id,
                Flat {
                    version,
                    shown_version: version,
                    rent: event["rent"].as_f64().unwrap(),
                    city: event["city"].as_str().unwrap().to_string(),
                    bedrooms: event["bedrooms"].as_i64().unwrap(),
                    area: event["area_sqm"].as_f64(),
                },
            );
        }
        "let" | "withdrawn" => {
            live.remove(&id);
        }
        _ => {
            let flat = live.get_mut(&id).unwrap();
            flat.version = version;
            if let Some(rent) = event["rent"].as_f64() {
                if rent != flat.rent {
                    flat.shown_version = version;
                }
                flat.rent = rent;
            }
            if let Some(bedrooms) = event["bedrooms"].as_i64() {
                if bedrooms != flat.bedrooms {
                    flat.shown_version = version;
                }
                flat.bedrooms = bedrooms;
            }
        }
    }
}

/// The current document per listing: the last upsert, or none after a tombstone.
fn current_documents(path: &Path) -> BTreeMap<String, (u64, Option<Json>)> {
    let mut current: BTreeMap<String, (u64, Option<Json>)> = BTreeMap::new();
    for line in read_lines(path) {
        let record: Json = serde_json::from_str(&line).unwrap();
        let key = record["key"].as_str().unwrap().to_string();
        let version = record["version"].as_u64().unwrap();
        if let Some((previous, _)) = current.get(&key) {
            assert!(
                version > *previous,
                "document versions go backwards for {key}: {previous} then {version}"
            );
        }
        let doc = if record["op"] == "delete" {
            None
        } else {
            Some(record["doc"].clone())
        };
        current.insert(key, (version, doc));
    }
    current
}

#[test]
fn incremental_statistics_and_documents_equal_a_from_scratch_oracle() {
    for seed in [1u64, 2, 3] {
        let dir = tempfile::tempdir().unwrap();
        let events = random_events(seed, 1500);
        let input = dir.path().join("events.jsonl");
        write_events(&input, &events);
        let config = rental_config(dir.path(), &input, 2);
        let summary = run(&config, true);
        assert_eq!(summary.records_in, events.len() as u64);
        assert_eq!(
            summary.dead_letters, 0,
            "the generator makes valid events only: {summary:?}"
        );
        assert!(
            summary.market_documents > 0,
            "seed {seed}: no market re-emission at all; the test would not exercise the join"
        );

        // the statistics changelog, epoch by epoch, against the oracle
        let mut engine: BTreeMap<String, Json> = BTreeMap::new();
        let mut changelog: BTreeMap<u64, Vec<(String, Option<Json>)>> = BTreeMap::new();
        for line in read_lines(&config.statistics) {
            let record: Json = serde_json::from_str(&line).unwrap();
            let doc = (record["op"] != "delete").then(|| record["doc"].clone());
            changelog
                .entry(record["version"].as_u64().unwrap())
                .or_default()
                .push((normalized_segment(record["key"].as_str().unwrap()), doc));
        }
        let mut live = BTreeMap::new();
        for (epoch, chunk) in events.chunks(EPOCH).enumerate() {
            for event in chunk {
                apply(&mut live, event);
            }
            for (key, doc) in changelog.remove(&(epoch as u64)).unwrap_or_default() {
                match doc {
                    Some(doc) => engine.insert(key, json!({"count": doc["count"], "rent": doc["rent"], "area_sqm": doc["area_sqm"]})),
                    None => engine.remove(&key),
                };
            }
            let oracle = oracle_statistics(&live);
            assert_eq!(
                engine.keys().collect::<Vec<_>>(),
                oracle.keys().collect::<Vec<_>>(),
                "seed {seed}, epoch {epoch}: segments differ"
            );
            for (key, want) in &oracle {
                assert!(
                    close(&engine[key], want),
                    "seed {seed}, epoch {epoch}, {key}:\n  engine {}\n  oracle {want}",
                    engine[key]
                );
            }
        }
        assert!(
            changelog.is_empty(),
            "statistics for epochs past the input: {changelog:?}"
        );

        // the current documents against the oracle's, from the final market
        let oracle = oracle_statistics(&live);
        let documents = current_documents(&config.documents);
        for (id, flat) in &live {
            let (version, doc) = documents
                .get(id)
                .unwrap_or_else(|| panic!("seed {seed}: no document for live listing {id}"));
            let doc = doc
                .as_ref()
                .unwrap_or_else(|| panic!("seed {seed}: live listing {id} ends with a tombstone"));
            // the change gate holds back versions that change nothing shown
            assert!(
                (flat.shown_version..=flat.version).contains(&(version >> 32)),
                "seed {seed}: {id} document is for version {} but the last visible change was version {} (last version {})",
                version >> 32,
                flat.shown_version,
                flat.version
            );
            let segment = &oracle[&segment_key(&flat.city, flat.bedrooms)];
            let count = round_significant(segment["count"].as_f64().unwrap(), 3);
            let median = round_significant(segment["rent"]["median"].as_f64().unwrap(), 3);
            let ratio = flat.rent / median;
            let position = if ratio < 0.9 {
                "below_market"
            } else if ratio < 1.1 {
                "at_market"
            } else {
                "above_market"
            };
            let metro = match flat.city.as_str() {
                "amsterdam" | "rotterdam" | "utrecht" => "randstad",
                "groningen" => "north",
                "maastricht" => "south",
                _ => "other",
            };
            let want = json!({"rent": flat.rent, "city": flat.city, "metro": metro, "bedrooms": flat.bedrooms, "comparable_count": count,
                "comparable_rent_median": median, "rent_to_comparable_median": round_to_step(ratio, 0.01), "rent_position": position});
            for (field, value) in want.as_object().unwrap() {
                assert!(
                    close(&doc[field], value),
                    "seed {seed}: {id}.{field} is {} but the oracle says {value}\n  document {doc}",
                    doc[field]
                );
            }
        }
        for (id, (_, doc)) in &documents {
            assert!(
                live.contains_key(id) || doc.is_none(),
                "seed {seed}: removed listing {id} still has a document"
            );
        }
        assert_eq!(
            summary.lookup_misses["metro"],
            events
                .iter()
                .filter(|e| e["kind"] != "let" && e["kind"] != "withdrawn")
                .count() as u64
                - count_known_metro(&events),
            "lookup misses are the events of flats in a city the table does not know"
        );
    }
}

/// The rentals topology with a second aggregate, over the metro (a lookup),
/// that documents read through a rounded ratio and a band: a projection, so
/// a move of a metro's median re-evaluates only the flats whose ratio or
/// band it changes.
fn rentals_with_a_metro_market(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(rentals_topology()).unwrap();
    let metro_table = repo().join("topologies/rentals/data/city_metro.csv");
    let text = text
        .replace(
            "file = \"rentals/data/city_metro.csv\"",
            &format!("file = {:?}", metro_table.display().to_string()),
        )
        .replace(
            "[[feature]]\nname = \"days_listed\"",
            "[[aggregate]]\nname = \"metro_market\"\ngroup_by = [\"metro\"]\nmeasures = [\"rent\"]\nsignificant_digits = 3\n\n\
             [[feature]]\nname = \"rent_to_metro_median\"\nfunction = \"ratio\"\nnumerator = \"rent\"\ndenominator = \"metro_market_rent_median\"\n\n\
             [[band]]\nname = \"metro_position\"\nsource = \"rent_to_metro_median\"\nbands = [{ below = 0.95, label = \"below_metro\" }, { below = 1.05, label = \"at_metro\" }]\notherwise = \"above_metro\"\n\n\
             [[feature]]\nname = \"days_listed\"",
        )
        .replace(
            "\"rent_to_comparable_median\", \"rent_position\",",
            "\"rent_to_comparable_median\", \"rent_position\", \"rent_to_metro_median\", \"metro_position\",",
        )
        .replace(
            "rent_to_comparable_median = 0.01",
            "rent_to_comparable_median = 0.01\nrent_to_metro_median = 0.02",
        );
    assert_eq!(
        text.matches("[[aggregate]]").count(),
        2,
        "the rentals topology changed: {text}"
    );
    assert!(text.contains("\"metro_position\","), "{text}");
    let path = dir.join("rentals_two_markets.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn metro_of(city: &str) -> &'static str {
    match city {
        "amsterdam" | "rotterdam" | "utrecht" => "randstad",
        "groningen" => "north",
        "maastricht" => "south",
        _ => "other",
    }
}

/// Two aggregates: a rent change moves a flat's comparable segment and its
/// metro's, and a flat in another city of the metro is re-evaluated for the
/// metro alone. The join names the segment whose signature moved; the other
/// one the evaluator finds from the flat's fields. At the end every live
/// flat's document shows both markets as the oracle computes them.
#[test]
fn with_two_aggregates_every_document_sees_both_markets_as_the_oracle_computes_them() {
    for seed in [4u64, 5] {
        let dir = tempfile::tempdir().unwrap();
        let topology = rentals_with_a_metro_market(dir.path());
        let events = random_events(seed, 1500);
        let input = dir.path().join("events.jsonl");
        write_events(&input, &events);
        let config = rental_config(dir.path(), &input, 2);
        let summary = run_topology(&topology, &config, true);
        assert!(summary.market_documents > 0, "seed {seed}: {summary:?}");

        let mut live = BTreeMap::new();
        for event in &events {
            apply(&mut live, event);
        }
        let comparable = oracle_statistics(&live);
        let mut metro_rents: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        for flat in live.values() {
            metro_rents
                .entry(metro_of(&flat.city))
                .or_default()
                .push(flat.rent);
        }
        let metro_median: BTreeMap<&str, f64> = metro_rents
            .into_iter()
            .map(|(metro, rents)| {
                let median = measure_stats(rents)["median"].as_f64().unwrap();
                (metro, round_significant(median, 3))
            })
            .collect();
        let documents = current_documents(&config.documents);
        for (id, flat) in &live {
            let doc = documents[id]
                .1
                .as_ref()
                .unwrap_or_else(|| panic!("seed {seed}: live listing {id} ends with a tombstone"));
            let segment = &comparable[&segment_key(&flat.city, flat.bedrooms)];
            let median = round_significant(segment["rent"]["median"].as_f64().unwrap(), 3);
            let metro_ratio = flat.rent / metro_median[metro_of(&flat.city)];
            let metro_position = if metro_ratio < 0.95 {
                "below_metro"
            } else if metro_ratio < 1.05 {
                "at_metro"
            } else {
                "above_metro"
            };
            let want = json!({
                "metro": metro_of(&flat.city),
                "comparable_count": round_significant(segment["count"].as_f64().unwrap(), 3),
                "comparable_rent_median": median,
                "rent_to_comparable_median": round_to_step(flat.rent / median, 0.01),
                "rent_to_metro_median": round_to_step(metro_ratio, 0.02),
                "metro_position": metro_position,
            });
            for (field, value) in want.as_object().unwrap() {
                assert!(
                    close(&doc[field], value),
                    "seed {seed}: {id}.{field} is {} but the oracle says {value}\n  document {doc}",
                    doc[field]
                );
            }
        }
        for (id, (_, doc)) in &documents {
            assert!(
                live.contains_key(id) || doc.is_none(),
                "seed {seed}: removed listing {id} still has a document"
            );
        }
    }
}

/// Events (other than removals) of flats in a city the lookup table knows.
fn count_known_metro(events: &[Json]) -> u64 {
    let mut city: HashMap<String, String> = HashMap::new();
    let mut known = 0;
    for event in events {
        let id = event["rental_id"].as_str().unwrap();
        if let Some(c) = event["city"].as_str() {
            city.insert(id.to_string(), c.to_string());
        }
        if event["kind"] != "let"
            && event["kind"] != "withdrawn"
            && !matches!(city[id].as_str(), "zwolle" | "delft")
        {
            known += 1;
        }
    }
    known
}

#[test]
fn a_run_resumed_in_the_middle_writes_what_an_uninterrupted_run_writes() {
    resumed_in_the_middle_equals_uninterrupted(1, 20);
}

/// With a market window, the resumed run must see the windows the
/// uninterrupted one saw: the first part ends at a window's end, and the
/// checkpoints in between are proposed at window ends. (A clean end inside a
/// window flushes it, so that run would emit its neighbours' documents
/// earlier than an uninterrupted one; the index would end the same.)
#[test]
fn with_a_market_window_a_resumed_run_writes_what_an_uninterrupted_run_writes() {
    resumed_in_the_middle_equals_uninterrupted(4, 20);
}

/// A window of 4 epochs: fewer market documents, since statistics that move
/// and move back inside a window re-evaluate nobody, and the same index at
/// the end as re-evaluating every epoch.
#[test]
fn a_market_window_emits_fewer_documents_and_leaves_the_same_index() {
    let events = random_events(11, 1500);
    let mut summaries = Vec::new();
    let mut indexes = Vec::new();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for (dir, window) in dirs.iter().zip([1, 4]) {
        let input = dir.path().join("events.jsonl");
        write_events(&input, &events);
        let config = rental_config_windowed(dir.path(), &input, 2, window);
        summaries.push(run(&config, true));
        // the fields the change gate compares: without the envelope's version
        // and event time, which say which event's document passed the gate last
        let index: BTreeMap<String, Option<Json>> = current_documents(&config.documents)
            .into_iter()
            .map(|(key, (_version, mut document))| {
                if let Some(Json::Object(fields)) = &mut document {
                    fields.remove("version");
                    fields.remove("event_time");
                }
                (key, document)
            })
            .collect();
        indexes.push(index);
    }
    let (every_epoch, windowed) = (&summaries[0], &summaries[1]);
    assert!(every_epoch.market_documents > 0, "{every_epoch:?}");
    assert!(
        windowed.market_documents < every_epoch.market_documents,
        "window of 4: {} market documents, every epoch: {}",
        windowed.market_documents,
        every_epoch.market_documents
    );
    // every event is evaluated either way; whether its document changed (the
    // gate) can differ, since it may see older statistics
    let evaluated_events =
        |s: &assay::observe::RunSummary| s.documents_emitted - s.market_documents + s.unchanged;
    assert_eq!(evaluated_events(windowed), evaluated_events(every_epoch));
    assert_eq!(indexes[0].len(), indexes[1].len());
    for (key, document) in &indexes[0] {
        assert_eq!(Some(document), indexes[1].get(key), "listing {key}");
    }
}

/// Staggered windows (4 epochs in 2 groups): the windows of half of the
/// segments end at the odd multiples of 2, the others' at multiples of 4,
/// and every group's at the sync points, every `market_windows_per_sync` =
/// 4 windows (16 epochs) by default. The first part ends at the second.
#[test]
fn with_staggered_market_windows_a_resumed_run_writes_what_an_uninterrupted_run_writes() {
    resumed_in_the_middle_equals_uninterrupted_staggered(4, 2, 32);
}

fn resumed_in_the_middle_equals_uninterrupted(window: u64, first_epochs: usize) {
    resumed_in_the_middle_equals_uninterrupted_staggered(window, 1, first_epochs)
}

fn resumed_in_the_middle_equals_uninterrupted_staggered(
    window: u64,
    phases: u64,
    first_epochs: usize,
) {
    let events = random_events(7, 1200);
    let clean_dir = tempfile::tempdir().unwrap();
    let clean_input = clean_dir.path().join("events.jsonl");
    write_events(&clean_input, &events);
    let clean = rental_config_staggered(clean_dir.path(), &clean_input, 2, window, phases);
    run(&clean, true);

    // the first half, then the rest appended to the same file: the second run
    // rebuilds the arrangements from RocksDB and resumes at the checkpoint
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    write_events(&input, &events[..first_epochs * EPOCH]);
    let resumed = rental_config_staggered(dir.path(), &input, 2, window, phases);
    let first = run(&resumed, true);
    assert_eq!(first.records_in, (first_epochs * EPOCH) as u64);
    write_events(&input, &events);
    let second = run(&resumed, false);
    assert_eq!(
        second.records_in,
        (events.len() - first_epochs * EPOCH) as u64,
        "the second run resumes after the first half"
    );

    let clean_documents = std::fs::read_to_string(&clean.documents).unwrap();
    let resumed_documents = std::fs::read_to_string(&resumed.documents).unwrap();
    for (index, (a, b)) in clean_documents
        .lines()
        .zip(resumed_documents.lines())
        .enumerate()
    {
        assert_eq!(
            a,
            b,
            "document line {} differs between the clean and the resumed run",
            index + 1
        );
    }
    assert_eq!(
        clean_documents.lines().count(),
        resumed_documents.lines().count(),
        "the rebuild emitted documents the first run had already emitted, or lost some"
    );
}

#[test]
fn the_change_gate_holds_back_immaterial_changes_and_passes_material_ones() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.jsonl");
    let config = rental_config(dir.path(), &input, 2);
    let t0 = 1_767_225_600i64;
    // 200 identical flats in one segment: median rent 1000
    let mut events: Vec<Json> = (0..200).map(|i| json!({"kind": "listed", "rental_id": format!("g-{i:03}"), "version": 1, "event_time": t0,
        "rent": 1000, "city": "utrecht", "bedrooms": 2, "area_sqm": 50})).collect();
    write_events(&input, &events);
    let setup = run(&config, true);
    assert_eq!(setup.records_in, 200);

    // 200 edits of a field no document shows, at the same event time: nothing to emit
    events.extend((0..200).map(|i| json!({"kind": "updated", "rental_id": format!("g-{i:03}"), "version": 2, "event_time": t0, "description": "repainted"})));
    write_events(&input, &events);
    let immaterial = run(&config, false);
    assert_eq!(
        (
            immaterial.records_in,
            immaterial.unchanged,
            immaterial.documents_emitted,
            immaterial.market_reevaluations
        ),
        (200, 200, 0, 0),
        "{immaterial:?}"
    );

    // one flat cut by 30%: its own document changes; the median (of 200) does
    // not, so no neighbour is even re-evaluated
    events.push(json!({"kind": "rent_changed", "rental_id": "g-000", "version": 3, "event_time": t0, "rent": 700}));
    write_events(&input, &events);
    let one_cut = run(&config, false);
    assert_eq!(
        (
            one_cut.documents_emitted,
            one_cut.unchanged,
            one_cut.market_reevaluations
        ),
        (1, 0, 0),
        "{one_cut:?}"
    );

    // 101 flats raised to 1500 in one epoch: the median moves to 1500, every
    // other flat's position changes and is re-emitted
    events.extend((100..200).chain([1]).map(|i| json!({"kind": "rent_changed", "rental_id": format!("g-{i:03}"), "version": 3, "event_time": t0, "rent": 1500})));
    write_events(&input, &events);
    let raise = run(&config, false);
    // 101 raises over 5 epochs: the median moves only in the epoch where the
    // 101st raise lands; then the 99 flats without an event of their own in that
    // epoch are re-evaluated, and emitted when their band or ratio changed
    assert_eq!(raise.records_in, 101);
    assert_eq!(raise.unchanged, 0);
    assert!(
        raise.market_documents >= 98,
        "the flats left at 1000 (and the cut one) now sit below a 1500 median: {raise:?}"
    );
    let documents = current_documents(&config.documents);
    let kept = documents["g-050"].1.as_ref().unwrap();
    assert_eq!(kept["rent_position"], "below_market", "{kept}");
    assert_eq!(kept["comparable_rent_median"], 1500, "{kept}");
    assert_eq!(
        documents["g-050"].0 & 0xFFFF_FFFF,
        1,
        "a market re-emission carries revision 1"
    );
    assert_eq!(
        documents["g-150"].1.as_ref().unwrap()["rent_position"],
        "at_market"
    );
}

#[test]
fn the_rentals_domain_runs_on_its_committed_sample() {
    let dir = tempfile::tempdir().unwrap();
    let config = rental_config(
        dir.path(),
        &repo().join("topologies/rentals/data/rental_changes.jsonl"),
        1,
    );
    let summary = run(&config, true);
    assert_eq!(
        summary.dead_letters, 2,
        "the sample carries one rent out of range and one change for an unknown flat: {summary:?}"
    );
    assert!(
        summary.lookup_misses["metro"] > 0,
        "the sample has flats in a city the metro table does not know"
    );
    let documents = current_documents(&config.documents);
    let live: Vec<&Json> = documents.values().filter_map(|(_, d)| d.as_ref()).collect();
    assert!(live.len() > 50);
    assert!(live.iter().all(|d| d["rent_position"].is_string() && d["comparable_count"].as_u64().unwrap() >= 1), "every live flat has a market position");
}

/// The listings sample (real data) with market windows of 8 and 20 epochs
/// leaves the index that re-evaluating every epoch leaves. Regression: the
/// evaluator grouped the join's output by the capability it travelled with,
/// not by its own time; with a window, a member at epoch 170 joined with a
/// view delayed to 176 travelled at 173, was evaluated before the move it was
/// about, and 527 listings (window 8) kept stale market fields.
#[test]
fn with_a_market_window_the_sample_leaves_the_index_of_every_epoch() {
    let mut indexes = Vec::new();
    // (window, phases): 8 in 4 groups is a staggered window (see `MarketWindow`)
    for (window, phases) in [(1, 1), (8, 1), (20, 1), (8, 4)] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &sample_stream(), 1, 128, "");
        let text = std::fs::read_to_string(&config.path).unwrap().replace(
            "checkpoint_interval_ms = 100\n",
            &format!("checkpoint_interval_ms = 100\nmarket_window_epochs = {window}\nmarket_window_phases = {phases}\n"),
        );
        std::fs::write(&config.path, text).unwrap();
        let summary = run_in_process(&listings_topology(), &config, true);
        assert!(summary.reconciled, "{summary:?}");
        let index: BTreeMap<String, Option<Json>> = current_documents(&config.documents)
            .into_iter()
            .map(|(key, (_version, mut document))| {
                if let Some(Json::Object(fields)) = &mut document {
                    fields.remove("version");
                }
                (key, document)
            })
            .collect();
        indexes.push((
            format!("{window} in {phases} phases"),
            summary.market_documents,
            index,
        ));
    }
    let (_, every_epoch_market, every_epoch) = &indexes[0];
    for (window, market_documents, index) in &indexes[1..] {
        assert!(
            market_documents < every_epoch_market,
            "window {window}: {market_documents} market documents, every epoch {every_epoch_market}"
        );
        let differing: Vec<&String> = every_epoch
            .iter()
            .filter(|(key, document)| index.get(*key) != Some(*document))
            .map(|(key, _)| key)
            .collect();
        assert_eq!(index.len(), every_epoch.len(), "window {window}");
        assert!(
            differing.is_empty(),
            "window {window}: {} listings end differently, first {:?}",
            differing.len(),
            differing.first()
        );
    }
}
