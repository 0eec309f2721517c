"""What the kernel's decision costs per user turn; prints JSON.

route_ms      the router's time per request (embedding the request, comparing it with the tools'
              texts and with requests that need no tool), warm, over the prompts of a routing
              suite (examples/evals/routing.jsonl, else a few built-in prompts): p50 / p95 / max
cold_ms       the first decision: loading the embedder and embedding every tool's texts once
second_pass   how often the second pass (checking and repairing calls) had to decode again, and
              what it cost, over the arithmetic prompts of the suite on the default model
              (--model-runs N prompts; 0 skips the model)

    .venv/bin/python benchmarks/routing.py [--suite FILE] [--model-runs 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FALLBACK = ["What is 17 * 23?", "Plot 1, 4, 9, 16 as a line chart.", "Run print(2**10) in Python.",
            "Open http://127.0.0.1:8000/ and summarize it.", "Hello!", "Who wrote Hamlet?", "What is 15% of 240?"]


def prompts(path: Path) -> list[dict]:
    if not path.exists():
        return [{"prompt": p, "tools": ["calculator", "plot", "python", "browser"]} for p in FALLBACK]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and "prompt" in json.loads(line)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", type=Path, default=ROOT / "examples" / "evals" / "routing.jsonl")
    parser.add_argument("--model-runs", type=int, default=10)
    args = parser.parse_args()
    from llmos.decide import Router
    from llmos.memory.embed import MiniLMEmbedder
    from llmos.tools import ToolContext, load_builtin

    cases = prompts(args.suite)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = ToolContext.under(Path(tmp))
        tools = [load_builtin(n, ctx) for n in ("calculator", "plot", "python", "browser")]
        router = Router(MiniLMEmbedder())
        t0 = time.perf_counter()
        router.decide("warm up", tools)
        cold = (time.perf_counter() - t0) * 1000
        times = []
        for case in cases:
            t0 = time.perf_counter()
            router.decide(case["prompt"], tools)
            times.append((time.perf_counter() - t0) * 1000)
        times.sort()
        report = {"prompts": len(times), "route_ms": {"p50": round(statistics.median(times), 2),
                  "p95": round(times[int(0.95 * (len(times) - 1))], 2), "max": round(times[-1], 2)},
                  "cold_ms": round(cold, 1), "target_ms": 30}
        arithmetic = [c for c in cases if c.get("expect") == "calculator"][: args.model_runs]
        if arithmetic:
            from llmos import Resources, build

            res = Resources()
            redone, extra_s, extra_tokens, turn_s = 0, [], 0, []
            try:
                for case in arithmetic:
                    kernel = build({"tools": ["calculator"], "sampling": {"max_tokens": 96}}, resources=res, trace=Path(tmp))
                    t0 = time.perf_counter()
                    for m in kernel.run(case["prompt"]):
                        if m.meta.get("event") == "system2":
                            redone += m.meta["extra_tokens"] > 0
                            extra_s.append(m.meta["extra_s"])
                            extra_tokens += m.meta["extra_tokens"]
                    turn_s.append(time.perf_counter() - t0)
                    kernel.close()
            finally:
                res.close()
            report["second_pass"] = {"runs": len(arithmetic), "second_pass_runs": len(extra_s), "decoded_again": redone,
                                     "extra_s_total": round(sum(extra_s), 3), "extra_tokens_total": extra_tokens,
                                     "run_s_p50": round(statistics.median(turn_s), 3)}
        for t in tools:
            if t.close:
                t.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
