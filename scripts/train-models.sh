#!/usr/bin/env bash
# Retrain the listings topology's models: fetch the real data, create a
# private virtualenv with pinned tools (.venv-train, cached), train, export.
# --experiment: only print the valuation's held-out error with and without
# segment statistics as inputs (topologies/listings/segment_experiment.py).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
"$here/scripts/fetch-mercedes-data.sh"
venv="$here/.venv-train"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/topologies/listings/requirements-train.txt"
if [ "${1:-}" = "--experiment" ]; then
  # segment statistics as valuation inputs, with and without (prints only)
  "$venv/bin/python" "$here/topologies/listings/segment_experiment.py"
else
  "$venv/bin/python" "$here/topologies/listings/train.py"
fi
