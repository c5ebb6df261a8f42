#!/usr/bin/env bash
# The Kafka benchmark, rerunnable: starts tansu (in-memory) on a free port,
# runs `assay bench-kafka` against it, stops it. Extra arguments go to assay.
# TANSU=<path> runs another tansu binary (scripts/build-tansu-indexed.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/bootstrap.sh"
"$here/scripts/install-tansu.sh"
cd "$here"
cargo build --release --quiet
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${TANSU:-.tools/tansu/bin/tansu}" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ > target/bench-tansu.log 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
./target/release/assay bench-kafka --brokers "127.0.0.1:$port" --broker-pid "$broker" "$@"
