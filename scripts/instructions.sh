#!/usr/bin/env bash
# Instructions (valgrind's callgrind) the full topology takes on the first
# EVENTS events of `bench`'s generated 1M stream, on 1 worker: a count the
# host's noise does not move, for changes too small for a wall clock on this
# shared machine to show. `docs/benchmarks.md` cites these counts.
#
#   scripts/instructions.sh [BINARY ...]     (default: target/release/assay, built first)
#
# For each binary: the instructions, and a sha256 of the documents and of the
# dead letters it wrote (equal hashes: the same bytes out). Each run takes
# about a minute per 200,000 events.
#
# Environment: EVENTS (default 200000); STATISTICS=1 also binds the
# statistics changelog (as config/default.toml does; `bench` does not);
# DIR (default target/instructions); PIPELINE (default full): `core` runs
# the topology without its market (`bench`'s core row), `pass-through` the
# decode-and-re-encode baseline, so that the pipelines' instructions per
# event can be compared on the same events.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
events="${EVENTS:-200000}"
dir="$(mkdir -p "${DIR:-target/instructions}" && cd "${DIR:-target/instructions}" && pwd)"

if ! command -v valgrind >/dev/null; then
  echo "instructions: installing valgrind" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null || true
  $SUDO apt-get install -y -qq valgrind >/dev/null
fi

binaries=("$@")
if [ ${#binaries[@]} -eq 0 ]; then
  scripts/bootstrap.sh
  cargo build --release --quiet
  binaries=("$here/target/release/assay")
fi

# the stream `bench` generates (a fixed seed: the same bytes every time)
stream="$dir/bench/mixed-1000000.jsonl"
# (the same run writes the core topology, bench::core_topology's)
if [ ! -f "$stream" ] || [ ! -f "$dir/bench/listings-core.toml" ]; then
  echo "instructions: generating the 1M-event stream (a short bench run)" >&2
  "${binaries[0]}" bench --workers 1 --live-listings 0 --market-window-epochs 1 \
    --dir "$dir/bench" >/dev/null
fi
head -n "$events" "$stream" >"$dir/input.jsonl"

pipeline="${PIPELINE:-full}"
topology=topologies/listings.toml
mode=()
case "$pipeline" in
  full) ;;
  core) topology="$dir/bench/listings-core.toml" ;;
  pass-through) mode=(--pass-through) ;;
  *) echo "instructions: PIPELINE must be full, core or pass-through, not '$pipeline'" >&2; exit 2 ;;
esac

cat >"$dir/config.toml" <<EOF
# scripts/instructions.sh: 1 worker, bench's epochs, checkpoints only at the end
[runtime]
workers = 1
epoch_records = 1024
checkpoint_interval_ms = 1000000
progress = "never"

[state]
dir = "$dir/state"

[bindings.listing_changes]
type = "file"
path = "$dir/input.jsonl"
partitions = 8

[bindings.search_documents]
type = "file"
path = "$dir/out/search_documents.jsonl"

[bindings.dead_letters]
type = "file"
path = "$dir/out/dead_letters.jsonl"
EOF
if [ "${STATISTICS:-0}" = 1 ]; then
  cat >>"$dir/config.toml" <<EOF

[bindings.market_statistics]
type = "file"
path = "$dir/out/market_statistics.jsonl"
EOF
fi

echo "first $events events of the bench stream, $pipeline, 1 worker"
for binary in "${binaries[@]}"; do
  rm -rf "$dir/state" "$dir/out"
  valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" \
    "$binary" run "$topology" --config "$dir/config.toml" --from-scratch "${mode[@]}" \
    >"$dir/run.log" 2>"$dir/valgrind.log"
  instructions=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$dir/valgrind.log")
  documents=$(sha256sum "$dir/out/search_documents.jsonl" | cut -c1-16)
  dead_letters=$(sha256sum "$dir/out/dead_letters.jsonl" | cut -c1-16)
  per_event=$((instructions / events))
  printf '%s\n  instructions %s (%s per event)   documents %s   dead letters %s\n' \
    "$binary" "$instructions" "$per_event" "$documents" "$dead_letters"
done
echo "callgrind's profile of the last binary: $dir/callgrind.out (callgrind_annotate)"
