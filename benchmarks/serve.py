"""`llmos serve` under load, measured with the official openai client; prints JSON.

prefix_reuse   one conversation asked twice: prompt tokens, cached tokens and seconds of each
               request (the second reuses the first's prefix in the KV cache)
concurrency    N different conversations at once (1, 2, 4) against the same N one at a time:
               aggregate completion tokens/s of each and their ratio (in-process decoding is one
               sequence at a time: expect about 1; a batching server behind model.server is how
               this grows)
               (with model.parallel, in-process turns ready at once share decode batches)
http_vs_in_process  the same streamed answers in this process (LlamaBackend.turn) and through
               `llmos serve` with the openai client: time to first token and tokens/s after it,
               best of 3 fresh prompts each (target: HTTP >= 0.9x in-process)

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


def story(i: int) -> list[dict]:
    return [{"role": "system", "content": f"You are storyteller number {i}."}, {"role": "user", "content": f"Tell story {i} about a fox."}]


def in_process(tokens: int) -> dict:
    from llmos.config import Sampling
    from llmos.llama import LlamaBackend
    from llmos.messages import Message

    backend = LlamaBackend()
    ttft, tps = [], []
    try:
        for i in range(3):
            t0 = time.perf_counter()
            first, n = None, 0
            for m in backend.turn([Message(d["role"], d["content"]) for d in story(900 + i)], [], "none", agent=f"b{i}",
                                  sampling=Sampling(max_tokens=tokens, temperature=0.0)):
                if m.is_delta and first is None:
                    first = time.perf_counter()
                elif not m.is_delta:
                    n = m.meta["stats"]["generated_tokens"]
            end = time.perf_counter()
            ttft.append(first - t0)
            tps.append((n - 1) / (end - first))
    finally:
        backend.close()
    return {"ttft_s": round(min(ttft), 4), "tps": round(max(tps), 1)}


def over_http(client, tokens: int) -> dict:  # noqa: ANN001
    ttft, tps = [], []
    for i in range(3):
        t0 = time.perf_counter()
        first, n = None, 0
        for chunk in client.chat.completions.create(model="llmos", messages=story(950 + i), max_tokens=tokens, temperature=0.0,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter()
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        end = time.perf_counter()
        ttft.append(first - t0)
        tps.append((n - 1) / (end - first))
    return {"ttft_s": round(min(ttft), 4), "tps": round(max(tps), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=48, help="max_tokens per request")
    args = parser.parse_args()
    from openai import OpenAI

    local = in_process(args.tokens)  # before the server starts: the two never share the cores
    with tempfile.TemporaryDirectory() as home:
        proc, url = start(home)
        client = OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=600)
        try:
            system = "You are a helpful assistant who answers in full sentences. " * 12
            ask = [{"role": "system", "content": system}, {"role": "user", "content": "Describe a lighthouse."}]
            reuse = []
            for _ in range(2):
                t = time.perf_counter()
                r = client.chat.completions.create(model="llmos", messages=ask, max_tokens=args.tokens)
                reuse.append({"prompt_tokens": r.usage.prompt_tokens, "cached_tokens": r.usage.prompt_tokens_details.cached_tokens,
                              "seconds": round(time.perf_counter() - t, 3)})

            def one(i: int, out: list) -> None:
                r = client.chat.completions.create(model="llmos", max_tokens=args.tokens, messages=[
                    {"role": "system", "content": f"You are storyteller number {i}."},
                    {"role": "user", "content": f"Tell story {i} about a fox."}])
                out.append(r.usage.completion_tokens)

            http = over_http(client, args.tokens)
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
    compare = {"in_process": local, "http": http, "ttft_ratio": round(local["ttft_s"] / http["ttft_s"], 3),
               "tps_ratio": round(http["tps"] / local["tps"], 3), "target": 0.9}
    print(json.dumps({"prefix_reuse": reuse, "concurrency": runs, "http_vs_in_process": compare, "max_tokens": args.tokens}, indent=2))


if __name__ == "__main__":
    main()
