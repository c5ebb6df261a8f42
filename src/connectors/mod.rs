//! Sources and sinks, one folder per system.

pub mod file;
