"""Batched decoding: the aggregate tokens/s of 1, 2 and 4 agents decoding at once on one model
(their tokens share llama.cpp batches) against the same turns one at a time; prints JSON.

    .venv/bin/python benchmarks/batched.py [--tokens 64] [--rounds 2] [--gpu-layers 0]

Each agent first reads its prompt (a turn of one token), so the measured turns are decoding, not
prefill: `decode_tps` is generated tokens over wall time. `ceiling` shows what these cores allow
at best: one sequence evaluating 4 and 8 tokens per llama_decode against 1, and 4 sequences of one
token each per decode. `threads` (in a fresh process) is llama_decode called from the main thread vs
from other threads: why the backend decodes on one thread of its own.
Sequential and concurrent runs alternate; the best of each is kept.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

from llmos.config import ModelConfig, Sampling
from llmos.llama import LlamaBackend, available_cores
from llmos.messages import Message

QUESTIONS = [
    "Tell me a long story about a lighthouse keeper.",
    "Explain how bread is made, step by step.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about a trip to the sea.",
]


def one_turn(backend: LlamaBackend, agent: str, question: str, tokens: int) -> dict:
    reply = None
    for reply in backend.turn([Message("user", question)], [], "none", agent=agent, sampling=Sampling(max_tokens=tokens)):
        pass
    return reply.meta["stats"]


def run(backend: LlamaBackend, agents: int, tokens: int, together: bool) -> dict:
    names = [f"agent{i}" for i in range(agents)]
    for name, question in zip(names, QUESTIONS):
        one_turn(backend, name, question, 1)  # the prompt is in the agent's cells from now on
    stats: list[dict] = []
    t0 = time.perf_counter()
    if together:
        threads = [threading.Thread(target=lambda n=n, q=q: stats.append(one_turn(backend, n, q, tokens)))
                   for n, q in zip(names, QUESTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        stats = [one_turn(backend, n, q, tokens) for n, q in zip(names, QUESTIONS)]
    wall = time.perf_counter() - t0
    for name in names:
        backend.forget(name)
    generated = sum(s["generated_tokens"] for s in stats)
    return {"generated": generated, "wall_s": wall, "tps": generated / wall,
            "batched_steps": sum(s["batched_steps"] for s in stats)}


def ceiling(backend: LlamaBackend) -> dict:
    """What batching can give on these cores: one sequence fed 1, 4 and 8 tokens per decode, and
    4 sequences fed 1 token each per decode (what 4 agents' steps are), no sampling or turn work."""
    backend.reset()
    slots = backend._slots
    for slot in slots:
        backend.batcher.step(slot, backend.tokenize("The lighthouse keeper"), lambda row: None)
    out = {}
    for width in (1, 4, 8):
        t0 = time.perf_counter()
        for i in range(64 // width):
            backend.batcher.step(slots[0], [100 + i] * width, lambda row: None)
        out[f"tps_{width}_per_decode_one_sequence"] = round(64 / (time.perf_counter() - t0), 1)
    backend.batcher.running = len(slots)  # the decode thread waits for a step of each
    decodes = backend.batcher.decodes
    t0 = time.perf_counter()
    threads = [threading.Thread(target=lambda s=s: [backend.batcher.step(s, [100 + i], lambda row: None) for i in range(32)])
               for s in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out[f"tps_{len(slots)}_sequences_1_each"] = round(32 * len(slots) / (time.perf_counter() - t0), 1)
    out["decodes_for_those"] = backend.batcher.decodes - decodes
    backend.batcher.running = 0
    backend.reset()
    one = out["tps_1_per_decode_one_sequence"]
    out["ratio_4_tokens_one_sequence"] = round(out["tps_4_per_decode_one_sequence"] / one, 2)
    out[f"ratio_{len(slots)}_sequences"] = round(out[f"tps_{len(slots)}_sequences_1_each"] / one, 2)
    return out


def threads_probe() -> dict:
    """Tokens/s of llama_decode called from the main thread vs from another thread, in a process
    with no decode thread (why LlamaBackend decodes on a thread of its own)."""
    import llama_cpp as lc

    from llmos.models import default_model_path

    llm = lc.Llama(model_path=str(default_model_path()), n_ctx=512, n_threads=available_cores(),
                   n_threads_batch=available_cores(), verbose=False)
    ctx = llm._ctx.ctx
    batch = lc.llama_batch_init(8, 0, 1)

    def raw() -> float:
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        for i in range(64):
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = 100 + i, i, 1, True
            batch.seq_id[0][0] = 0
            batch.n_tokens = 1
            lc.llama_decode(ctx, batch)
        return 64 / (time.perf_counter() - t0)

    def elsewhere() -> float:
        out: list[float] = []
        t = threading.Thread(target=lambda: out.append(raw()))
        t.start()
        t.join()
        return out[0]

    main_tps, other_tps = [], []
    for _ in range(3):  # interleaved, best of each
        main_tps.append(raw())
        other_tps.append(elsewhere())
    lc.llama_batch_free(batch)
    llm.close()
    return {"decode_from_main_thread_tps": round(max(main_tps), 1), "decode_from_other_threads_tps": round(max(other_tps), 1),
            "ratio": round(max(other_tps) / max(main_tps), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gpu-layers", default="0")
    parser.add_argument("--threads-probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads_probe:
        print(json.dumps(threads_probe()))
        return
    probe = subprocess.run([sys.executable, __file__, "--threads-probe"], capture_output=True, text=True, check=True)
    gpu = args.gpu_layers if args.gpu_layers == "auto" else int(args.gpu_layers)
    result: dict = {"cores": available_cores(), "tokens_per_turn": args.tokens, "rounds": args.rounds,
                    "target_ratio_at_4": 1.5, "threads": json.loads(probe.stdout)}
    for unified in (False, True):  # model.kv_unified: a KV buffer per sequence, or one for all
        backend = LlamaBackend(ModelConfig(gpu_layers=gpu, n_ctx=2048, parallel=4, kv_unified=unified), Sampling(temperature=0.0))
        rows = []
        for agents in (1, 2, 4):
            best: dict[bool, dict] = {}
            for _ in range(args.rounds):
                for together in (False, True):
                    r = run(backend, agents, args.tokens, together)
                    if together not in best or r["tps"] > best[together]["tps"]:
                        best[together] = r
            seq, con = best[False], best[True]
            rows.append({"agents": agents, "sequential_tps": round(seq["tps"], 1), "concurrent_tps": round(con["tps"], 1),
                         "ratio": round(con["tps"] / seq["tps"], 2), "generated": con["generated"],
                         "steps_in_shared_batches": con["batched_steps"]})
        result["model"], result["gpu_layers"] = backend.name, backend.gpu_layers
        result["kv_unified" if unified else "kv_per_sequence"] = {"runs": rows, "ceiling": ceiling(backend)}
        backend.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
