#!/usr/bin/env bash
# Glue for the engine's real-model integration test: fetches the models (scripts/fetch-models.sh),
# then produces the numpy reference's greedy outputs for the fixed chat prompts in prompts.json
# (24 new tokens each) and prints two lines on stdout:
#   the SmolLM2 GGUF path
#   the reference JSON path (a list of {messages, max_tokens, prompt_ids, output_ids, text,
#   finish_reason, top2_margins}, see smollm2_reference.py)
# Usage: tests/reference/fetch_and_reference.sh [MODELS_DIR]   (default: models/ at the repo root)
#
# The prompts were picked so that every greedy step has a top-2 logit margin of at least 0.45
# (see top2_margins): float32 numpy and llama.cpp (Q8 activations) then agree on every id, so an
# engine must match the reference ids exactly. Prompt ids also equal llama.cpp's tokenizer's.
#
# The reference takes ~10 s, so its output is cached next to the models under a key hashed from
# the reference script, the prompts, the pinned requirements and this file: reruns are instant,
# and any change to how the reference is computed recomputes it.
# The Python packages go into MODELS_DIR/reference-venv (git-ignored like the models); set
# SLUICE_REF_PYTHON to a python that already has tests/reference/requirements.txt to skip that.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo_root=$(cd "$here/../.." && pwd)
models_dir=${1:-$repo_root/models}

log() { echo "fetch_and_reference: $*" >&2; }

{ read -r gguf_path; read -r _minilm_dir; } < <("$repo_root/scripts/fetch-models.sh" "$models_dir")
[ -f "$gguf_path" ] || { log "ERROR: fetch-models.sh gave no GGUF path"; exit 1; }
models_dir=$(cd "$models_dir" && pwd)

key=$(cat "$here/smollm2_reference.py" "$here/prompts.json" "$here/requirements.txt" "$0" \
  | sha256sum | cut -c1-16)
out_dir="$models_dir/reference"
out="$out_dir/smollm2-$key.json"
mkdir -p "$out_dir"

# Parallel test processes may ask at once: one computes, the others wait and reuse its file.
exec 9>"$out_dir/.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

if [ ! -s "$out" ]; then
  python=${SLUICE_REF_PYTHON:-}
  if [ -z "$python" ]; then
    venv="$models_dir/reference-venv"
    requirements_key=$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)
    if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements_key" ]; then
      log "installing the reference's Python packages into $venv"
      rm -rf "$venv"
      python3 -m venv "$venv"
      "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt" >&2
      echo "$requirements_key" >"$venv/.requirements"
    fi
    python="$venv/bin/python"
  fi
  log "computing reference outputs into $out"
  "$python" "$here/smollm2_reference.py" --gguf "$gguf_path" --prompts-file "$here/prompts.json" \
    --out "$out.tmp" >/dev/null
  mv "$out.tmp" "$out"
fi

echo "$gguf_path"
echo "$out"
