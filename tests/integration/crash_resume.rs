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
    let positions = open_store(config).positions("listing_changes").unwrap();
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
    let status = run_engine(assay(), &clean.path);
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

    let mut command = assay();
    command.env("ASSAY_BINDINGS__LISTING_CHANGES__RECORDS_PER_SECOND", "0");
    let status = run_engine(command, &crashed.path);
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

/// A listing of the key's partition (`partitions = 8` in `write_config`)
/// owned by `worker` of two (worker w owns the partitions p with p % 2 == w).
fn keys_of_worker(worker: u64, count: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("lst-{i:05}"))
        .filter(|key| assay::hash::fnv1a(key.as_bytes()) % 8 % 2 == worker)
        .take(count)
        .collect()
}

fn open_store(config: &TestConfig) -> assay::state::Store {
    let prepared = assay::prepare(&listings_topology(), Some(&config.path), &[]).unwrap();
    let tuning = assay::state::StoreTuning {
        block_cache_bytes: 1 << 20,
        write_buffer_bytes: 1 << 20,
    };
    assay::state::Store::open(
        &config.state.join(&prepared.plan.name),
        &prepared.plan.field_fingerprint(),
        tuning,
    )
    .unwrap()
}

/// A checkpoint holds the state as of its epoch and nothing later, also on
/// a worker that has no event of its own after it. Worker 1's listings are
/// created, then only worker 0's listings in the same segment change price:
/// every one of those epochs re-evaluates worker 1's listings there, with no
/// event for worker 1's state stage. The engine dies (as by `kill -9`) right
/// after a checkpoint is durable; worker 1's stored listings must then equal
/// those of a clean run of the input up to worker 1's checkpointed position.
/// (Before stop 35 the decisions of epochs past the checkpoint's went into
/// it on such a worker; a restart replayed the moves, found the stored views
/// already moved, and never delivered those documents again.)
///
/// Whether worker 1 evaluated an epoch past the checkpoint's before the
/// checkpoint was written is a race (with the fix taken out, one kill point
/// in about six showed the hole), so the test dies at 24 kill points, each a
/// fresh run. The 30,000 price changes keep the last kill point well inside
/// the run on a quiet machine too (with 3,000, an idle machine finished the
/// run before the 13th checkpoint).
#[test]
fn a_checkpoint_on_a_worker_without_events_holds_no_later_decision() {
    for kill_after in 2..26 {
        checkpoint_on_a_worker_without_events(kill_after);
    }
}

fn checkpoint_on_a_worker_without_events(kill_after: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (mine, theirs) = (keys_of_worker(1, 12), keys_of_worker(0, 12));
    let mut lines = Vec::new();
    let create = |key: &str, price: u64| {
        format!(
            r#"{{"kind":"create","listing_id":"{key}","version":1,"event_time":1640995600,"price":{price},"model":"c-class","year":2017,"state":"ca","odometer":40000,"condition":"good"}}"#
        )
    };
    for (index, key) in mine.iter().chain(&theirs).enumerate() {
        lines.push(create(key, 20_000 + 500 * index as u64));
    }
    for step in 0..30000u64 {
        let key = &theirs[step as usize % theirs.len()];
        let version = 2 + step / theirs.len() as u64;
        // prices that move the segment's statistics at every step
        let price = 15_000 + (step * 7919) % 20_000;
        lines.push(format!(
            r#"{{"kind":"price_change","listing_id":"{key}","version":{version},"event_time":{},"price":{price}}}"#,
            1640995600 + 60 * (step + 1)
        ));
    }
    let input = dir.path().join("input.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();

    let crashed_dir = dir.path().join("crashed");
    std::fs::create_dir_all(&crashed_dir).unwrap();
    let crashed = write_config(&crashed_dir, &input, 2, 8, "");
    let text = std::fs::read_to_string(&crashed.path).unwrap().replace(
        "checkpoint_interval_ms = 100\n",
        "checkpoint_interval_ms = 5\n",
    );
    std::fs::write(&crashed.path, text).unwrap();
    let mut command = assay_command();
    command.env("ASSAY_TEST_KILL_AFTER_CHECKPOINTS", kill_after.to_string());
    let status = run_engine(command, &crashed.path);
    assert!(
        !status.success(),
        "the run was to die after {kill_after} checkpoints"
    );

    let store = open_store(&crashed);
    let positions = store.positions("listing_changes").unwrap();
    let worker_one: BTreeSet<u64> = positions
        .iter()
        .filter(|(partition, _)| **partition % 2 == 1)
        .map(|(_, position)| position.next_offset)
        .collect();
    assert_eq!(worker_one.len(), 1, "worker 1's partitions: {positions:?}");
    let through = *worker_one.first().unwrap() as usize;
    assert!(
        through > mine.len() + theirs.len() && through < lines.len(),
        "worker 1 checkpointed in the middle of the price changes ({through} of {})",
        lines.len()
    );

    // the oracle: the input up to that position, run to its end
    let oracle_dir = dir.path().join("oracle");
    std::fs::create_dir_all(&oracle_dir).unwrap();
    let prefix = dir.path().join("prefix.jsonl");
    std::fs::write(&prefix, lines[..through].join("\n") + "\n").unwrap();
    let oracle = write_config(&oracle_dir, &prefix, 2, 8, "");
    let summary = run_in_process(&listings_topology(), &oracle, true);
    assert!(summary.reconciled, "{summary:?}");
    assert!(summary.market_reevaluations > 0);
    let oracle_store = open_store(&oracle);

    let state_keys: Vec<Vec<u8>> = mine
        .iter()
        .map(|key| {
            let partition = (assay::hash::fnv1a(key.as_bytes()) % 8) as u32;
            assay::state::Store::state_key(partition, key)
        })
        .collect();
    let checkpointed = store.get_many(&state_keys).unwrap();
    let expected = oracle_store.get_many(&state_keys).unwrap();
    for ((key, checkpointed), expected) in mine.iter().zip(checkpointed).zip(expected) {
        // the gate's memory and the market view (by bits: NaN is "no statistic")
        let memory = |state: assay::state::ListingState| {
            let view: Vec<u64> = state.market.iter().map(|x| x.to_bits()).collect();
            (state.emitted_hash, state.revision, view)
        };
        assert_eq!(
            memory(checkpointed.unwrap()),
            memory(expected.unwrap()),
            "{key}: the checkpoint through line {through} holds a later decision (killed after {kill_after} checkpoints)"
        );
    }
}
