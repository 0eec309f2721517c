"""Several agents on one model, side by side in one run; prints JSON.

    .venv/bin/python benchmarks/agents.py

switch_cost     restoring an agent's saved KV state (from RAM, and from disk after a spill) vs
                re-prefilling its context, at ~1k and ~4k tokens
throughput      4 agents whose every step waits ~1 s on a tool: run concurrently (threads, one
                scheduler, one model of one slot: turns one at a time) vs one after another (target >= 2x); model_s is the time
                the model spent on their turns (the bound: speedup <= total / model time)
parallel_tools  k independent calls in one turn take about the longest, not the sum
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from pathlib import Path

from llmos import Kernel, tool
from llmos.config import ModelConfig, Sampling
from llmos.llama import LlamaBackend
from llmos.messages import Message, ToolCall
from llmos.scheduler import Scheduler
from llmos.toolbox import Toolbox


@tool
def wait_for_data(seconds: float = 1.0) -> str:
    """Wait for a slow data source and return its reading."""
    time.sleep(seconds)
    return "reading: 42"


def switch_cost(backend: LlamaBackend, tokens: int, spill: Path) -> dict:
    text = ("The keeper climbed the stairs and lit the lamp. " * (tokens // 10))[: tokens * 5]
    messages = [Message("user", text)]
    prompt = backend.tokenize(backend.render(messages, []))
    backend.reset()
    slot = backend._slots[0]
    t0 = time.perf_counter()
    backend.batcher.step(slot, prompt, lambda row: None)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = backend.kv.save(slot)
    save = time.perf_counter() - t0
    t0 = time.perf_counter()
    ok = backend.kv.load(slot, state)
    restore = time.perf_counter() - t0
    # the same state spilled to disk (what happens beyond model.kv_ram_mb), then restored from the file
    t0 = time.perf_counter()
    state.spill(spill, f"x{tokens}")
    spill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ok_disk = backend.kv.load(slot, state)
    restore_disk = time.perf_counter() - t0
    state.drop()
    backend.reset()
    return {"context_tokens": len(prompt), "prefill_s": round(prefill, 3), "save_s": round(save, 4),
            "restore_s": round(restore, 4), "restore_ok": ok, "state_bytes": state.size,
            "restore_over_prefill": round(restore / prefill, 4), "target": 0.02,
            "spill_s": round(spill_s, 4), "restore_from_disk_s": round(restore_disk, 4), "restore_from_disk_ok": ok_disk,
            "restore_from_disk_over_prefill": round(restore_disk / prefill, 4)}


def throughput(backend: LlamaBackend, tmp: Path) -> dict:
    """The same 4 agents one after another, then at once through one scheduler."""
    def agent(i: int, scheduler: Scheduler | None = None) -> dict:
        k = Kernel(backend, tools=[wait_for_data], trace=tmp, config={"agent": {"name": f"agent{i}"}, "budget": {"steps": 3}, "sampling": {"max_tokens": 48}},
                   scheduler=scheduler)
        stats = [m.meta["stats"] for m in k.run(f"Agent {i}: get the reading from the slow data source.",
                                                 tool_choice="wait_for_data") if m.role == "assistant" and not m.is_delta]
        backend.forget(k.key)
        return {"turns": len(stats), "model_s": sum(s["prefill_s"] + s["decode_s"] for s in stats)}

    t0 = time.perf_counter()
    alone = [agent(i) for i in range(4)]
    sequential = time.perf_counter() - t0
    scheduler = Scheduler(slots=backend.slots)
    together: list[dict] = []
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: together.append(agent(10 + i, scheduler))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    concurrent = time.perf_counter() - t0
    model_s = sum(a["model_s"] for a in alone)
    return {"agents": 4, "sequential_s": round(sequential, 2), "concurrent_s": round(concurrent, 2),
            "speedup": round(sequential / concurrent, 2), "target": 2.0,
            "model_s_sequential": round(model_s, 2), "model_s_concurrent": round(sum(a["model_s"] for a in together), 2),
            "turns": sum(a["turns"] for a in alone), "switches": backend.switches}


def parallel_tools() -> dict:
    box = Toolbox([wait_for_data])
    calls = [ToolCall("wait_for_data", {"seconds": s}) for s in (1.0, 0.5, 0.8, 0.3)]
    t0 = time.perf_counter()
    box.call_all(calls)
    took = time.perf_counter() - t0
    return {"calls": len(calls), "sum_s": 2.6, "longest_s": 1.0, "took_s": round(took, 3)}


def main() -> None:
    backend = LlamaBackend(ModelConfig(gpu_layers=0, n_ctx=8192, parallel=1), Sampling(max_tokens=48))
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "switch_cost": [switch_cost(backend, 1000, Path(tmp)), switch_cost(backend, 4000, Path(tmp))],
            "throughput": throughput(backend, Path(tmp)),
            "parallel_tools": parallel_tools(),
        }
    backend.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
