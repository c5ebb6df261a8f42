#!/usr/bin/env bash
# Installs the test broker, tansu (Kafka wire-compatible), into .tools/tansu,
# once: later runs find it there. dynostore gives memory:// storage, libsql a
# durable sqlite:// store that survives a broker restart.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
root="$here/.tools/tansu"
version="0.6.0"
if [ -x "$root/bin/tansu" ] && [ "$(cat "$root/VERSION" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
echo "install-tansu: building tansu $version (about 10 minutes on 2 cores, once)" >&2
cargo install --locked --quiet tansu --version "$version" --features dynostore,libsql --root "$root"
echo "$version" > "$root/VERSION"
