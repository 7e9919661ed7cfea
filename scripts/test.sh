#!/usr/bin/env bash
# The whole test suite, runnable on a fresh machine: installs what the build needs, checks
# formatting and lints, builds every binary the black-box tests start, then runs all tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)   # Pingora's zlib-ng build
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)   # test databases are made with psql
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# The official Python SDKs are clients in the black-box tests.
if ! python3 -c 'import anthropic, openai' >/dev/null 2>&1; then
  python3 -m pip install -q --disable-pip-version-check anthropic openai
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

# Postgres and Redis run on this machine kind; the store and tenancy tests use them for real
# (a Postgres test fails rather than skips when the variable is set and nothing answers).
export SLUICE_TEST_DATABASE_URL=${SLUICE_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
export SLUICE_TEST_REDIS_URL=${SLUICE_TEST_REDIS_URL:-redis://127.0.0.1:6379}

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The engine's CUDA seam must keep building (and linting) without a CUDA toolkit or driver.
cargo clippy -p sluice-engine --features cuda -- -D warnings
# The black-box tests start the built `sluice` and `mock-provider` binaries.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast
