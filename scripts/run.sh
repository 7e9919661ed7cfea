#!/usr/bin/env bash
# Builds and runs the gateway on port 4000. With no arguments it uses the embedded default
# config (any model name goes to the provider it names, with that provider's usual API key
# variable, e.g. OPENAI_API_KEY); pass `--config FILE` for a LiteLLM-style config.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cmake >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
cargo build --release -p sluice-proxy --bin sluice
exec target/release/sluice "$@"
