"""What the turn grammar of a large tool set costs, measured side by side on one model; prints JSON.

    .venv/bin/python benchmarks/grammar_speed.py [--tools 30] [--params 10] [--model PATH] [--rounds 3]

The tool set: N tools of P parameters each, every construct real schemas carry (nested objects,
arrays of objects, $ref/$defs, anyOf, enums, untyped values, type lists, nullable, defaults).

build_s       tool_call_grammar() for all tools (Python: schema rewrite + llama-cpp-python's converter)
compile_s     llama.cpp parsing the grammar into a sampler (once per turn)
mask_ms       one full-vocabulary mask under the grammar, mid-call (done only when the sampled
              token is rejected)
turn          the same prompt (KV-cached) decoded under the grammar (tool_choice=required: every
              tool's rules) and as a plain answer (tool_choice=none); per-token decode time of each,
              and overhead_s = build + compile + the grammar turn's decode time beyond what its
              tokens cost at the plain turn's per-token rate (target: <= about 1 s)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from llmos.config import ModelConfig, Sampling
from llmos.grammar import CALL_HEAD, tool_call_grammar
from llmos.llama import LlamaBackend, _Grammar, compile_grammar
from llmos.messages import Message
from llmos.toolbox import from_openai


def parameter(i: int, j: int) -> dict:
    """The j-th parameter of tool i: cycles through the constructs real tools use."""
    point = {"$ref": "#/$defs/Point"}
    kinds = [
        {"type": "string", "description": "a name"},
        {"type": "integer", "default": 3},
        {"type": "string", "enum": ["low", "medium", "high"]},
        {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                          "geo": point}, "required": ["city"]},
        {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                                    "required": ["sku"]}},
        {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
        {"description": "any JSON value"},
        {"type": ["number", "null"]},
        {"type": "boolean", "nullable": True},
        {"type": "object", "additionalProperties": {"type": "string"}},
    ]
    return kinds[(i + j) % len(kinds)]


def tool_set(n_tools: int, n_params: int) -> list:
    tools = []
    for i in range(n_tools):
        props = {f"p{j}": parameter(i, j) for j in range(n_params)}
        schema = {"type": "object", "properties": props, "required": ["p0", "p1"],
                  "$defs": {"Point": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}}}}
        tools.append(from_openai({"type": "function", "function": {"name": f"tool_{i:02d}", "description": f"Tool number {i}.",
                                                                    "parameters": schema}}))
    return tools


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mask_ms(backend: LlamaBackend, grammar: str, tools: list, rounds: int) -> float:
    import numpy as np

    g = _Grammar(backend.lc, backend.vocab, grammar, backend.n_vocab)
    try:
        head = CALL_HEAD + tools[-1].name + '", "arguments": {"p0": '
        for token in backend.llm.tokenize(head.encode(), add_bos=False, special=False):
            g.accept(token)
        logits = np.zeros(backend.n_vocab, dtype=np.float32)
        return 1000 * median_time(lambda: g.mask(logits.copy()), rounds)
    finally:
        g.close()


def turn(backend: LlamaBackend, messages, tools, choice: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    *_, reply = backend.turn(messages, tools, choice, sampling=Sampling(max_tokens=max_tokens))
    stats = dict(backend.last, wall_s=round(time.perf_counter() - t0, 3), calls=len(reply.tool_calls))
    stats["s_per_token"] = stats["decode_s"] / max(1, stats["generated_tokens"])
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tools", type=int, default=30)
    ap.add_argument("--params", type=int, default=10)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()

    tools = tool_set(args.tools, args.params)
    specs = [(t.name, t.parameters) for t in tools]
    grammar = tool_call_grammar(specs, "required")
    build_s = median_time(lambda: tool_call_grammar(specs, "required"), args.rounds)

    backend = LlamaBackend(ModelConfig(path=args.model, gpu_layers=0, n_ctx=16384), Sampling(temperature=0.0))
    try:
        compile_s = median_time(lambda: compile_grammar(backend, grammar), args.rounds)
        messages = [Message("user", f"Call {tools[-1].name} with p0 'Oslo' and p1 4.")]
        prompt_tokens = backend.count(messages, tools)
        turn(backend, messages, tools, "none", 1)  # prefill once: both sides then start from the cache
        rows = {"grammar": [], "plain": []}
        for _ in range(args.rounds):
            rows["grammar"].append(turn(backend, messages, tools, "required", args.max_tokens))
            rows["plain"].append(turn(backend, messages, tools, "none", args.max_tokens))
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("generated_tokens", "masked_tokens", "jumped_tokens", "decode_s", "s_per_token", "wall_s", "calls")}
               for k, v in rows.items()}
        g, p = med["grammar"], med["plain"]
        beyond_tokens = g["decode_s"] - g["generated_tokens"] * p["s_per_token"]
        print(json.dumps({
            "model": backend.name, "n_vocab": backend.n_vocab, "tools": args.tools, "params_per_tool": args.params,
            "grammar_chars": len(grammar), "prompt_tokens": prompt_tokens,
            "build_s": round(build_s, 4), "compile_s": round(compile_s, 4),
            "mask_ms": round(mask_ms(backend, grammar, tools, args.rounds), 2),
            "turn_grammar": {k: round(v, 4) for k, v in g.items()}, "turn_plain": {k: round(v, 4) for k, v in p.items()},
            "per_token_ratio": round(g["s_per_token"] / p["s_per_token"], 3) if p["s_per_token"] else None,
            "overhead_s": round(build_s + compile_s + beyond_tokens, 3),
            "target_overhead_s": 1.0,
        }, indent=2))
    finally:
        backend.close()


if __name__ == "__main__":
    main()
