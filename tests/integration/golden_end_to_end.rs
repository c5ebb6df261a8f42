//! Golden end-to-end case: the first 3,000 events of the committed sample
//! through the whole listings topology, compared with reviewed expected files.
//!
//! To accept a reviewed change of output: `ASSAY_BLESS=1 cargo nextest run --release golden`
//! and review the diff of tests/golden/ before committing it.

use crate::common::*;

const EVENTS: usize = 3000;

#[test]
fn golden_first_3000_events_of_the_sample() {
    let dir = tempfile::tempdir().unwrap();
    let input = sample_prefix(dir.path(), EVENTS);
    let config = write_config(dir.path(), &input, 1, 256, "");
    let summary = run_in_process(&listings_topology(), &config, true);
    assert!(summary.reconciled, "counts do not reconcile: {summary:?}");
    assert_eq!(summary.records_in, EVENTS as u64);

    let golden = repo().join("tests/golden/listings_first_3000");
    let documents = std::fs::read_to_string(&config.documents).unwrap();
    let dead_letters = std::fs::read_to_string(&config.dead_letters).unwrap();
    let counts = serde_json::json!({
        "records_in": summary.records_in,
        "upserts": summary.upserts,
        "tombstones": summary.tombstones,
        "dead_letters_by_reason": summary.dead_letters_by_reason,
        "stale": summary.stale,
        "duplicates": summary.duplicates,
        "unchanged": summary.unchanged,
        "market_documents": summary.market_documents,
        "market_reevaluations": summary.market_reevaluations,
        // market re-evaluations that ran the models: none, since the shipped
        // models read no statistics and reuse what the own evaluation kept
        "market_scored": summary.market_scored,
    });
    let counts = serde_json::to_string_pretty(&counts).unwrap() + "\n";
    if std::env::var_os("ASSAY_BLESS").is_some() {
        std::fs::create_dir_all(&golden).unwrap();
        std::fs::write(golden.join("expected_documents.jsonl"), &documents).unwrap();
        std::fs::write(golden.join("expected_dead_letters.jsonl"), &dead_letters).unwrap();
        std::fs::write(golden.join("expected_counts.json"), &counts).unwrap();
        return;
    }
    let expected_counts = std::fs::read_to_string(golden.join("expected_counts.json"))
        .expect("golden counts (bless with ASSAY_BLESS=1)");
    assert_eq!(
        counts, expected_counts,
        "summary counts differ from tests/golden"
    );
    let expected_documents =
        std::fs::read_to_string(golden.join("expected_documents.jsonl")).unwrap();
    for (index, (got, want)) in documents
        .lines()
        .zip(expected_documents.lines())
        .enumerate()
    {
        assert_eq!(
            got,
            want,
            "document line {} differs from tests/golden",
            index + 1
        );
    }
    assert_eq!(
        documents.lines().count(),
        expected_documents.lines().count(),
        "document count differs"
    );
    let expected_dead =
        std::fs::read_to_string(golden.join("expected_dead_letters.jsonl")).unwrap();
    assert_eq!(
        dead_letters, expected_dead,
        "dead letters differ from tests/golden"
    );
}
