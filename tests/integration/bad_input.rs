//! Bad input is data: every malformed record goes to the dead letters with
//! the right reason, its original bytes and its position, the pipeline goes
//! on, and the counts reconcile.

use crate::common::*;
use base64::Engine;

fn line(json: &str) -> Vec<u8> {
    json.as_bytes().to_vec()
}

#[test]
fn every_bad_record_is_dead_lettered_with_its_reason_and_bytes() {
    let create = |id: &str, extra: &str| {
        format!(
            r#"{{"kind":"create","listing_id":"{id}","version":1,"event_time":1640995200,"price":20000,"model":"c-class","year":2015{extra}}}"#
        )
    };
    let huge = format!(
        r#"{{"kind":"create","listing_id":"huge","version":1,"event_time":1640995200,"price":20000,"model":"c-class","year":2015,"description":"{}"}}"#,
        "x".repeat(10 * 1024 * 1024)
    );
    let mut non_utf8 = line(
        r#"{"kind":"create","listing_id":"bytes","version":1,"event_time":1640995200,"price":20000,"model":""#,
    );
    non_utf8.extend_from_slice(&[0xff, 0xfe, 0x80]);
    non_utf8.extend_from_slice(br#"","year":2015}"#);

    // (record, expected reason or None for a good record)
    let corpus: Vec<(Vec<u8>, Option<&str>)> = vec![
        (line(&create("good-1", "")), None),
        (
            line(r#"{"kind":"create","listing_id":"trunc","version":1,"event_ti"#),
            Some("invalid_json"),
        ),
        (
            line(&create("types", r#","odometer":"lots""#)),
            Some("wrong_type"),
        ),
        (
            line(
                r#"{"kind":"create","listing_id":"price-zero","version":1,"event_time":1640995200,"price":0,"model":"c-class","year":2015}"#,
            ),
            Some("out_of_range"),
        ),
        (
            line(
                r#"{"kind":"create","listing_id":"old","version":1,"event_time":1640995200,"price":9000,"model":"other","year":1929}"#,
            ),
            Some("out_of_range"),
        ),
        (
            line(
                r#"{"kind":"teleport","listing_id":"good-1","version":2,"event_time":1640995300}"#,
            ),
            Some("unknown_kind"),
        ),
        (non_utf8, Some("not_utf8")),
        (line(&huge), Some("record_too_large")),
        (
            line(
                r#"{"kind":"create","version":1,"event_time":1640995200,"price":20000,"model":"c-class","year":2015}"#,
            ),
            Some("missing_key"),
        ),
        (line(r#"[1,2,3]"#), Some("not_an_object")),
        (
            line(
                r#"{"kind":"create","listing_id":"nover","event_time":1640995200,"price":20000,"model":"c-class","year":2015}"#,
            ),
            Some("missing_version"),
        ),
        (
            line(
                r#"{"kind":"create","listing_id":"when","version":1,"event_time":"yesterday","price":20000,"model":"c-class","year":2015}"#,
            ),
            Some("bad_event_time"),
        ),
        (
            line(&create("mint", r#","condition":"mint""#)),
            Some("not_allowed"),
        ),
        (
            line(
                r#"{"kind":"create","listing_id":"nomodel","version":1,"event_time":1640995200,"price":20000,"year":2015}"#,
            ),
            Some("missing_required"),
        ),
        (
            line(
                r#"{"kind":"price_change","listing_id":"never-created","version":2,"event_time":1640995300,"price":19000}"#,
            ),
            Some("unknown_listing"),
        ),
        (
            line(
                r#"{"kind":"price_change","listing_id":"good-1","version":2,"event_time":1640995400,"price":19000}"#,
            ),
            None,
        ),
        (
            line(
                r#"{"kind":"price_change","listing_id":"good-1","version":2,"event_time":1640995400,"price":19000}"#,
            ),
            None,
        ), // duplicate
        (
            line(
                r#"{"kind":"edit","listing_id":"good-1","version":1,"event_time":1640995200,"odometer":5}"#,
            ),
            None,
        ), // stale
        (
            line(
                r#"{"kind":"remove","listing_id":"good-1","version":3,"event_time":1640995500,"reason":"sold"}"#,
            ),
            None,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.jsonl");
    let mut bytes = Vec::new();
    for (record, _) in &corpus {
        bytes.extend_from_slice(record);
        bytes.push(b'\n');
    }
    std::fs::write(&input, &bytes).unwrap();
    let config = write_config(dir.path(), &input, 1, 4, "");
    let summary = run_in_process(&listings_topology(), &config, true);

    let expected: Vec<(usize, &str)> = corpus
        .iter()
        .enumerate()
        .filter_map(|(i, (_, r))| r.map(|r| (i, r)))
        .collect();
    let letters: Vec<serde_json::Value> = read_lines(&config.dead_letters)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), expected.len(), "dead letters: {letters:#?}");
    for (letter, (line_number, reason)) in letters.iter().zip(&expected) {
        assert_eq!(letter["reason"], *reason, "line {line_number}: {letter}");
        assert_eq!(
            letter["source"]["offset"], *line_number as u64,
            "position of {reason}"
        );
        assert!(!letter["detail"].as_str().unwrap().is_empty());
        let original = base64::engine::general_purpose::STANDARD
            .decode(letter["bytes_base64"].as_str().unwrap())
            .unwrap();
        assert_eq!(
            original, corpus[*line_number].0,
            "the original bytes of line {line_number} are kept"
        );
    }
    assert_eq!(summary.records_in, corpus.len() as u64);
    assert_eq!(summary.dead_letters, expected.len() as u64);
    assert_eq!(
        (
            summary.upserts,
            summary.tombstones,
            summary.duplicates,
            summary.stale
        ),
        (2, 1, 1, 1),
        "{summary:?}"
    );
    assert!(summary.reconciled);
    // a file's records carry no append time: no source lag to report
    assert_eq!(summary.source_lag_p50_ms, None);
    let documents = read_lines(&config.documents);
    assert_eq!(documents.len(), 3);
    assert!(
        documents[2].contains(r#""op":"delete","doc":null"#),
        "{}",
        documents[2]
    );
}
