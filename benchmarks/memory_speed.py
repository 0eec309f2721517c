"""Long-term memory: ingest throughput, query latency at N chunks, and recall@5 hybrid vs vector-only.

The recall corpus is Python's own language reference as shipped in `pydoc_data.topics` (text the
project did not write); each question names a phrase that only its answer chunk contains.
Usage: python benchmarks/memory_speed.py [--chunks 10000] [--queries 200]; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from llmos.memory.embed import MODEL_ID, MODEL_SHA256, default_embedder
from llmos.memory.ingest import chunk, ingest
from llmos.memory.store import MemoryStore

# (question, phrase found only in the chunk that answers it)
QUESTIONS = [
    ("How can a class declare a fixed set of attributes and avoid a per-instance dict?", "*__slots__* allow us to explicitly declare data members"),
    ("What happens when you divide a number by zero?", 'Division by zero raises the "ZeroDivisionError" exception'),
    ("Which PEP describes non-ASCII characters in identifiers?", "PEP 3131"),
    ("How do I pad a string on the left with zeros?", "str.zfill(width)"),
    ("How to compare strings ignoring case, for example German sharp s?", "str.casefold()"),
    ("Which hook runs on the parent class when someone subclasses it?", 'Whenever a class inherits from another class, "__init_subclass__()"'),
    ("What does an assert statement translate to?", '"assert expression", is equivalent to'),
    ("replace tab characters in a string with spaces", "str.expandtabs(tabsize=8)"),
    ("How are positional sub-patterns in a class pattern mapped to attributes?", '"__match_args__" attribute on the class'),
    ("__length_hint__", "object.__length_hint__(self)"),
    ("method used to losslessly convert an object to an integer, e.g. for slicing", "object.__index__(self)"),
    ("What code is an async with statement equivalent to?", "aenter = type(manager).__aenter__"),
    ("__set_name__ owner name", "object.__set_name__(self, owner, name)"),
    ("How can a dict subclass supply values for keys that are not present?", 'defines a method "__missing__()"'),
    ("declare that a variable inside a function refers to the module-level name", 'The "global" statement is a declaration'),
    ("rebind a variable of the enclosing function from a nested function", 'The "nonlocal" statement causes'),
    ("what determines where a name is visible in a block of code", "A *scope* defines the visibility of a name"),
    ("string literals prefixed with f that contain replacement fields", "*formatted string literal*"),
    ("which operators bind tighter than others, from lowest to highest", "summarizes the operator precedence"),
    ("a statement that does nothing, used as a placeholder", '"pass" is a null operation'),
]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def recall(store: MemoryStore, collection: str) -> dict:
    usable = [(q, a) for q, a in QUESTIONS if any(a in h for h in _all_texts(store, collection))]
    result = {"questions": len(usable)}
    for mode in ("hybrid", "vector", "keyword"):
        found = sum(any(a in h.text for h in store.search(q, k=5, collection=collection, mode=mode)) for q, a in usable)
        result[f"recall@5_{mode}"] = round(found / len(usable), 3)
    return result


def _all_texts(store: MemoryStore, collection: str) -> list[str]:
    return [r[0] for r in store._db.execute("SELECT text FROM chunks WHERE collection=?", (collection,))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=10_000, help="chunks stored before measuring query latency")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    from pydoc_data.topics import topics

    out: dict = {"embedder": MODEL_ID, "sha256": MODEL_SHA256, "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="llmos-memory-bench-") as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for name, text in topics.items():
            (docs / f"{name}.txt").write_text(text)
        t0 = time.perf_counter()
        default_embedder()(["warm up"])
        out["embedder_load_s"] = round(time.perf_counter() - t0, 2)
        with MemoryStore(Path(tmp) / "store", default_embedder()) as store:
            t0 = time.perf_counter()
            report = ingest(store, [docs], collection="pydoc")
            dt = time.perf_counter() - t0
            out["ingest"] = {"files": report.files, "chunks": report.chunks, "seconds": round(dt, 2), "chunks_per_s": round(report.chunks / dt, 1)}
            out["recall_pydoc_topics"] = recall(store, "pydoc")

            # Scale: sentences of the reference re-packed into ~400-char chunks, each carrying an ID.
            sentences = [s.strip() for t in topics.values() for s in " ".join(t.split()).split(". ") if len(s) > 40]
            rng = random.Random(0)
            ids: list[str] = []
            added = chars = 0
            t0 = time.perf_counter()
            while added < args.chunks:
                batch = []
                for _ in range(min(256, args.chunks - added)):
                    ident = str(uuid.UUID(int=rng.getrandbits(128)))
                    ids.append(ident)
                    body = ". ".join(rng.sample(sentences, 3))[:400]
                    batch.append(f"record {ident}: {body}")
                chars += sum(map(len, batch))
                added += len(store.add(batch, collection="scale", kind="document")[0])
            dt = time.perf_counter() - t0
            out["bulk_add"] = {"chunks": added, "avg_chars": round(chars / max(added, 1)), "seconds": round(dt, 1), "chunks_per_s": round(added / dt, 1)}

            queries = [q for q, _ in QUESTIONS] + [f"what is record {rng.choice(ids)}" for _ in range(len(QUESTIONS))]
            latency: dict = {}
            for mode in ("hybrid", "vector", "keyword"):
                times = []
                for i in range(args.queries):
                    t0 = time.perf_counter()
                    store.search(queries[i % len(queries)], k=5, collection="scale", mode=mode)
                    times.append((time.perf_counter() - t0) * 1000)
                latency[mode] = {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(percentile(times, 0.95), 1)}
            out["query_latency_at_chunks"] = {"chunks": store.count("scale"), **latency}
            probe = rng.sample(ids, 50)
            out["exact_id_recall@1_at_scale"] = {
                mode: sum(p in (store.search(f"record {p}", k=1, collection="scale", mode=mode) or [None])[0].text for p in probe) / 50
                for mode in ("hybrid", "vector")
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
