"""The cost of a paging step, and whether paging keeps the cached prefix; prints JSON.

    .venv/bin/python benchmarks/paging.py [--n-ctx 1024]

A conversation on the default model with a small window runs until the kernel pages out. Reported:
the paging step's time (summary turn + store writes), and for the turn after it the tokens that
had to be evaluated vs the prompt's size: the system prompt and tools block stay cached, so only
the changed part (memory regions and recent messages) is re-read, not the whole window.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from llmos import Kernel
from llmos.config import ModelConfig, Sampling
from llmos.llama import LlamaBackend
from llmos.memory.window import Memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-ctx", type=int, default=1024)
    args = parser.parse_args()
    from llmos.memory.store import MemoryStore

    backend = LlamaBackend(ModelConfig(gpu_layers=0, n_ctx=args.n_ctx), Sampling(max_tokens=48))
    with tempfile.TemporaryDirectory() as tmp:
        store = MemoryStore(Path(tmp) / "memory")
        kernel = Kernel(backend, tools=[], trace=Path(tmp), memory=Memory(store), config={"sampling": {"max_tokens": 48}})
        # system prompt + tools block, rendered alone (this count includes the template's few
        # generation-prompt tokens, which a longer prompt does not share)
        prefix = backend.count([kernel.memory.view()[0]], list(kernel.tools))
        filler = "Tell me about the history of lighthouses and ships at sea, in detail. " * 3
        result: dict = {"n_ctx": args.n_ctx, "stable_prefix_tokens": prefix}
        for turn in range(1, 30):
            t0 = time.perf_counter()
            msgs = list(kernel.run(f"({turn}) {filler}"))
            page = next((m for m in msgs if m.meta.get("event") == "page_out"), None)
            if page is None:
                continue
            stats = [m.meta["stats"] for m in msgs if m.role == "assistant"][-1]
            turn_s = time.perf_counter() - t0
            result.update({
                "turns_before_paging": turn, "paged_out_messages": page.meta["messages"],
                "paging_turn_s": round(turn_s, 3),
                "after_paging": {"prompt_tokens": stats["prompt_tokens"], "cached_tokens": stats["cached_tokens"],
                                 "evaluated_tokens": stats["evaluated_tokens"], "prefill_s": stats["prefill_s"]},
            })
            # the turn after: back to appending only
            list(kernel.run("Thanks. One more sentence, please."))
            after = dict(backend.last)
            result["next_turn"] = {"prompt_tokens": after["prompt_tokens"], "evaluated_tokens": after["evaluated_tokens"]}
            break
        store.close()
    backend.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
