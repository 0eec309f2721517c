"""`llmos serve` under load, measured with the official openai client; prints JSON.

prefix_reuse   one conversation asked twice: prompt tokens, cached tokens and seconds of each
               request (the second reuses the first's prefix in the KV cache)
concurrency    N different conversations at once (1, 2, 4) against the same N one at a time:
               aggregate completion tokens/s of each and their ratio (in-process decoding is one
               sequence at a time: expect about 1; a batching server behind model.server is how
               this grows)

    .venv/bin/python benchmarks/serve.py [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time


def start(home: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "llmos", "serve", "--port", "0"], env={**os.environ, "LLMOS_HOME": home},
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        m = re.search(r"on (http://\S+)/v1", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
            return proc, m.group(1)
    raise SystemExit("llmos serve did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    args = parser.parse_args()
    from openai import OpenAI

    with tempfile.TemporaryDirectory() as home:
        proc, url = start(home)
        client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        try:
            system = "You are a helpful assistant who answers in full sentences. " * 12
            ask = [{"role": "system", "content": system}, {"role": "user", "content": "Describe a lighthouse."}]
            reuse = []
            for _ in range(2):
                t = time.perf_counter()
                r = client.chat.completions.create(model="m", messages=ask, max_tokens=args.tokens)
                reuse.append({"prompt_tokens": r.usage.prompt_tokens, "cached_tokens": r.usage.prompt_tokens_details.cached_tokens,
                              "seconds": round(time.perf_counter() - t, 3)})

            def one(i: int, out: list) -> None:
                r = client.chat.completions.create(model="m", max_tokens=args.tokens, messages=[
                    {"role": "system", "content": f"You are storyteller number {i}."},
                    {"role": "user", "content": f"Tell story {i} about a fox."}])
                out.append(r.usage.completion_tokens)

            runs = {}
            for n in (1, 2, 4):
                done: list = []
                t = time.perf_counter()
                for i in range(n):
                    one(100 * n + i, done)
                sequential = sum(done) / (time.perf_counter() - t)
                done = []
                t = time.perf_counter()
                threads = [threading.Thread(target=one, args=(200 * n + i, done)) for i in range(n)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                concurrent = sum(done) / (time.perf_counter() - t)
                runs[str(n)] = {"sequential_tps": round(sequential, 2), "concurrent_tps": round(concurrent, 2),
                                "ratio": round(concurrent / sequential, 3)}
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps({"prefix_reuse": reuse, "concurrency": runs, "max_tokens": args.tokens}, indent=2))


if __name__ == "__main__":
    main()
