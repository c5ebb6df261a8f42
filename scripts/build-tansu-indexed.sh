#!/usr/bin/env bash
# An experiment, not the test broker. Builds tansu 0.6.0 with one change to
# its memory store: a fetch finds the partition's batches in an index of the
# offsets this process stored, instead of listing every batch object of the
# partition (docs/experiments/tansu-0.6.0-fetch-index.patch). With the
# release, the broker's CPU per record grows with the topic's length; with
# this, it stays flat (docs/benchmarks.md, stop 33). Into .tools/tansu-indexed,
# once (about 8 minutes on 2 cores):
#
#   scripts/build-tansu-indexed.sh
#   TANSU=.tools/tansu-indexed/bin/tansu scripts/bench-kafka.sh
#
# The tests and CI use the crates.io release (scripts/install-tansu.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
root="$here/.tools/tansu-indexed"
version="0.6.0"
if [ -x "$root/bin/tansu" ] && [ "$(cat "$root/VERSION" 2>/dev/null)" = "$version" ]; then
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# the release's sources, from cargo's download cache: installing the test
# broker (which builds tansu from crates.io) put them there
"$here/scripts/install-tansu.sh"
for crate in tansu tansu-storage; do
  archive=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$crate-$version.crate" 2>/dev/null | head -1)
  if [ -z "$archive" ]; then
    echo "build-tansu-indexed: $crate-$version.crate is not in cargo's cache; run: cargo install --force tansu --version $version --features dynostore,libsql --root .tools/tansu" >&2
    exit 1
  fi
  tar -xzf "$archive" -C "$work"
done
(cd "$work/tansu-storage-$version" && patch -p1 --quiet <"$here/docs/experiments/tansu-0.6.0-fetch-index.patch")
cat >>"$work/tansu-$version/Cargo.toml" <<TOML

[patch.crates-io]
tansu-storage = { path = "../tansu-storage-$version" }
TOML
echo "build-tansu-indexed: building tansu $version with the fetch index (about 8 minutes on 2 cores, once)" >&2
(cd "$work/tansu-$version" && cargo build --release --quiet --features dynostore --target-dir "$work/target")
mkdir -p "$root/bin"
cp "$work/target/release/tansu" "$root/bin/tansu"
echo "$version" >"$root/VERSION"
