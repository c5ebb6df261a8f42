#!/usr/bin/env bash
# Runs every test: unit, integration (real RocksDB, real ONNX files, real data)
# and the sample's generator check. Installs what it needs first.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/bootstrap.sh"
# the Kafka tests run against a real broker: tansu, built once into .tools/
"$here/scripts/install-tansu.sh"
cd "$here"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --release --no-fail-fast "$@"
else
  cargo test --release --no-fail-fast "$@"
fi
