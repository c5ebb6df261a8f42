//! `kill -9` mid-run, then rerun: it resumes from the last checkpoint, and the
//! union of outputs equals an uninterrupted run's output apart from
//! duplicates of identical documents.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::common::*;

fn line_count(path: &std::path::Path) -> usize {
    std::fs::read(path)
        .map(|b| b.iter().filter(|c| **c == b'\n').count())
        .unwrap_or(0)
}

#[test]
fn killed_and_resumed_run_equals_a_clean_run() {
    killed_and_resumed_equals_clean("1", "1");
}

/// With a market window the checkpoints fall on window ends, so the resumed
/// run sees the windows the clean run saw and writes no document it does not.
/// A window of 5: the throttled run's first checkpoint proposal comes about
/// 12 epochs in, a window's end for a window of 3 whether aligned or not
/// (with the alignment removed this test passed with 3, and failed with 5:
/// documents lost by the crash).
#[test]
fn with_a_market_window_a_killed_and_resumed_run_equals_a_clean_run() {
    killed_and_resumed_equals_clean("5", "1");
}

/// Staggered windows (5 epochs in 5 groups): checkpoints fall only on the
/// sync points, every 4 windows (20 epochs) by default, where every group's
/// window has ended. (Aligned to window ends instead, the first checkpoint
/// fell on epoch 15 and this test failed.)
#[test]
fn with_staggered_market_windows_a_killed_and_resumed_run_equals_a_clean_run() {
    killed_and_resumed_equals_clean("5", "5");
}

/// The epochs a restart would rebuild at, from the checkpointed positions of
/// every input partition (a file's epoch is its line number over
/// `epoch_records`).
fn checkpointed_epochs(config: &TestConfig, epoch_records: u64) -> BTreeSet<u64> {
    let prepared = assay::prepare(&listings_topology(), Some(&config.path), &[]).unwrap();
    let tuning = assay::state::StoreTuning {
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
    };
    let store = assay::state::Store::open(
        &config.state.join(&prepared.plan.name),
        &prepared.plan.field_fingerprint(),
        tuning,
    )
    .unwrap();
    let positions = store.positions(&prepared.plan.input_binding).unwrap();
    positions
        .values()
        .map(|position| position.next_offset / epoch_records)
        .collect()
}

fn killed_and_resumed_equals_clean(market_window_epochs: &str, market_window_phases: &str) {
    let assay = || {
        let mut command = assay_command();
        command.env("ASSAY_RUNTIME__MARKET_WINDOW_EPOCHS", market_window_epochs);
        command.env("ASSAY_RUNTIME__MARKET_WINDOW_PHASES", market_window_phases);
        command
    };
    // the uninterrupted run
    let clean_dir = tempfile::tempdir().unwrap();
    let clean = write_config(clean_dir.path(), &sample_stream(), 2, 256, "");
    let status = assay()
        .args(["run", "topologies/listings.toml", "--config"])
        .arg(&clean.path)
        .status()
        .unwrap();
    assert!(status.success());

    // the crashed run: throttled so that it is mid-stream when killed
    let dir = tempfile::tempdir().unwrap();
    let crashed = write_config(
        dir.path(),
        &sample_stream(),
        2,
        256,
        "records_per_second = 4000",
    );
    let mut child = spawn_engine(assay(), &crashed.path);
    let deadline = Instant::now() + Duration::from_secs(60);
    while line_count(&crashed.documents) < 8000 {
        assert!(
            Instant::now() < deadline,
            "the run produced too little output to be killed mid-stream"
        );
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no destructor, no flush, no final checkpoint
    child.kill();
    // the restart rebuilds the market at the checkpoint's epoch: a sync point,
    // where every segment's window has ended (at any other epoch, moves still
    // waiting for their window's end would never re-evaluate anyone)
    let runtime = assay::config::RuntimeConfig {
        market_window_epochs: market_window_epochs.parse().unwrap(),
        market_window_phases: market_window_phases.parse().unwrap(),
        ..Default::default()
    };
    let sync_epochs = runtime.market_sync_epochs();
    let rebuild_epochs = checkpointed_epochs(&crashed, 256);
    assert!(
        !rebuild_epochs.is_empty(),
        "killed before the first checkpoint"
    );
    for epoch in rebuild_epochs {
        assert_eq!(
            epoch % sync_epochs,
            0,
            "a checkpoint at epoch {epoch}, between sync points {sync_epochs} apart"
        );
    }
    let before_restart = line_count(&crashed.documents);
    let total_documents = line_count(&clean.documents);
    assert!(
        before_restart < total_documents,
        "killed after the end ({before_restart} of {total_documents})"
    );

    let status = assay()
        .args(["run", "topologies/listings.toml", "--config"])
        .arg(&crashed.path)
        .env("ASSAY_BINDINGS__LISTING_CHANGES__RECORDS_PER_SECOND", "0")
        .status()
        .unwrap();
    assert!(status.success());

    for (name, clean_path, crashed_path) in [
        ("documents", &clean.documents, &crashed.documents),
        ("dead letters", &clean.dead_letters, &crashed.dead_letters),
    ] {
        let clean_lines = read_lines(clean_path);
        let crashed_lines = read_lines(crashed_path);
        let clean_set: BTreeSet<&String> = clean_lines.iter().collect();
        let crashed_set: BTreeSet<&String> = crashed_lines.iter().collect();
        assert_eq!(
            clean_set.len(),
            clean_lines.len(),
            "the clean run's {name} has no duplicates"
        );
        let missing: Vec<_> = clean_set.difference(&crashed_set).take(3).collect();
        assert!(missing.is_empty(), "{name} lost by the crash: {missing:?}");
        let extra: Vec<_> = crashed_set.difference(&clean_set).take(3).collect();
        assert!(
            extra.is_empty(),
            "{name} that a clean run does not produce: {extra:?}"
        );
        assert!(crashed_lines.len() >= clean_lines.len());
    }
    // the resumed run did not start from the beginning
    assert!(
        line_count(&crashed.documents) < before_restart + total_documents,
        "the rerun replayed everything: no checkpoint was used"
    );
}

/// State deleted by hand (or a config pointing at a new state directory)
/// while the output files still hold a run's documents: a rerun would read
/// the input from its beginning and append a second copy. It is refused with
/// the file named; `--from-scratch` starts afresh and gives the same output.
#[test]
fn a_new_state_beside_old_outputs_is_refused_and_from_scratch_starts_afresh() {
    let dir = tempfile::tempdir().unwrap();
    let input = sample_prefix(dir.path(), 400);
    let config = write_config(dir.path(), &input, 1, 64, "");
    let first = run_in_process(&listings_topology(), &config, false);
    assert!(first.documents_emitted > 0);
    let documents = std::fs::read(&config.documents).unwrap();

    // the state is there: the rerun resumes and adds nothing
    let resumed = run_in_process(&listings_topology(), &config, false);
    assert_eq!(resumed.records_in, 0, "{resumed:?}");
    assert_eq!(std::fs::read(&config.documents).unwrap(), documents);

    std::fs::remove_dir_all(&config.state).unwrap();
    let prepared = assay::prepare(&listings_topology(), Some(&config.path), &[]).unwrap();
    let options = assay::dataflow::RunOptions {
        from_scratch: false,
        progress: Some(false),
        pass_through: false,
    };
    match assay::dataflow::run(prepared.plan, &prepared.config, prepared.models, &options) {
        Err(error @ assay::dataflow::RunError::OutputWithoutState { .. }) => {
            let message = error.to_string();
            assert!(
                message.contains(&config.documents.display().to_string())
                    && message.contains("--from-scratch"),
                "{message}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&config.documents).unwrap(),
        documents,
        "the refused run wrote nothing"
    );
    assert!(
        !config.state.exists(),
        "the refused run left no state behind"
    );

    let afresh = run_in_process(&listings_topology(), &config, true);
    assert_eq!(afresh.records_in, first.records_in);
    assert_eq!(std::fs::read(&config.documents).unwrap(), documents);
}
