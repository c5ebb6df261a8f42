//! The same input and config give the same output, byte for byte; and the
//! output does not depend on the number of workers.

use crate::common::*;

#[test]
fn same_input_twice_gives_identical_bytes_and_workers_do_not_change_output() {
    let mut outputs = Vec::new();
    for workers in [1, 1, 2] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &sample_stream(), workers, 512, "");
        let summary = run_in_process(&listings_topology(), &config, true);
        assert!(summary.reconciled, "{summary:?}");
        outputs.push((
            std::fs::read(&config.documents).unwrap(),
            std::fs::read(&config.dead_letters).unwrap(),
        ));
    }
    assert!(!outputs[0].0.is_empty());
    assert!(outputs[0] == outputs[1], "two runs with one worker differ");
    assert!(
        outputs[0] == outputs[2],
        "two workers give different output from one"
    );
}

/// The limit on market re-evaluations per epoch applies to live inputs only:
/// a file is a replay whose bytes are a function of its lines, and listings
/// drained from a queue tick by tick would make them one of timing too. So a
/// file run with a limit (and a window, where it would bite) writes the bytes
/// of a run without, on one worker and on two, paced or not.
#[test]
fn a_file_input_ignores_the_limit_on_market_re_evaluations() {
    let mut outputs = Vec::new();
    for (workers, pace, limit) in [
        (1, "", 0),
        (1, "", 3),
        (2, "", 3),
        (2, "records_per_second = 5000", 3),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &sample_stream(), workers, 128, pace);
        let text = std::fs::read_to_string(&config.path).unwrap().replace(
            "checkpoint_interval_ms = 100\n",
            &format!("checkpoint_interval_ms = 20\nmarket_window_epochs = 8\nmarket_evaluations_per_epoch_and_partition = {limit}\n"),
        );
        std::fs::write(&config.path, text).unwrap();
        let summary = run_in_process(&listings_topology(), &config, true);
        assert!(summary.reconciled, "{summary:?}");
        assert_eq!(
            summary.market_waited, 0,
            "{workers} worker(s), limit {limit}"
        );
        assert!(summary.market_reevaluations > 0);
        outputs.push(std::fs::read(&config.documents).unwrap());
    }
    assert!(!outputs[0].is_empty());
    for (index, output) in outputs.iter().enumerate().skip(1) {
        assert!(
            *output == outputs[0],
            "run {index} with the limit differs from the run without"
        );
    }
}

/// A paced replay (`records_per_second`) reads like a live source: part of an
/// epoch, then steps, then more, with checkpoints written in the background
/// meanwhile. A file's epochs must still be a pure function of line numbers
/// (a checkpoint may not close one early), so the bytes are those of an
/// unpaced run, market window and all.
#[test]
fn a_paced_replay_with_checkpoints_gives_the_bytes_of_an_unpaced_one() {
    let mut outputs = Vec::new();
    // The paced run must outrun its pace for its source to be seen empty:
    // at 10,000 records/s, with the machine's two cores shared with other
    // tests and a build, it was barely faster (10,298/s, its workers waiting
    // 2.3 s for a core) and saw 0.16 s of empty source. At half that pace a
    // starved run still has ample slack.
    for pace in ["", "records_per_second = 5000"] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &sample_stream(), 2, 128, pace);
        let text = std::fs::read_to_string(&config.path).unwrap().replace(
            "checkpoint_interval_ms = 100\n",
            "checkpoint_interval_ms = 20\nmarket_window_epochs = 8\n",
        );
        std::fs::write(&config.path, text).unwrap();
        let summary = run_in_process(&listings_topology(), &config, true);
        assert!(summary.reconciled, "{summary:?}");
        // the worker time says which run waited for its source
        assert!(summary.worker_busy_seconds > 0.0, "{summary:?}");
        if pace.is_empty() {
            assert!(summary.worker_source_empty_seconds < 0.05, "{summary:?}");
        } else {
            assert!(summary.worker_source_empty_seconds > 0.2, "{summary:?}");
        }
        outputs.push((
            summary.checkpoints,
            std::fs::read(&config.documents).unwrap(),
            std::fs::read(&config.dead_letters).unwrap(),
        ));
    }
    let (paced_checkpoints, paced_documents, paced_dead_letters) = &outputs[1];
    // the sample (22,115 records) takes about 4.4 s at this pace:
    // checkpoints fell inside it
    assert!(*paced_checkpoints >= 6, "{paced_checkpoints} checkpoints");
    assert!(!paced_documents.is_empty());
    assert!(
        *paced_documents == outputs[0].1,
        "the paced run's documents differ"
    );
    assert!(
        *paced_dead_letters == outputs[0].2,
        "the paced run's dead letters differ"
    );
}

/// Without aggregates nothing else holds the state stage to the evaluator, and
/// small epochs let it run ahead. An event applied before its predecessor's
/// document was decided compared against an older document, so runs of the
/// same input re-sent a few identical documents more or fewer, and one
/// worker's bytes differed from two workers'. The stage now always waits for
/// the evaluator's previous epoch.
#[test]
fn a_topology_without_aggregates_gives_the_same_bytes_on_one_and_two_workers() {
    let topology_dir = tempfile::tempdir().unwrap();
    let core = assay::bench::core_topology(&listings_topology(), topology_dir.path())
        .unwrap()
        .expect("the listings topology has aggregates");
    let mut outputs = Vec::new();
    for workers in [1, 2, 2] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), &sample_stream(), workers, 16, "");
        let summary = run_in_process(&core, &config, true);
        assert!(summary.reconciled, "{summary:?}");
        assert_eq!(summary.market_reevaluations, 0);
        outputs.push(std::fs::read(&config.documents).unwrap());
    }
    assert!(!outputs[0].is_empty());
    assert!(outputs[1] == outputs[2], "two runs with two workers differ");
    assert!(
        outputs[0] == outputs[1],
        "two workers give different output from one"
    );
}
