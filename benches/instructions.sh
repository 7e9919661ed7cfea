#!/usr/bin/env bash
# Instructions per request of the whole gateway process, counted by valgrind's callgrind: a
# figure that, unlike requests/s on a shared VM, does not move with the neighbours.
#
# Starts `mock-provider` and one `sluice` under callgrind (KEYS as in run.sh: none, memory,
# sqlite or postgres; with keys every request carries a virtual key with a budget and an rpm
# limit). It sends WARMUP seconds of load, zeroes the counters, sends DURATION seconds more,
# then SIGTERMs the gateway, which flushes its spend log; the instructions counted from the
# zeroing to the exit (request path, spend writer and database driver, all threads) are
# divided by the requests sent after it. The spend writer's interval is 60 s here, so that it
# writes the same 1,000-row batches it writes under full load, not one small batch a second.
# Under valgrind the gateway serves a few hundred requests a second.
#
# Environment: KEYS=none, DURATION=15, WARMUP=3, CONCURRENCY=4, SKIP_BUILD, BENCH_PG, and
# CALLGRIND_OUT (where to keep the profile for callgrind_annotate; default: dropped).
set -euo pipefail

KEYS=${KEYS:-none}
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
CONCURRENCY=${CONCURRENCY:-4}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=benches/harness.sh
source "$ROOT/benches/harness.sh"
for tool in valgrind callgrind_control; do
    command -v "$tool" >/dev/null || die "needs \`$tool\` (apt-get install valgrind)"
done

build_unless_skipped

make_body "$WORK/body.json"
start_mock
GW_WRAPPER=(valgrind --tool=callgrind "--callgrind-out-file=$WORK/callgrind.out")
BATCH_WRITE_AT=60
start_gateway gw "$KEYS"
hdr=()
if [[ $KEYS != none ]]; then
    hdr=(-H "authorization: Bearer $(generate_key "$GW_PORT")")
fi

load() { # SECONDS -> sluice-load's JSON
    taskset -c "$LOAD_CPU" "$BIN/sluice-load" --url "http://127.0.0.1:$GW_PORT/v1/chat/completions" \
        --model bench --concurrency "$CONCURRENCY" --duration "$1" --warmup 0 --timeout 120 \
        --body "$WORK/body.json" ${hdr[@]+"${hdr[@]}"}
}

load "$WARMUP" >/dev/null
callgrind_control --zero "$GW_PID" >/dev/null 2>&1
out=$(load "$DURATION")
kill -TERM "$GW_PID"
wait "$GW_PID" || true
[[ $(jq .errors <<<"$out") == 0 ]] || die "errors: $(jq -r .first_error <<<"$out")"
requests=$(jq .total_requests <<<"$out")
# At exit callgrind writes what it counted since the zeroing.
instructions=$(awk '/^(summary|totals):/ {print $2; exit}' "$WORK/callgrind.out")
[[ -n $instructions ]] || die "no callgrind totals in $WORK/callgrind.out"
[[ -n ${CALLGRIND_OUT:-} ]] && cp "$WORK/callgrind.out" "$CALLGRIND_OUT"
echo "keys=$KEYS requests=$requests instructions_per_request=$((instructions / requests))"
