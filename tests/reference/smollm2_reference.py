#!/usr/bin/env python3
"""Independent numpy reference for SmolLM2-135M-Instruct (GGUF, `llama` architecture).

Sluice's engine is checked against this script, so it shares no code with it: tensors and
metadata come from the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`), the tokenizer is
built with Hugging Face `tokenizers` from the GGUF vocabulary and merges, the chat template is
rendered with `jinja2` the way `transformers.apply_chat_template` does, and the forward pass is
plain float32 numpy.

(`transformers.AutoTokenizer.from_pretrained(dir, gguf_file=...)` was the first choice for the
tokenizer, but in both transformers 4.57 and 5.x it imports torch to read GGUF metadata, and this
reference must run without torch.)

Usage:
    smollm2_reference.py --gguf MODEL.gguf --messages-json '[{"role":"user","content":"Hi"}]' \
        --max-tokens 24
    smollm2_reference.py --gguf MODEL.gguf --prompts-file prompts.json [--out results.json]
    smollm2_reference.py --gguf MODEL.gguf --self-test

A prompts file is a JSON list of {"messages": [...], "max_tokens": N (optional)}; the output is
then a JSON list with one result per prompt. Each result is {"messages", "max_tokens",
"prompt_ids", "output_ids", "text", "finish_reason", "top2_margins"}: greedy decoding stops at the
eos token (not included in output_ids, finish_reason "stop") or after max tokens (finish_reason
"length"). `top2_margins[i]` is the gap between the best and second-best logit at
output step i: where it is tiny, a correct engine with different rounding may legitimately pick
the other token, and a comparison should stop there rather than fail.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import jinja2
import jinja2.sandbox
import numpy as np
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

GGUF_TOKEN_TYPE_CONTROL = 3


def _field(reader: GGUFReader, key: str):
    field = reader.fields.get(key)
    if field is None:
        raise KeyError(f"GGUF metadata key {key!r} is missing")
    return field.contents()


@dataclass
class LlamaHyperparams:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    bos_id: int
    eos_id: int

    @classmethod
    def from_gguf(cls, reader: GGUFReader) -> "LlamaHyperparams":
        arch = _field(reader, "general.architecture")
        if arch != "llama":
            raise ValueError(f"this reference implements the llama architecture, file says {arch!r}")
        hidden = int(_field(reader, "llama.embedding_length"))
        n_heads = int(_field(reader, "llama.attention.head_count"))
        return cls(
            n_layers=int(_field(reader, "llama.block_count")),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
            head_dim=hidden // n_heads,
            rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
            rope_theta=float(_field(reader, "llama.rope.freq_base")),
            bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id")),
            eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id")),
        )


def load_tensors(reader: GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor dequantised to float32, in numpy order ([out_features, in_features])."""
    tensors = {}
    for tensor in reader.tensors:
        values = dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type))
        # GGUF lists dims innermost first; numpy wants them outermost first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        tensors[tensor.name] = np.ascontiguousarray(values.reshape(shape), dtype=np.float32)
    return tensors


def build_tokenizer(reader: GGUFReader) -> Tokenizer:
    """Byte-level BPE from the GGUF vocabulary, with the `smollm` pre-tokenizer (digits split
    one by one, then the GPT-2 byte-level regex) and control tokens matched as whole tokens."""
    pre = _field(reader, "tokenizer.ggml.pre")
    if _field(reader, "tokenizer.ggml.model") != "gpt2" or pre != "smollm":
        raise ValueError(f"expected a gpt2/smollm tokenizer, found pre-tokenizer {pre!r}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    token_types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(token, special=True, normalized=False)
        for token, kind in zip(tokens, token_types)
        if kind == GGUF_TOKEN_TYPE_CONTROL
    ]
    tokenizer.add_special_tokens(specials)
    for added in specials:
        if tokenizer.token_to_id(added.content) != vocab[added.content]:
            raise ValueError(f"special token {added.content!r} got a new id")
    return tokenizer


def render_chat(reader: GGUFReader, messages: list[dict]) -> str:
    """The GGUF chat template, rendered with the options transformers uses."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(_field(reader, "tokenizer.chat_template"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    return template.render(
        messages=messages,
        add_generation_prompt=True,
        bos_token=tokens[int(_field(reader, "tokenizer.ggml.bos_token_id"))],
        eos_token=tokens[int(_field(reader, "tokenizer.ggml.eos_token_id"))],
    )


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    variance = np.mean(x * x, axis=-1, keepdims=True)
    return x / np.sqrt(variance + eps) * weight


def rope_adjacent_pairs(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Rotary embedding on (x[2i], x[2i+1]) pairs: the GGUF converter permuted the Q/K rows of
    llama models so that llama.cpp's adjacent-pair rotation matches Hugging Face's rotate-half.
    x: [tokens, heads, head_dim]."""
    head_dim = x.shape[-1]
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = positions.astype(np.float64)[:, None] * inv_freq[None, :]
    cos = np.cos(angles).astype(np.float32)[:, None, :]
    sin = np.sin(angles).astype(np.float32)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = np.empty_like(x)
    rotated[..., 0::2] = even * cos - odd * sin
    rotated[..., 1::2] = even * sin + odd * cos
    return rotated


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class SmolLM2Reference:
    def __init__(self, gguf_path: str):
        reader = GGUFReader(gguf_path)
        self.hp = LlamaHyperparams.from_gguf(reader)
        self.w = load_tensors(reader)
        self.tokenizer = build_tokenizer(reader)
        self._reader = reader
        # No output.weight in this file: the output head is tied to the token embedding.
        self.output_head = self.w.get("output.weight", self.w["token_embd.weight"])

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = render_chat(self._reader, messages)
        # Chat templates already contain their special tokens; add nothing around them.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def forward(self, token_ids: list[int], start: int, cache: list[dict]) -> np.ndarray:
        """Runs `token_ids` at positions start.. with a causal mask over the cached keys and
        values, appends to the cache, and returns the logits of the last token."""
        hp = self.hp
        n = len(token_ids)
        positions = np.arange(start, start + n)
        group = hp.n_heads // hp.n_kv_heads
        scale = np.float32(1.0 / np.sqrt(hp.head_dim))
        # Query i (absolute position start+i) may see keys 0..start+i.
        total = start + n
        mask = np.arange(total)[None, :] > positions[:, None]

        x = self.w["token_embd.weight"][token_ids]
        for layer in range(hp.n_layers):
            p = f"blk.{layer}."
            h = rms_norm(x, self.w[p + "attn_norm.weight"], hp.rms_eps)
            q = (h @ self.w[p + "attn_q.weight"].T).reshape(n, hp.n_heads, hp.head_dim)
            k = (h @ self.w[p + "attn_k.weight"].T).reshape(n, hp.n_kv_heads, hp.head_dim)
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(n, hp.n_kv_heads, hp.head_dim)
            q = rope_adjacent_pairs(q, positions, hp.rope_theta)
            k = rope_adjacent_pairs(k, positions, hp.rope_theta)
            layer_cache = cache[layer]
            layer_cache["k"] = np.concatenate([layer_cache["k"], k], axis=0)
            layer_cache["v"] = np.concatenate([layer_cache["v"], v], axis=0)
            keys, values = layer_cache["k"], layer_cache["v"]

            attn = np.empty((n, hp.n_heads, hp.head_dim), dtype=np.float32)
            for head in range(hp.n_heads):
                kv_head = head // group
                scores = (q[:, head, :] @ keys[:, kv_head, :].T) * scale
                scores = np.where(mask, -np.inf, scores)
                scores -= scores.max(axis=-1, keepdims=True)
                probs = np.exp(scores)
                probs /= probs.sum(axis=-1, keepdims=True)
                attn[:, head, :] = probs @ values[:, kv_head, :]
            x = x + attn.reshape(n, hp.hidden) @ self.w[p + "attn_output.weight"].T

            h = rms_norm(x, self.w[p + "ffn_norm.weight"], hp.rms_eps)
            gate = h @ self.w[p + "ffn_gate.weight"].T
            up = h @ self.w[p + "ffn_up.weight"].T
            x = x + (silu(gate) * up) @ self.w[p + "ffn_down.weight"].T

        last = rms_norm(x[-1:], self.w["output_norm.weight"], hp.rms_eps)
        return (last @ self.output_head.T)[0]

    def generate(self, messages: list[dict], max_tokens: int, ignore_eos: bool = False) -> dict:
        prompt = self.prompt_ids(messages)
        empty = np.zeros((0, self.hp.n_kv_heads, self.hp.head_dim), dtype=np.float32)
        cache = [{"k": empty, "v": empty} for _ in range(self.hp.n_layers)]
        logits = self.forward(prompt, 0, cache)
        position = len(prompt)
        output, margins, finish_reason = [], [], "length"
        while len(output) < max_tokens:
            top2 = np.argsort(logits)[-2:]
            next_id = int(top2[1])
            margins.append(round(float(logits[top2[1]] - logits[top2[0]]), 5))
            if next_id == self.hp.eos_id and not ignore_eos:
                finish_reason = "stop"
                break
            output.append(next_id)
            if len(output) == max_tokens:
                break
            logits = self.forward([next_id], position, cache)
            position += 1
        return {
            "messages": messages,
            "max_tokens": max_tokens,
            "prompt_ids": prompt,
            "output_ids": output,
            "text": self.tokenizer.decode(output, skip_special_tokens=True),
            "finish_reason": finish_reason,
            "top2_margins": margins,
        }


SELF_TEST_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def self_test(model: SmolLM2Reference) -> dict:
    """Checks that fail loudly if the forward pass, tokenizer or template is wrong: a broken
    forward does not answer "Paris", a broken tokenizer does not round-trip."""
    sample = "Hello, world! 12345 <|im_start|>user\nnaïve café\t  spaces"
    ids = model.tokenizer.encode(sample, add_special_tokens=False).ids
    if model.tokenizer.decode(ids, skip_special_tokens=False) != sample:
        raise AssertionError("tokenizer does not round-trip")
    if model.tokenizer.encode("12345", add_special_tokens=False).ids != [
        model.tokenizer.token_to_id(d) for d in "12345"
    ]:
        raise AssertionError("digits are not split one by one")
    result = model.generate(SELF_TEST_MESSAGES, max_tokens=24)
    if result["prompt_ids"][0] != model.hp.bos_id:
        raise AssertionError("chat prompt does not start with <|im_start|>")
    if "Paris" not in result["text"]:
        raise AssertionError(f"expected Paris in the answer, got {result['text']!r}")
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct GGUF file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--messages-json", help="one chat conversation as a JSON list")
    source.add_argument("--prompts-file", help="JSON list of {messages, max_tokens?}")
    source.add_argument("--self-test", action="store_true", help="check the France answer")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--out", help="also write the JSON output to this file")
    args = parser.parse_args(argv)

    model = SmolLM2Reference(args.gguf)
    if args.self_test:
        output = self_test(model)
    elif args.messages_json is not None:
        output = model.generate(json.loads(args.messages_json), args.max_tokens, args.ignore_eos)
    else:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = json.load(f)
        output = [
            model.generate(p["messages"], int(p.get("max_tokens", args.max_tokens)), args.ignore_eos)
            for p in prompts
        ]
    text = json.dumps(output, ensure_ascii=False)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
