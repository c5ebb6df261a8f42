#!/usr/bin/env bash
# Installs what building assay needs on a fresh Debian machine of this kind,
# and nothing when it is already there (safe to run every time).
#  - libclang: the rocksdb crate generates its bindings with bindgen.
#  - cargo-nextest: the test runner (falls back to `cargo test` if absent).
set -euo pipefail
# bindgen loads libclang.so or libclang-<version>.so; libclang-cpp (which some
# images carry without libclang) does not count
have_libclang() {
  compgen -G '/usr/lib/llvm-*/lib/libclang.so*' >/dev/null ||
    compgen -G '/usr/lib/llvm-*/lib/libclang-[0-9]*.so*' >/dev/null ||
    compgen -G '/usr/lib/*-linux-gnu/libclang-[0-9]*.so*' >/dev/null ||
    compgen -G '/usr/lib/*-linux-gnu/libclang.so*' >/dev/null
}
if ! have_libclang; then
  echo "bootstrap: installing libclang-dev (for the rocksdb crate's bindgen)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null || true
  $SUDO apt-get install -y -qq libclang-dev >/dev/null
fi
