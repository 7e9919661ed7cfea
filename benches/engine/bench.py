#!/usr/bin/env python3
"""Measurement half of benches/engine/run.sh: sluice-engine against llama.cpp on one GGUF model.

Subcommands (each prints one JSON object):
  prompts  tokenise a fixed English passage with llama.cpp's tokenizer and cut the prompt
           variants both engines get (identical token ids, so neither tokeniser is measured);
  llama    llama.cpp through llama-cpp-python: prefill tokens/s (long prompt) and single-stream
           greedy decode tokens/s, on THREADS threads;
  sluice   a running sluice-engine over its OpenAI HTTP API: prefill tokens/s from the time to
           first token (max_tokens 1), single-stream decode tokens/s from inter-token times, total
           output tokens/s at several concurrencies, and the server's peak RSS (VmHWM);
  report   the table and the two target ratios from the JSON of the others.

Only `prompts` and `llama` need llama_cpp (run them with the peer venv's python); `sluice` and
`report` use the standard library, so no client package can become the bottleneck being measured
beyond a thread per stream.

Every repetition and every concurrent stream gets a distinct prompt (a different window of the
passage): otherwise a prefix cache would serve repeated prefills for free.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit

# Each paragraph is numbered so repeated text still gives distinct token windows.
PASSAGE_SENTENCES = (
    "The river town woke slowly, with fishermen checking their nets while bakers opened shutters "
    "and the smell of bread drifted over the water. Children ran along the stone quay, counting "
    "the boats and arguing about which one would come home first with the biggest catch. An old "
    "clockmaker, who had repaired every clock in the valley, wrote down the weather in a small "
    "notebook each morning, as his father had done before him."
)
WINDOW_STRIDE = 7


def read_vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size of a process, from /proc (Linux), in KiB."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cmd_prompts(args) -> dict:
    from llama_cpp import Llama

    vocab = Llama(model_path=args.gguf, vocab_only=True, verbose=False)
    variants = args.variants
    needed = args.long_tokens + WINDOW_STRIDE * variants
    text, ids, paragraph = "", [], 0
    while len(ids) < needed:
        paragraph += 1
        text += f"Paragraph {paragraph}. {PASSAGE_SENTENCES}\n"
        ids = vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def windows(length: int) -> list[list[int]]:
        return [ids[i * WINDOW_STRIDE : i * WINDOW_STRIDE + length] for i in range(variants)]

    return {"long": windows(args.long_tokens), "short": windows(args.short_tokens)}


def cmd_llama(args) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    longest = max(len(p) for p in prompts["long"])
    n_ctx = max(longest, max(len(p) for p in prompts["short"]) + args.decode_tokens) + 16
    started = time.perf_counter()
    llm = Llama(
        model_path=args.gguf,
        n_ctx=n_ctx,
        n_batch=max(512, longest),
        n_ubatch=max(512, longest),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    n_vocab = llm.n_vocab()

    def greedy_next() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
        return int(logits.argmax())

    # Prefill: one warm-up, then the median of the measured repetitions.
    prefill_rates = []
    for rep in range(args.reps + 1):
        prompt = prompts["long"][rep % len(prompts["long"])]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        greedy_next()
        elapsed = time.perf_counter() - t0
        if rep > 0:
            prefill_rates.append(len(prompt) / elapsed)

    # Decode: the rate between the first and the last generated token, as for the server's ITL.
    decode_rates = []
    for rep in range(args.reps + 1):
        prompt = prompts["short"][rep % len(prompts["short"])]
        llm.reset()
        llm.eval(prompt)
        token = greedy_next()
        t_first = time.perf_counter()
        for _ in range(args.decode_tokens - 1):
            llm.eval([token])
            token = greedy_next()
        elapsed = time.perf_counter() - t_first
        if rep > 0:
            decode_rates.append((args.decode_tokens - 1) / elapsed)

    return {
        "engine": "llama.cpp",
        "version": getattr(llama_cpp, "__version__", "?"),
        "threads": args.threads,
        "load_s": round(load_s, 3),
        "prefill_tokens": len(prompts["long"][0]),
        "prefill_tps": round(statistics.median(prefill_rates), 1),
        "decode_tokens": args.decode_tokens,
        "decode_tps": round(statistics.median(decode_rates), 2),
        "peak_rss_mib": round((read_vm_hwm_kib(os.getpid()) or 0) / 1024, 1),
    }


class StreamResult:
    """Arrival times of one streamed completion."""

    def __init__(self):
        self.sent = 0.0
        self.chunk_times: list[float] = []
        self.completion_tokens: int | None = None
        self.error: str | None = None

    @property
    def tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)


def stream_completion(base: str, model: str, prompt: list[int], max_tokens: int) -> StreamResult:
    """POST /v1/completions with a token-id prompt and read the SSE stream to `[DONE]`."""
    url = urlsplit(base)
    result = StreamResult()
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    try:
        result.sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:300]!r}"
            return result
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                result.error = json.dumps(event["error"])[:300]
                break
            now = time.perf_counter()
            if any(choice.get("text") for choice in event.get("choices") or []):
                result.chunk_times.append(now)
            usage = event.get("usage")
            if usage and usage.get("completion_tokens") is not None:
                result.completion_tokens = int(usage["completion_tokens"])
    except (OSError, http.client.HTTPException, ValueError) as err:
        result.error = f"{type(err).__name__}: {err}"
    finally:
        conn.close()
    return result


def served_model(base: str) -> str:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", "/v1/models")
    models = json.loads(conn.getresponse().read())
    conn.close()
    return models["data"][0]["id"]


def run_concurrent(base, model, prompts, max_tokens) -> list[StreamResult]:
    """One request per stream, all released together."""
    results: list[StreamResult | None] = [None] * len(prompts)
    gate = threading.Barrier(len(prompts))

    def worker(index: int):
        gate.wait()
        results[index] = stream_completion(base, model, prompts[index], max_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _check(results: list[StreamResult], what: str):
    for result in results:
        if result.error:
            raise SystemExit(f"sluice-engine {what}: {result.error}")
        if not result.chunk_times:
            raise SystemExit(f"sluice-engine {what}: the stream carried no text")


def cmd_sluice(args) -> dict:
    with open(args.prompts, encoding="utf-8") as f:
        prompts = json.load(f)
    model = served_model(args.url)
    variant = iter(range(10**6))

    def next_prompt(kind: str) -> list[int]:
        pool = prompts[kind]
        return pool[next(variant) % len(pool)]

    # Warm-up: the first request pays for lazy allocations and page faults.
    _check([stream_completion(args.url, model, next_prompt("short"), 8)], "warm-up")

    ttfts = []
    for _ in range(args.reps):
        prompt = next_prompt("long")
        result = stream_completion(args.url, model, prompt, 1)
        _check([result], "prefill")
        ttfts.append(result.chunk_times[0] - result.sent)
    ttft = statistics.median(ttfts)

    decode_rates, itls = [], []
    for _ in range(args.reps):
        result = stream_completion(args.url, model, next_prompt("short"), args.decode_tokens)
        _check([result], "decode")
        span = result.chunk_times[-1] - result.chunk_times[0]
        # Tokens after the first, over the time they took: the ITL-based rate (a chunk may carry
        # more than one token, so the token count comes from usage when the server sends it).
        decode_rates.append((result.tokens - 1) / span)
        itls.extend(b - a for a, b in zip(result.chunk_times, result.chunk_times[1:]))

    concurrency = {}
    for streams in args.concurrency:
        batch_prompts = [next_prompt("short") for _ in range(streams)]
        results = run_concurrent(args.url, model, batch_prompts, args.decode_tokens)
        _check(results, f"{streams} streams")
        wall = max(r.chunk_times[-1] for r in results) - min(r.sent for r in results)
        total = sum(r.tokens for r in results)
        concurrency[str(streams)] = {
            "output_tps": round(total / wall, 2),
            "tokens": total,
            "wall_s": round(wall, 3),
        }

    return {
        "engine": "sluice-engine",
        "model": model,
        "prefill_tokens": len(prompts["long"][0]),
        "ttft_ms": round(ttft * 1000, 1),
        "prefill_tps": round(len(prompts["long"][0]) / ttft, 1),
        "decode_tokens": args.decode_tokens,
        "decode_tps": round(statistics.median(decode_rates), 2),
        "itl_p50_ms": round(statistics.median(itls) * 1000, 2),
        "concurrency": concurrency,
        "peak_rss_mib": round((read_vm_hwm_kib(args.pid) or 0) / 1024, 1) if args.pid else None,
    }


def _fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def cmd_report(args) -> str:
    llama = json.load(open(args.llama, encoding="utf-8")) if args.llama else None
    sluice = json.load(open(args.sluice, encoding="utf-8")) if args.sluice else None
    rows = [
        "| metric | llama.cpp | sluice-engine |",
        "|---|---:|---:|",
    ]

    def get(source, *path):
        for key in path:
            if source is None or key not in source:
                return None
            source = source[key]
        return source

    prefill_label = f"prefill tokens/s ({get(llama, 'prefill_tokens') or get(sluice, 'prefill_tokens')}-token prompt)"
    rows.append(f"| {prefill_label} | {_fmt(get(llama, 'prefill_tps'))} | {_fmt(get(sluice, 'prefill_tps'))} |")
    rows.append(f"| time to first token, ms | - | {_fmt(get(sluice, 'ttft_ms'))} |")
    rows.append(
        f"| decode tokens/s, 1 stream | {_fmt(get(llama, 'decode_tps'), 2)} | {_fmt(get(sluice, 'decode_tps'), 2)} |"
    )
    rows.append(f"| inter-token latency p50, ms | - | {_fmt(get(sluice, 'itl_p50_ms'), 2)} |")
    for streams in (get(sluice, "concurrency") or {}).keys():
        rows.append(
            f"| total output tokens/s, {streams} stream(s) | - | "
            f"{_fmt(get(sluice, 'concurrency', streams, 'output_tps'), 2)} |"
        )
    rows.append(
        f"| peak RSS, MiB (llama.cpp: its python process) | {_fmt(get(llama, 'peak_rss_mib'))} | "
        f"{_fmt(get(sluice, 'peak_rss_mib'))} |"
    )
    rows.append(f"| model load, s | {_fmt(get(llama, 'load_s'), 2)} | - |")
    if args.install_seconds is not None:
        rows.append(f"| llama-cpp-python install (build from source), s | {args.install_seconds:.0f} | - |")

    lines = [f"threads: {args.threads}", "", *rows, ""]
    llama_decode = get(llama, "decode_tps")
    if llama_decode and get(sluice, "decode_tps"):
        ratio = sluice["decode_tps"] / llama_decode
        verdict = "meets" if ratio >= 0.7 else "BELOW"
        lines.append(f"single-stream decode, ours / llama.cpp: {ratio:.2f} ({verdict} target >= 0.7)")
    ours_32 = get(sluice, "concurrency", "32", "output_tps")
    if llama_decode and ours_32:
        ratio = ours_32 / llama_decode
        verdict = "meets" if ratio >= 3 else "BELOW"
        lines.append(f"32-stream total, ours / llama.cpp single stream: {ratio:.2f} ({verdict} target >= 3)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prompts")
    p.add_argument("--gguf", required=True)
    p.add_argument("--long-tokens", type=int, default=256)
    p.add_argument("--short-tokens", type=int, default=32)
    p.add_argument("--variants", type=int, default=48)

    p = sub.add_parser("llama")
    p.add_argument("--gguf", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)

    p = sub.add_parser("sluice")
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8199")
    p.add_argument("--prompts", required=True)
    p.add_argument("--pid", type=int, help="server pid, for its peak RSS")
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.replace(",", " ").split()], default=[1, 8, 32]
    )

    p = sub.add_parser("report")
    p.add_argument("--llama")
    p.add_argument("--sluice")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--install-seconds", type=float)

    args = parser.parse_args(argv)
    if args.command == "report":
        print(cmd_report(args))
        return 0
    handler = {"prompts": cmd_prompts, "llama": cmd_llama, "sluice": cmd_sluice}[args.command]
    print(json.dumps(handler(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
