"""Speed of the python tool's sandbox; prints JSON.

    .venv/bin/python benchmarks/python_tool_speed.py [--calls 20] [--starts 5]

cold_start_ms   first call of a fresh session (`1+1`): bwrap, namespaces, interpreter start, the cell
warm_call_ms    raw round trip of `1+1` in a running session (target: median under 50 ms), which
                includes the workspace scan before and after the call
unsandboxed     the same two numbers without bubblewrap, for comparison
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from llmos.tools.python import PythonOptions, PythonSession


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def measure(sandboxed: bool, calls: int, starts: int) -> dict:
    cold, warm, limit = [], [], None
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as folder:
        for i in range(starts):
            session = PythonSession(Path(folder) / f"ws{i}", PythonOptions(), sandboxed=sandboxed)
            try:
                t0 = time.perf_counter()
                assert session.run("1+1").value == "2"
                cold.append(time.perf_counter() - t0)
                if i == 0:
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        session.run("1+1")
                        warm.append(time.perf_counter() - t0)
                    limit = session.process_limit
            finally:
                session.close()
    return {
        "cold_start_ms": {
            "median": _ms(statistics.median(cold)), "min": _ms(min(cold)), "max": _ms(max(cold)), "n": len(cold),
        },
        "warm_call_ms": {
            "median": _ms(statistics.median(warm)),
            "p90": _ms(sorted(warm)[int(0.9 * (len(warm) - 1))]),
            "max": _ms(max(warm)),
            "n": len(warm),
            "target_ms": 50,
            "meets_target": statistics.median(warm) < 0.050,
        },
        "process_limit": limit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="warm calls to time")
    parser.add_argument("--starts", type=int, default=5, help="fresh sessions to time the first call of")
    args = parser.parse_args()
    print(json.dumps({
        "sandboxed": measure(True, args.calls, args.starts),
        "unsandboxed": measure(False, args.calls, args.starts),
    }, indent=2))


if __name__ == "__main__":
    main()
