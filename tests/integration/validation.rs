//! A malformed topology or config gets every error at once, with file, line,
//! column and a hint; `assay validate` exits non-zero and `assay run` refuses
//! to start.

use std::process::Command;

use crate::common::*;

/// The listings topology with three independent mistakes.
fn broken_topology(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(listings_topology()).unwrap();
    let text = text
        .replacen("description = ", "descripton = ", 1) // unknown key (line of `description`)
        .replacen(
            "type = \"integer\"\nrequired = true\nmin = 1950",
            "type = \"integer\"\nrequired = \"yes\"\nmin = 1950",
            1,
        ) // wrong type
        .replacen(
            "denominator = \"vehicle_age_years\"",
            "denominator = \"vehicle_age\"",
            1,
        ) // unknown reference
        .replacen(
            "onnx = \"listings/models/days_to_sell.onnx\"",
            "onnx = \"listings/models/missing.onnx\"",
            1,
        ); // missing file
    std::fs::create_dir_all(dir.join("listings")).unwrap();
    let copy = dir.join("listings.toml");
    std::fs::write(&copy, &text).unwrap();
    // the models and lookup tables are referenced relative to the topology
    std::os::unix::fs::symlink(
        repo().join("topologies/listings/models"),
        dir.join("listings/models"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        repo().join("topologies/listings/data"),
        dir.join("listings/data"),
    )
    .unwrap();
    copy
}

fn line_of(path: &std::path::Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .position(|l| l.contains(needle))
        .unwrap()
        + 1
}

#[test]
fn syntax_level_mistakes_are_all_reported_with_lines() {
    let dir = tempfile::tempdir().unwrap();
    let topology = broken_topology(dir.path());
    let errors = match assay::topology::load(&topology) {
        Err(diagnostics) => diagnostics.errors,
        Ok(_) => panic!("a broken topology was accepted"),
    };
    let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
    assert!(
        lines.contains(&line_of(&topology, "descripton")),
        "{errors:#?}"
    );
    assert!(
        lines.contains(&line_of(&topology, "required = \"yes\"")),
        "{errors:#?}"
    );
    assert!(
        errors.iter().all(|e| e.hint.is_some()),
        "every error has a hint: {errors:#?}"
    );
}

#[test]
fn reference_mistakes_are_all_reported_with_lines_and_hints() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(broken_topology(dir.path()))
        .unwrap()
        .replacen("descripton = ", "description = ", 1)
        .replacen("required = \"yes\"", "required = true", 1);
    let topology = dir.path().join("listings.toml");
    std::fs::write(&topology, text).unwrap();
    let errors = assay::topology::load(&topology)
        .expect_err("rejected")
        .errors;
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert_eq!(
        errors[0].line,
        line_of(&topology, "denominator = \"vehicle_age\"")
    );
    assert!(errors[0].message.contains("vehicle_age"), "{}", errors[0]);
    assert_eq!(
        errors[0].hint.as_deref(),
        Some("did you mean `vehicle_age_years`?")
    );
    assert_eq!(errors[1].line, line_of(&topology, "missing.onnx"));
    assert!(errors[1].column > 1);
}

#[test]
fn validate_command_prints_every_error_and_run_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let topology = broken_topology(dir.path());
    let config = write_config(dir.path(), &sample_stream(), 1, 256, "colour = \"blue\"");
    for command in ["validate", "run"] {
        let output = Command::new(env!("CARGO_BIN_EXE_assay"))
            .arg(command)
            .arg(&topology)
            .arg("--config")
            .arg(&config.path)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{command}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        for needle in [
            "descripton",
            "required",
            "vehicle_age",
            "missing.onnx",
            "colour",
            "hint:",
            "nothing was started",
        ] {
            assert!(
                stderr.contains(needle),
                "{command}: `{needle}` missing from:\n{stderr}"
            );
        }
    }
    assert!(
        !config.documents.exists(),
        "run wrote output although validation failed"
    );
}

/// `assay validate` of the listings topology with `args` after it succeeds.
fn assert_validates(args: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_assay"))
        .current_dir(repo())
        .args(["validate", "topologies/listings.toml"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_shipped_topology_and_default_config_validate() {
    assert_validates(&[]);
}

#[test]
fn the_shipped_kafka_config_validates() {
    assert_validates(&["--config", "config/kafka.toml"]);
}

/// A market window's phases must fit in it: each group's window ends K / P
/// epochs after the previous one's, and with more groups than epochs some
/// would share an end. Reported with the value and the window.
#[test]
fn more_market_window_phases_than_epochs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    let config = |phases: u64| {
        std::fs::write(
            &path,
            format!(
                "[runtime]\nmarket_window_epochs = 25\nmarket_window_phases = {phases}\n\n\
                 [bindings.listing_changes]\ntype = \"file\"\npath = \"in.jsonl\"\n"
            ),
        )
        .unwrap();
        assay::config::load(Some(&path), &[], None)
    };
    let errors = config(30).expect_err("30 phases in a window of 25").errors;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].message.contains("market_window_phases is 30")
            && errors[0].message.contains("(25)"),
        "{}",
        errors[0]
    );
    assert!(errors[0].hint.is_some());
    let errors = config(0).expect_err("0 phases").errors;
    assert!(
        errors[0].message.contains("market_window_phases is 0"),
        "{}",
        errors[0]
    );
    let loaded = config(5).expect("5 phases in a window of 25");
    assert_eq!(loaded.runtime.market_sync_epochs(), 100);
}
