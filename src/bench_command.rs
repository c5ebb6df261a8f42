//! `assay bench`: runs each measurement in a child process (its own peak RSS)
//! and prints the figures as ratios against the pass-through baseline
//! measured in the same invocation.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use assay::bench::{Workload, core_topology, generate};
use assay::observe::RunSummary;

struct Measurement {
    label: String,
    workers: usize,
    summary: RunSummary,
}

pub fn summary_from(path: &Path) -> anyhow::Result<RunSummary> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

#[expect(
    clippy::too_many_arguments,
    reason = "one bench row's settings, passed from one call site per row kind"
)]
fn run_one(
    topology: &Path,
    dir: &Path,
    name: &str,
    input: &Path,
    workers: usize,
    epoch_records: u64,
    market_window_epochs: u64,
    pass_through: bool,
) -> anyhow::Result<RunSummary> {
    let run_dir = dir.join(name);
    std::fs::create_dir_all(&run_dir)?;
    let config = run_dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[runtime]\nworkers = {workers}\nepoch_records = {epoch_records}\nmarket_window_epochs = {market_window_epochs}\nprogress = \"never\"\n\n[state]\ndir = {:?}\n\n\
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
    // The outputs are not read again, and a full run writes gigabytes: deleted
    // now, their dirty pages are dropped instead of being written back while
    // the next measurement runs (which cost the run after `full` up to a
    // quarter of its rate).
    let _ = std::fs::remove_file(run_dir.join("documents.jsonl"));
    let _ = std::fs::remove_file(run_dir.join("dead_letters.jsonl"));
    let _ = std::fs::remove_dir_all(run_dir.join("state"));
    summary_from(&summary_path)
}

pub fn run(
    topology: &Path,
    events: u64,
    live_listings: u64,
    workers: &[usize],
    epoch_records: u64,
    market_window_epochs: u64,
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
    let core = core_topology(topology, dir)?;
    // (label, topology, market window, pass-through)
    let window_label = format!("full-w{market_window_epochs}");
    let mut pipelines: Vec<(&str, &Path, u64, bool)> = vec![
        ("pass-through", topology, 1, true),
        ("full", topology, 1, false),
    ];
    // the same topology with neighbours re-evaluated once per window of
    // epochs (the config's `market_window_epochs`): what an operator trades
    // for throughput when the market part of documents may lag a little
    if market_window_epochs > 1 {
        pipelines.push((&window_label, topology, market_window_epochs, false));
    }
    if let Some(core) = &core {
        pipelines.push(("core", core, 1, false));
    }
    let mut measurements = Vec::new();
    for &w in workers {
        for &(label, topology, window, pass_through) in &pipelines {
            let summary = run_one(
                topology,
                dir,
                &format!("{label}-{w}w"),
                &mixed,
                w,
                epoch_records,
                window,
                pass_through,
            )?;
            measurements.push(Measurement {
                label: label.to_string(),
                workers: w,
                summary,
            });
        }
    }
    let (mut memory, mut core_memory) = (None, None);
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
            1,
            false,
        )?);
        if let Some(core) = &core {
            core_memory = Some(run_one(
                core,
                dir,
                "memory-core-1w",
                &creates,
                1,
                epoch_records,
                1,
                false,
            )?);
        }
    }

    println!(
        "\nassay bench: {events} generated events (mix and noise of the sample), epoch_records = {epoch_records}"
    );
    println!(
        "{:<14} {:>7} {:>12} {:>10} {:>10} {:>10} {:>11} {:>10} {:>10}",
        "pipeline",
        "workers",
        "events/s",
        "per worker",
        "p50 ms",
        "p99 ms",
        "peak RSS MB",
        "docs/event",
        "vs pass"
    );
    for m in &measurements {
        let baseline = measurements
            .iter()
            .find(|b| b.label == "pass-through" && b.workers == m.workers)
            .map(|b| b.summary.events_per_second)
            .unwrap_or(f64::NAN);
        println!(
            "{:<14} {:>7} {:>12.0} {:>10.0} {:>10.2} {:>10.2} {:>11.1} {:>10.2} {:>9.0}%",
            m.label,
            m.workers,
            m.summary.events_per_second,
            m.summary.events_per_second / m.workers as f64,
            m.summary.latency_p50_ms,
            m.summary.latency_p99_ms,
            m.summary.peak_rss_mb,
            m.summary.fan_out,
            100.0 * m.summary.events_per_second / baseline
        );
        if !m.summary.reconciled {
            println!(
                "  warning: counts did not reconcile for {} on {} workers",
                m.label, m.workers
            );
        }
    }
    for (label, memory) in [("full", memory), ("core", core_memory)] {
        let Some(memory) = memory else { continue };
        // upserts of a creates-only stream: one per live listing, plus market re-emissions
        let live = memory.upserts - memory.market_documents;
        println!(
            "{}memory ({label}): {} creates, {} live listings after validation: peak RSS {:.1} MB ({:.0} bytes per live listing), {:.0} events/s",
            if label == "full" { "\n" } else { "" },
            memory.records_in,
            live,
            memory.peak_rss_mb,
            memory.peak_rss_mb * 1048576.0 / live.max(1) as f64,
            memory.events_per_second
        );
    }
    if market_window_epochs > 1 {
        println!(
            "\n{window_label}: the full topology with market_window_epochs = {market_window_epochs}: neighbours re-evaluated once per\n\
             {market_window_epochs} epochs ({} events), so documents see statistics up to that much older",
            market_window_epochs * epoch_records
        );
    }
    if core.is_some() {
        println!(
            "\ncore: the topology without its [[aggregate]] blocks and what reads them (written to {}):\n\
             decode, per-listing state, features, scoring and shaping, without the market",
            dir.display()
        );
    }
    println!(
        "\ndocs/event: documents written (upserts and tombstones) per input event; with a market they\n\
         include the neighbours a market move re-emits, and a pipeline's rate falls with its documents"
    );
    println!(
        "\nlatency is per event, from the source reading it to the sink writing it; figures are from one run on this machine"
    );
    Ok(())
}
