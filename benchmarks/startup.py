"""Start-up latency of the front doors, printed as JSON (medians of a few runs).

    .venv/bin/python benchmarks/startup.py [--runs 3]

help_s              `llmos --help` wall time (target < 1 s)
shell_prompt_s      from starting `llmos` to the prompt being drawn (target < 1.5 s); the model
                    loads on a thread behind the prompt
model_load_s        loading the default model alone (LlamaBackend), for reference
agent_first_token_s from `llmos agent` start to the first streamed token, and the same with the
                    model load subtracted
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMOS = [sys.executable, "-m", "llmos.cli"]


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 3)


def shell_prompt(home: str) -> None:
    import pexpect

    env = {**os.environ, "LLMOS_HOME": home, "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(LLMOS[0], LLMOS[1:] + ["repl"], env=env, encoding="utf-8", timeout=60)
    child.expect_exact("llmos>")
    child.terminate(force=True)


def model_load() -> None:
    from llmos.config import ModelConfig
    from llmos.llama import LlamaBackend

    LlamaBackend(ModelConfig(gpu_layers=0)).close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "LLMOS_HOME": home}
        help_s = median_time(lambda: subprocess.run(LLMOS + ["--help"], capture_output=True, env=env, check=True), args.runs)
        prompt_s = median_time(lambda: shell_prompt(home), args.runs)
        load_s = median_time(model_load, args.runs)
        task = Path(home) / "t.yaml"
        task.write_text("goal: Say hello.\ntools: {enabled: []}\nsampling: {max_tokens: 8}\nartifacts: out\n")
        firsts, totals = [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            subprocess.run(LLMOS + ["agent", str(task), "--json"], capture_output=True, env=env, check=True)
            totals.append(time.perf_counter() - t0)
            result = json.loads((Path(home) / "out" / "result.json").read_text())
            # result's first_token_s counts from the kernel run; add process start and model load
            firsts.append(totals[-1] - result["timings"]["total_s"] + result["timings"]["first_token_s"])
    first = statistics.median(firsts)
    print(json.dumps({
        "help_s": help_s, "help_target_s": 1.0,
        "shell_prompt_s": prompt_s, "shell_prompt_target_s": 1.5,
        "model_load_s": load_s,
        "agent_first_token_s": round(first, 3), "agent_first_token_without_model_load_s": round(first - load_s, 3),
        "runs": args.runs,
    }, indent=2))


if __name__ == "__main__":
    main()
