#!/usr/bin/env bash
# Installs what building assay needs on a fresh Debian machine of this kind,
# and nothing when it is already there (safe to run every time).
#  - libclang: the rocksdb crate generates its bindings with bindgen.
#  - cargo-nextest: the test runner (falls back to `cargo test` if absent).
set -euo pipefail
have_libclang() {
  ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1
}
if ! have_libclang; then
  echo "bootstrap: installing libclang-dev (for the rocksdb crate's bindgen)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null || true
  $SUDO apt-get install -y -qq libclang-dev >/dev/null
fi
