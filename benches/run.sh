#!/usr/bin/env bash
# Sluice end-to-end load harness: mock provider directly vs. through the gateway.
#
# Builds the release binaries, starts `mock-provider` (CPU 1) and `sluice --num-workers 1`
# (CPU 0), and drives both with `sluice-load` (CPU 1) for non-streaming and streaming chat
# completions at several concurrencies. Prints a markdown table (also written to
# target/bench-results.md; raw sluice-load JSON goes to target/bench-results.jsonl).
#
# Environment overrides:
#   DURATION=10        measured seconds per run
#   WARMUP=2           warmup seconds per run (not measured)
#   CONCURRENCY="1 16 64"
#   MODES="chat stream"
#   GW_CPU=0 LOAD_CPU=1  CPUs for the gateway and for mock + load generator
#   SKIP_BUILD=1       use the binaries already in target/release
#   CARGO_TARGET_DIR   as for cargo (default: target)
#   SLUICE_LOG         passed through to the gateway (its log level)
#   KEYS=none          none: no auth (baseline); sqlite or postgres: every request carries a
#                      virtual key with a budget and an rpm limit, spend goes to that store
#                      (postgres: a fresh database on $BENCH_PG, default the local server), and
#                      the spend rows written are counted against the requests sent; memory:
#                      the same keyed requests with spend kept in the process (no database),
#                      which separates the request path's cost from the database's
# See benches/README.md for what each column means.
set -euo pipefail

DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONCURRENCY=${CONCURRENCY:-"1 16 64"}
MODES=${MODES:-"chat stream"}
KEYS=${KEYS:-none}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET_DIR/release
RESULTS=$TARGET_DIR/bench-results.md
RAW=$TARGET_DIR/bench-results.jsonl

# shellcheck source=benches/harness.sh
source "$ROOT/benches/harness.sh"

build_unless_skipped

# --- request body: a ~2 KB chat completion ---------------------------------------------------
BODY=$WORK/body.json
make_body "$BODY"
BODY_BYTES=$(wc -c <"$BODY")

# --- mock provider ---------------------------------------------------------------------------
start_mock

# --- gateway ---------------------------------------------------------------------------------
start_gateway main "$KEYS"
AUTH=()
if [[ $KEYS != none ]]; then
    VKEY=$(generate_key "$GW_PORT")
    AUTH=(-H "Authorization: Bearer $VKEY")
fi

# One request per route before measuring, so a broken setup fails loudly and early.
for model in bench bench-stream; do
    stream=false
    [[ $model == bench-stream ]] && stream=true
    probe "$GW_PORT" "$BODY" "$model" "$stream" "${AUTH[@]}"
done


# load URL MODEL STREAM(0|1) CONCURRENCY -> sluice-load JSON on stdout
load() {
    local args=(--url "$1" --model "$2" --concurrency "$4" --duration "$DURATION"
        --warmup "$WARMUP" --body "$BODY")
    [[ $3 == 1 ]] && args+=(--stream)
    [[ ${#AUTH[@]} -gt 0 ]] && args+=("${AUTH[@]}")
    taskset -c "$LOAD_CPU" "$BIN/sluice-load" "${args[@]}"
}

: >"$RAW"
ROWS=()
for mode in $MODES; do
    case $mode in
    chat) direct_model=bench gw_model=bench stream=0 ;;
    stream) direct_model=stream-20 gw_model=bench-stream stream=1 ;;
    *) die "unknown mode $mode (chat|stream)" ;;
    esac
    for c in $CONCURRENCY; do
        echo "[$mode c=$c] direct..." >&2
        direct=$(load "$MOCK_BASE/chat/completions" "$direct_model" "$stream" "$c")
        echo "[$mode c=$c] gateway..." >&2
        t0=$(cpu_ticks "$GW_PID")
        gw=$(load "http://127.0.0.1:$GW_PORT/v1/chat/completions" "$gw_model" "$stream" "$c")
        t1=$(cpu_ticks "$GW_PID")
        jq -c --arg mode "$mode" --arg target direct '. + {mode: $mode, target: $target}' <<<"$direct" >>"$RAW"
        jq -c --arg mode "$mode" --arg target gateway '. + {mode: $mode, target: $target}' <<<"$gw" >>"$RAW"
        for j in "$direct" "$gw"; do
            err=$(jq -r '.first_error // empty' <<<"$j")
            [[ -z $err ]] || echo "[$mode c=$c] $(jq -r .url <<<"$j"): errors=$(jq .errors <<<"$j"), first: $err" >&2
        done
        ROWS+=("$(jq -rn --argjson d "$direct" --argjson g "$gw" --arg mode "$mode" --argjson c "$c" \
            --argjson ticks $((t1 - t0)) --argjson hz "$CLK_TCK" '
            def lat($x; $k): if $x.latency_us then $x.latency_us[$k] else null end;
            def diff($a; $b): if $a != null and $b != null then $a - $b else null end;
            def fmt: if . == null then "–" else tostring end;
            def ttfb($x): if $x.ttfb_us then $x.ttfb_us.p50 else null end;
            [ $mode, $c,
              ($d.rps | floor), ($g.rps | floor),
              lat($d; "p50"), lat($g; "p50"), diff(lat($g; "p50"); lat($d; "p50")),
              lat($d; "p99"), lat($g; "p99"), diff(lat($g; "p99"); lat($d; "p99")),
              ttfb($d), ttfb($g),
              (if $g.total_requests > 0
               then ($ticks * 1000000 / $hz / $g.total_requests | floor) else null end),
              "\($d.errors)/\($g.errors)"
            ] | map(fmt) | "| " + join(" | ") + " |"')")
    done
done

HWM=$(awk '/^VmHWM:/ { printf "%.1f MiB", $2 / 1024 }' "/proc/$GW_PID/status")

SPEND_LINE=""
if [[ $KEYS != none && $KEYS != memory ]]; then
    # Stop the gateway (SIGTERM flushes the spend log), then count its rows.
    SENT=$(jq -s '[.[] | select(.target == "gateway") | .total_requests] | add + 2' "$RAW")
    ROWS_WRITTEN=$(stop_and_count_rows "$GW_PID" "$KEYS" "$DB_URL")
    SPEND_LINE="Virtual key with a budget and an rpm limit on every request ($KEYS store): spend rows written $ROWS_WRITTEN, requests sent $SENT (probes included)."
fi

{
    echo "## Sluice load harness ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
    echo
    echo "$(nproc) CPUs ($(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)); gateway on CPU $GW_CPU" \
        "(--num-workers 1), mock + load generator on CPU $LOAD_CPU. ${DURATION} s measured after" \
        "${WARMUP} s warmup per run, ${BODY_BYTES}-byte chat body, streams of 20 chunks." \
        "Latencies in µs (stream: until the end of the SSE body)."
    echo
    echo "| mode | conc | direct rps | gateway rps | direct p50 | gateway p50 | added p50 | direct p99 | gateway p99 | added p99 | direct TTFB p50 | gateway TTFB p50 | gateway CPU µs/req | errors d/g |"
    echo "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    printf '%s\n' "${ROWS[@]}"
    echo
    [[ -z $SPEND_LINE ]] || echo "$SPEND_LINE"
    echo
    echo "Gateway peak RSS (VmHWM) at the end: $HWM. CPU per request is utime+stime over the whole gateway run (warmup included) / requests sent; clock tick = $((1000000 / CLK_TCK)) µs."
} | tee "$RESULTS"
echo "(written to $RESULTS; raw JSON in $RAW)" >&2
