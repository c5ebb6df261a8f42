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
