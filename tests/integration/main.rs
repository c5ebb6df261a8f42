//! The integration tests, as one test binary.
//!
//! Each of these links RocksDB, tract, librdkafka and timely statically; as
//! separate binaries (Cargo's default for `tests/*.rs`) they cost a link of
//! several hundred megabytes each, and a CI machine ran out of disk on the
//! eighth. One binary links once; nextest still runs every test in its own
//! process, so tests stay isolated from each other.

mod common;

mod bad_input;
mod crash_resume;
mod determinism;
mod golden_end_to_end;
mod kafka;
mod market;
mod model_golden;
mod validation;
