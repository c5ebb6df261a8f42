//! `assay bench`: runs each measurement in a child process (its own peak RSS)
//! and prints the figures as ratios against the pass-through baseline
//! measured in the same invocation.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use assay::bench::{Workload, generate};
use assay::observe::RunSummary;

struct Measurement {
    label: String,
    workers: usize,
    summary: RunSummary,
}

pub fn summary_from(path: &Path) -> anyhow::Result<RunSummary> {
    let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let number = |key: &str| value[key].as_f64().unwrap_or(0.0);
    let count = |key: &str| value[key].as_u64().unwrap_or(0);
    Ok(RunSummary {
        topology: value["topology"].as_str().unwrap_or("").to_string(),
        workers: count("workers") as usize,
        records_in: count("records_in"),
        documents_emitted: count("documents_emitted"),
        upserts: count("upserts"),
        tombstones: count("tombstones"),
        dead_letters: count("dead_letters"),
        dead_letters_by_reason: serde_json::from_value(value["dead_letters_by_reason"].clone())
            .unwrap_or_default(),
        stale: count("stale"),
        duplicates: count("duplicates"),
        reconciled: value["reconciled"].as_bool().unwrap_or(false),
        checkpoints: count("checkpoints"),
        elapsed_seconds: number("elapsed_seconds"),
        events_per_second: number("events_per_second"),
        latency_p50_ms: number("latency_p50_ms"),
        latency_p99_ms: number("latency_p99_ms"),
        latency_max_ms: number("latency_max_ms"),
        source_lag_p50_ms: value["source_lag_p50_ms"].as_f64(),
        source_lag_p99_ms: value["source_lag_p99_ms"].as_f64(),
        peak_rss_mb: number("peak_rss_mb"),
        cpu_seconds: number("cpu_seconds"),
        unchanged: count("unchanged"),
        market_reevaluations: count("market_reevaluations"),
        market_documents: count("market_documents"),
        market_scored: count("market_scored"),
        fan_out: number("fan_out"),
        state_open_seconds: number("state_open_seconds"),
        arrangement_member_bytes: count("arrangement_member_bytes"),
        arrangement_statistics_bytes: count("arrangement_statistics_bytes"),
        worker_busy_seconds: number("worker_busy_seconds"),
        worker_source_empty_seconds: number("worker_source_empty_seconds"),
        worker_back_pressured_seconds: number("worker_back_pressured_seconds"),
        worker_checkpoint_seconds: number("worker_checkpoint_seconds"),
        ..RunSummary::default()
    })
}

fn run_one(
    topology: &Path,
    dir: &Path,
    name: &str,
    input: &Path,
    workers: usize,
    epoch_records: u64,
    pass_through: bool,
) -> anyhow::Result<RunSummary> {
    let run_dir = dir.join(name);
    std::fs::create_dir_all(&run_dir)?;
    let config = run_dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nworkers = {workers}\nepoch_records = {epoch_records}\nprogress = \"never\"\n\n[state]\ndir = {:?}\n\n\
         [bindings.listing_changes]\ntype = \"file\"\npath = {:?}\npartitions = 8\n\n\
         [bindings.search_documents]\ntype = \"file\"\npath = {:?}\n\n[bindings.dead_letters]\ntype = \"file\"\npath = {:?}\n",
            run_dir.join("state"),
            input,
            run_dir.join("documents.jsonl"),
            run_dir.join("dead_letters.jsonl")
        ),
    )?;
    let summary_path = run_dir.join("summary.json");
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("run")
        .arg(topology)
        .arg("--config")
        .arg(&config)
        .args(["--from-scratch", "--progress", "never", "--summary-json"])
        .arg(&summary_path);
    if pass_through {
        command.arg("--pass-through");
    }
    eprintln!("bench: {name} ...");
    let output = command
        .output()
        .with_context(|| format!("running {name}"))?;
    if !output.status.success() {
        bail!(
            "{name} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    summary_from(&summary_path)
}

pub fn run(
    topology: &Path,
    events: u64,
    live_listings: u64,
    workers: &[usize],
    epoch_records: u64,
    dir: &Path,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let sample = topology
        .parent()
        .unwrap_or(Path::new("."))
        .join("listings/data/listing_changes.jsonl");
    let mixed: PathBuf = dir.join(format!("mixed-{events}.jsonl"));
    if !mixed.exists() {
        eprintln!("bench: generating {events} events into {}", mixed.display());
        generate(&sample, &mixed, events, Workload::Mixed, 42)?;
    }
    let mut measurements = Vec::new();
    for &w in workers {
        for (label, pass_through) in [("pass-through", true), ("full", false)] {
            let summary = run_one(
                topology,
                dir,
                &format!("{label}-{w}w"),
                &mixed,
                w,
                epoch_records,
                pass_through,
            )?;
            measurements.push(Measurement {
                label: label.to_string(),
                workers: w,
                summary,
            });
        }
    }
    let mut memory = None;
    if live_listings > 0 {
        // ~14 % of the sample's creates are dead-lettered (its real noise): generate
        // enough creates that about `live_listings` survive validation
        let create_count = (live_listings as f64 / 0.86).ceil() as u64;
        let creates = dir.join(format!("creates-{create_count}.jsonl"));
        if !creates.exists() {
            eprintln!(
                "bench: generating {create_count} creates into {}",
                creates.display()
            );
            generate(&sample, &creates, create_count, Workload::CreatesOnly, 43)?;
        }
        memory = Some(run_one(
            topology,
            dir,
            "memory-1w",
            &creates,
            1,
            epoch_records,
            false,
        )?);
    }

    println!(
        "\nassay bench: {events} generated events (mix and noise of the sample), epoch_records = {epoch_records}"
    );
    println!(
        "{:<14} {:>7} {:>12} {:>10} {:>10} {:>10} {:>11} {:>10}",
        "pipeline",
        "workers",
        "events/s",
        "per worker",
        "p50 ms",
        "p99 ms",
        "peak RSS MB",
        "vs pass"
    );
    for m in &measurements {
        let baseline = measurements
            .iter()
            .find(|b| b.label == "pass-through" && b.workers == m.workers)
            .map(|b| b.summary.events_per_second)
            .unwrap_or(f64::NAN);
        println!(
            "{:<14} {:>7} {:>12.0} {:>10.0} {:>10.2} {:>10.2} {:>11.1} {:>9.0}%",
            m.label,
            m.workers,
            m.summary.events_per_second,
            m.summary.events_per_second / m.workers as f64,
            m.summary.latency_p50_ms,
            m.summary.latency_p99_ms,
            m.summary.peak_rss_mb,
            100.0 * m.summary.events_per_second / baseline
        );
        if !m.summary.reconciled {
            println!(
                "  warning: counts did not reconcile for {} on {} workers",
                m.label, m.workers
            );
        }
    }
    if let Some(memory) = memory {
        // upserts of a creates-only stream: one per live listing, plus market re-emissions
        let live = memory.upserts - memory.market_documents;
        println!(
            "\nmemory: {} creates, {} live listings after validation: peak RSS {:.1} MB ({:.0} bytes per live listing), {:.0} events/s",
            memory.records_in,
            live,
            memory.peak_rss_mb,
            memory.peak_rss_mb * 1048576.0 / live.max(1) as f64,
            memory.events_per_second
        );
    }
    println!(
        "\nlatency is per event, from the source reading it to the sink writing it; figures are from one run on this machine"
    );
    Ok(())
}
