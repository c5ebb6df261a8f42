//! Helpers shared by the integration tests: temp configs, runs, output reading.
#![allow(dead_code)]

pub mod broker;

use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn listings_topology() -> PathBuf {
    repo().join("topologies/listings.toml")
}

pub fn sample_stream() -> PathBuf {
    repo().join("topologies/listings/data/listing_changes.jsonl")
}

/// A config binding the listings topology to files in `dir`.
pub struct TestConfig {
    pub path: PathBuf,
    pub documents: PathBuf,
    pub dead_letters: PathBuf,
    pub state: PathBuf,
}

pub fn write_config(
    dir: &Path,
    input: &Path,
    workers: usize,
    epoch_records: u64,
    extra_input: &str,
) -> TestConfig {
    let documents = dir.join("out/search_documents.jsonl");
    let dead_letters = dir.join("out/dead_letters.jsonl");
    let state = dir.join("state");
    let text = format!(
        r#"[runtime]
workers = {workers}
epoch_records = {epoch_records}
checkpoint_interval_ms = 100
progress = "never"

[state]
dir = {state:?}

[bindings.listing_changes]
type = "file"
path = {input:?}
partitions = 8
{extra_input}

[bindings.search_documents]
type = "file"
path = {documents:?}

[bindings.dead_letters]
type = "file"
path = {dead_letters:?}
"#
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    TestConfig {
        path,
        documents,
        dead_letters,
        state,
    }
}

/// Runs the listings topology in-process with the given config.
pub fn run_in_process(
    topology: &Path,
    config: &TestConfig,
    from_scratch: bool,
) -> assay::observe::RunSummary {
    let prepared = assay::prepare(topology, Some(&config.path), &[])
        .unwrap_or_else(|e| panic!("prepare failed: {e}"));
    let options = assay::dataflow::RunOptions {
        from_scratch,
        progress: Some(false),
        pass_through: false,
    };
    assay::dataflow::run(prepared.plan, &prepared.config, prepared.models, &options)
        .unwrap_or_else(|e| panic!("run failed: {e}"))
}

pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

/// The first `n` lines of the committed sample, as a file in `dir`.
pub fn sample_prefix(dir: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(sample_stream()).expect("sample stream");
    let mut out = String::new();
    for line in text.lines().take(n) {
        out.push_str(line);
        out.push('\n');
    }
    let path = dir.join(format!("sample_first_{n}.jsonl"));
    std::fs::write(&path, out).expect("write sample prefix");
    path
}

/// The assay binary, run from the repository (the topology's relative
/// paths), its stdout dropped and its stderr kept for failure messages.
pub fn assay_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_assay"));
    command
        .current_dir(repo())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    command
}

/// `command` (an `assay_command`, perhaps with environment overrides)
/// running the listings topology with `config`, as a process the test kills
/// mid-stream (`KilledOnDrop`).
pub fn spawn_engine(mut command: std::process::Command, config: &Path) -> KilledOnDrop {
    KilledOnDrop(
        command
            .args(["run", "topologies/listings.toml", "--config"])
            .arg(config)
            .spawn()
            .unwrap(),
    )
}

/// `command` (an `assay_command`, perhaps with environment overrides)
/// running the listings topology with `config` to its end (or its death).
pub fn run_engine(mut command: std::process::Command, config: &Path) -> std::process::ExitStatus {
    command
        .args(["run", "topologies/listings.toml", "--config"])
        .arg(config)
        .status()
        .unwrap()
}

/// An engine process a test kills mid-stream, killed too when dropped: a
/// failed assertion between its spawn and its kill would otherwise leave it
/// running after the test.
pub struct KilledOnDrop(pub std::process::Child);

impl KilledOnDrop {
    /// SIGKILL (no destructor, no flush, no final checkpoint), then reap it.
    pub fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        // already reaped when the test killed it: nothing to do then
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
