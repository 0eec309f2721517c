"""Kernel speed, measured side by side in one run on the default model; prints JSON.

    .venv/bin/python benchmarks/kernel_speed.py [--tokens 256] [--steps 10]

overhead      decode tokens/s of a kernel turn vs raw llama-cpp-python (create_completion, stream)
              on the same model, prompt and thread count (target ratio >= 0.95)
grammar_tax   a tool-call turn under the turn grammar vs the same turn unconstrained, and
              llama-cpp-python's stock grammar sampling on the same grammar (target >= 0.8)
prefix_reuse  a tool loop: tokens evaluated at step N / tokens appended since step N-1 (target 1.0),
              and time to first token at the last step with the cache vs re-reading the prompt
bandwidth     decode tokens/s vs the memory-bandwidth ceiling (bytes/s read / model file size)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from llmos.config import ModelConfig, Sampling
from llmos.llama import LlamaBackend, available_cores
from llmos.messages import Message
from llmos.toolbox import tool

STORY = "Write a long, detailed story about a lighthouse keeper and a robot."


@tool
def lookup(query: str) -> str:
    """Look something up in the knowledge base."""
    return f"result for {query}"


@tool
def calculator(expression: str) -> str:
    """Evaluate a math expression."""
    return "42"


def timed_stream(chunks) -> tuple[int, float]:
    """(pieces, seconds from the first piece to the last) for an iterator of streamed pieces."""
    n, first, last = 0, None, None
    for _ in chunks:
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
    return n, (last - first) if first and last else 0.0


def kernel_turn(backend: LlamaBackend, messages, tools, choice) -> dict:
    for _ in backend.turn(messages, tools, choice):
        pass
    stats = dict(backend.last)
    return stats


def overhead(backend: LlamaBackend, tokens: int, rounds: int) -> dict:
    import llama_cpp

    messages = [Message("user", STORY)]
    prompt = backend.render(messages, [])
    raw = llama_cpp.Llama(model_path=str(backend.path), n_ctx=backend.n_ctx, n_threads=available_cores(),
                          n_threads_batch=available_cores(), n_gpu_layers=backend.gpu_layers, verbose=False)
    kernel_runs, raw_runs = [], []
    for _ in range(rounds):  # interleaved, best of each: machine noise hits both alike
        kernel = kernel_turn(backend, messages, [], "none")
        kernel_runs.append(kernel["decode_tps"])
        # on the backend's decode thread, where the kernel decodes too (from another thread llama.cpp
        # decodes slower: benchmarks/batched.py "threads")
        n, secs = backend.batcher.call(lambda: timed_stream(raw.create_completion(prompt, max_tokens=tokens, temperature=0.0, stream=True)))
        raw_runs.append((n - 1) / secs)  # the first piece marks the end of prefill
    raw.close()
    return {
        "tokens": kernel["generated_tokens"], "kernel_tps": max(kernel_runs), "raw_create_completion_tps": round(max(raw_runs), 2),
        "ratio": round(max(kernel_runs) / max(raw_runs), 3), "rounds": rounds, "target": 0.95,
    }


def grammar_tax(backend: LlamaBackend, rounds: int) -> dict:
    import llama_cpp

    tools = [lookup, calculator]
    messages = [Message("user", "Look up the population of France and compute its square root.")]
    grammar = llama_cpp.LlamaGrammar.from_string(backend.grammar_for(tools, "required"), verbose=False)
    prompt = backend.render(messages, tools)
    constrained, free, stock = [], [], []
    for _ in range(rounds):
        c = kernel_turn(backend, messages, tools, "required")
        constrained.append(c["decode_tps"])
        free.append(kernel_turn(backend, messages, tools, "none")["decode_tps"])
        # stock llama-cpp-python: the same grammar through create_completion's grammar sampler
        backend.llm.reset()
        n, secs = backend.batcher.call(lambda: timed_stream(backend.llm.create_completion(
            prompt, max_tokens=c["generated_tokens"], temperature=0.0, stream=True, grammar=grammar)))
        backend.reset()  # the stock path left its own cells behind
        stock.append((n - 1) / secs)
    return {
        "constrained_tps": max(constrained), "unconstrained_tps": max(free),
        "ratio": round(max(constrained) / max(free), 3),
        "constrained_tokens": c["generated_tokens"], "masked_tokens": c["masked_tokens"],
        "stock_llama_cpp_grammar_tps": round(max(stock), 2), "stock_ratio": round(max(stock) / max(free), 3),
        "rounds": rounds, "target": 0.8,
    }


def prefix_reuse(backend: LlamaBackend, steps: int) -> dict:
    tools = [lookup, calculator]
    messages = [Message("user", "Research the history of the lighthouse step by step, one lookup at a time.")]
    backend.reset()
    rows = []
    prev = None
    for step in range(1, steps + 1):
        for msg in backend.turn(messages, tools, "required"):
            reply = msg
        s = dict(backend.last)
        appended = s["prompt_tokens"] - (prev["prompt_tokens"] + prev["kept_tokens"]) if prev else s["prompt_tokens"]
        rows.append({"step": step, "prompt": s["prompt_tokens"], "evaluated": s["evaluated_tokens"], "appended": appended,
                     "ttft_s": s["prefill_s"]})
        prev = s
        messages.append(reply)
        for i, c in enumerate(reply.tool_calls):
            messages.append(Message("tool", f"page {step}.{i}: the lighthouse was built in {1800 + step}.", meta={"name": c.name, "tool_call_id": c.id}))
    later = rows[1:]
    ratio = sum(r["evaluated"] for r in later) / max(1, sum(r["appended"] for r in later))
    # the same last prompt with nothing cached
    last_prompt = backend.tokenize(backend.render(messages, tools))
    backend.reset()
    t0 = time.perf_counter()
    backend.batcher.step(backend._slots[0], last_prompt, lambda row: None)
    cold = time.perf_counter() - t0
    backend.reset()
    return {
        "steps": rows, "evaluated_over_appended": round(ratio, 3), "target": 1.0,
        "last_step_ttft_with_reuse_s": rows[-1]["ttft_s"], "full_prefill_of_final_context_s": round(cold, 3),
        "final_context_tokens": len(last_prompt),
    }


def bandwidth(backend: LlamaBackend, decode_tps: float) -> dict:
    src = np.ones(256 * 1024 * 1024 // 8)  # 256 MiB, larger than any cache
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        float(src.sum())  # one streaming read of every byte
        best = max(best, src.nbytes / (time.perf_counter() - t0))
    ceiling = best / backend.info.file_size
    return {"read_bytes_per_s": round(best), "model_bytes": backend.info.file_size,
            "ceiling_tps": round(ceiling, 1), "decode_tps": decode_tps, "ratio": round(decode_tps / ceiling, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="tokens to decode in the overhead test")
    parser.add_argument("--steps", type=int, default=10, help="steps of the tool loop")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of each speed comparison")
    args = parser.parse_args()
    backend = LlamaBackend(ModelConfig(gpu_layers=0), Sampling(temperature=0.0, max_tokens=args.tokens))
    result = {"model": str(backend.path), "threads": available_cores(), "n_ctx": backend.n_ctx}
    result["overhead"] = overhead(backend, args.tokens, args.rounds)
    result["grammar_tax"] = grammar_tax(backend, args.rounds)
    result["prefix_reuse"] = prefix_reuse(backend, args.steps)
    result["bandwidth"] = bandwidth(backend, result["overhead"]["kernel_tps"])
    backend.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
