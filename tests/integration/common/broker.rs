//! A real Kafka-compatible broker for tests: tansu, started on loopback on a
//! free port. scripts/test.sh installs it into .tools/tansu (scripts/install-tansu.sh).
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    storage: String,
    log: PathBuf,
    dir: PathBuf,
}

fn tansu() -> PathBuf {
    let path = std::env::var_os("ASSAY_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::repo().join(".tools/tansu/bin/tansu"));
    assert!(
        path.is_file(),
        "tansu is not installed at {}: run scripts/install-tansu.sh (scripts/test.sh does)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Broker {
    /// In-memory storage: fast, gone when the broker stops.
    pub fn memory(dir: &std::path::Path) -> Broker {
        Broker::start(free_port(), "memory://tansu/".into(), dir)
    }

    /// SQLite storage in `dir`: survives a broker restart.
    pub fn durable(dir: &std::path::Path) -> Broker {
        // tansu resolves a sqlite path against its working directory
        Broker::start(free_port(), "sqlite://tansu.db".into(), dir)
    }

    fn start(port: u16, storage: String, dir: &std::path::Path) -> Broker {
        let mut broker = Broker {
            child: None,
            port,
            storage,
            log: dir.join("tansu.log"),
            dir: dir.to_path_buf(),
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(tansu())
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                &self.storage,
            ])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {} (log: {})",
                self.port,
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing answers,
    /// as when a broker hangs or the network partitions.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("the broker runs")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts it again on the same port and storage.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
