"""Cold and warm call latency of the calculator and plot tools, printed as JSON.

    .venv/bin/python benchmarks/tools_speed.py [--calls 20]

(The python sandbox and the browser have their own scripts: python_tool_speed.py, browser_tool_speed.py.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def summary(samples: list[float]) -> dict:
    return {"median": round(statistics.median(samples), 2), "max": round(max(samples), 2), "n": len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    from llmos.tools import ToolContext, load_builtin

    calc = load_builtin("calculator")
    cold_calc = timed(lambda: calc(expression="12345*6789"))  # includes importing SymPy
    warm_calc = [timed(lambda: calc(expression="12345*6789")) for _ in range(args.calls)]
    warm_solve = [timed(lambda: calc(expression="solve(x**2 - 4, x)")) for _ in range(args.calls)]
    with tempfile.TemporaryDirectory() as tmp:
        plot = load_builtin("plot", ToolContext.under(Path(tmp)))
        cold_plot = timed(lambda: plot(kind="line", y=[1, 4, 9, 16]))  # includes importing matplotlib
        warm_plot = [timed(lambda: plot(kind="line", y=[1, 4, 9, 16])) for _ in range(args.calls)]
    print(json.dumps({
        "calculator": {"cold_ms": round(cold_calc, 2), "warm_arithmetic_ms": summary(warm_calc), "warm_solve_ms": summary(warm_solve),
                       "note": "each evaluation runs in a forked, killable child process"},
        "plot": {"cold_ms": round(cold_plot, 2), "warm_ms": summary(warm_plot)},
    }, indent=2))


if __name__ == "__main__":
    main()
