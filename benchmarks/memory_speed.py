"""Long-term memory: ingest throughput, query latency at 10k and 100k chunks, recall@5 hybrid vs vector vs keyword.

What is real and what is synthetic:
- Recall is measured on real data only: Python's own language reference as shipped in
  `pydoc_data.topics` (text the project did not write), ingested and embedded by the real MiniLM
  model; each question names a phrase that only its answer chunk contains.
- Ingest throughput ("ingest", "real_add") is the real model embedding real chunks.
- The latency collection holds `--real` chunks embedded by the real model and fills up to each
  size in `--sizes` with distinct synthetic chunks (sentences of the reference re-packed, each with
  its own UUID) whose vectors are NOT computed by the model: each is a mix of two real chunk vectors
  plus small random noise, passed in through MemoryStore's public `embedder=` parameter
  (embedding 100k chunks for real takes hours on 2 cores). Queries are embedded by the real model,
  so query latency includes real query embedding, the real FTS5 index and the real Chroma HNSW index
  at that size. What the large run measures is latency, not retrieval quality.
Usage: python benchmarks/memory_speed.py [--sizes 10000,100000] [--real 2000] [--queries 200] [--server URL];
prints one JSON object. With --server the collections live on that Chroma server (use a fresh one:
the benchmark's collection names are fixed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from llmos.memory.embed import MODEL_ID, MODEL_SHA256, default_embedder
from llmos.memory.ingest import ingest
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
NOISE = 0.05  # per-dimension std-dev of the noise on synthetic vectors (unit vectors have ~0.05 per dimension)


class SyntheticVectors:
    """Benchmark-only embedder: registered synthetic texts get a mix of two real vectors plus noise; anything else (queries, real chunks) goes to the real model."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.pool: list[np.ndarray] = []  # real vectors of real chunks, the material for synthetic ones
        self.synthetic: dict[str, tuple[int, int, int]] = {}  # text -> (pool index a, pool index b, noise seed)
        self.collect = False  # while True, real vectors computed are kept in the pool

    def name(self) -> str:
        return f"benchmark-synthetic+{MODEL_ID}"

    def register(self, text: str, seed: int) -> None:
        rng = random.Random(seed)
        self.synthetic[text] = (rng.randrange(len(self.pool)), rng.randrange(len(self.pool)), seed)

    def __call__(self, texts: Sequence[str]) -> list[np.ndarray]:
        out: list[Any] = [None] * len(texts)
        real_idx = [i for i, t in enumerate(texts) if t not in self.synthetic]
        if real_idx:
            for i, v in zip(real_idx, self.real([texts[i] for i in real_idx])):
                out[i] = v
                if self.collect:
                    self.pool.append(v)
        for i, text in enumerate(texts):
            if out[i] is None:
                a, b, seed = self.synthetic[text]
                v = self.pool[a] + self.pool[b] + np.random.default_rng(seed).normal(0, NOISE, self.pool[a].shape)
                out[i] = (v / np.linalg.norm(v)).astype(np.float32)
        return out


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def recall(store: MemoryStore, collection: str) -> dict:
    texts = [r[0] for r in store._db.execute("SELECT text FROM chunks WHERE collection=?", (collection,))]
    usable = [(q, a) for q, a in QUESTIONS if any(a in t for t in texts)]
    result: dict[str, Any] = {"questions": len(usable)}
    for mode in ("hybrid", "vector", "keyword"):
        found = sum(any(a in h.text for h in store.search(q, k=5, collection=collection, mode=mode)) for q, a in usable)
        result[f"recall@5_{mode}"] = round(found / len(usable), 3)
    return result


def latency(store: MemoryStore, queries: list[str], n: int, collection: str) -> dict:
    result = {}
    for mode in ("hybrid", "vector", "keyword"):
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            store.search(queries[i % len(queries)], k=5, collection=collection, mode=mode)
            times.append((time.perf_counter() - t0) * 1000)
        result[mode] = {"p50_ms": round(statistics.median(times), 1), "p95_ms": round(percentile(times, 0.95), 1)}
    return result


def parts(store: MemoryStore, real: Any, queries: list[str], collection: str) -> dict:
    """Median time of each step of a hybrid search, run alone (benchmark-only use of the store's internals)."""
    col = store._collection(collection)
    steps: dict[str, list[float]] = {"embed_query": [], "keyword_fts5": [], "vector_index": [], "ledger_fetch": []}
    for q in queries:
        t0 = time.perf_counter()
        vector = [list(map(float, real([q])[0]))]
        t1 = time.perf_counter()
        keyword = store._keyword_ids(q, collection, 50)
        t2 = time.perf_counter()
        ranked = col.query(query_embeddings=vector, n_results=50, include=[])["ids"][0]
        t3 = time.perf_counter()
        store._ledger_hits(list(dict.fromkeys(keyword + ranked))[:10])  # search fetches the top 2k first
        t4 = time.perf_counter()
        for name, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            steps[name].append(dt * 1000)
    return {name: round(statistics.median(v), 2) for name, v in steps.items()}


def record(ident: str, rng: random.Random, sentences: list[str]) -> str:
    return f"record {ident}: " + ". ".join(rng.sample(sentences, 3))[:400]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="collection sizes (chunks) at which query latency is measured")
    parser.add_argument("--real", type=int, default=2000, help="chunks of the latency collection embedded by the real model")
    parser.add_argument("--queries", type=int, default=200, help="queries per mode and size")
    parser.add_argument("--server", help="a Chroma server URL (`chroma run`) to hold the vector index instead of a local folder")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    from pydoc_data.topics import topics

    out: dict = {
        "embedder": MODEL_ID, "sha256": MODEL_SHA256, "python": platform.python_version(), "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(), "vector_index": args.server or "local folder",
        "synthetic": f"latency collection beyond the first {args.real} chunks: real text, vectors = mix of two real vectors + N(0, {NOISE}) noise; queries use the real model",
    }
    real = default_embedder()
    with tempfile.TemporaryDirectory(prefix="llmos-memory-bench-") as tmp:
        docs = Path(tmp) / "docs"
        docs.mkdir()
        for name, text in topics.items():
            (docs / f"{name}.txt").write_text(text)
        t0 = time.perf_counter()
        real(["warm up"])
        out["embedder_load_s"] = round(time.perf_counter() - t0, 2)
        embedder = SyntheticVectors(real)
        with MemoryStore(Path(tmp) / "store", embedder, server=args.server) as store:
            t0 = time.perf_counter()
            report = ingest(store, [docs], collection="pydoc")
            dt = time.perf_counter() - t0
            out["ingest"] = {"files": report.files, "chunks": report.chunks, "seconds": round(dt, 2), "chunks_per_s": round(report.chunks / dt, 1)}
            out["recall_pydoc_topics"] = recall(store, "pydoc")

            # Latency collection: ~400-char chunks of reference sentences, each carrying a UUID.
            sentences = [s.strip() for t in topics.values() for s in " ".join(t.split()).split(". ") if len(s) > 40]
            rng = random.Random(0)
            ids: list[str] = []

            def fill(upto: int, synthetic: bool) -> tuple[int, float]:
                added, t = 0, time.perf_counter()
                while store.count("scale") < upto:
                    batch = []
                    for _ in range(min(256, upto - store.count("scale"))):
                        ids.append(str(uuid.UUID(int=rng.getrandbits(128))))
                        batch.append(record(ids[-1], rng, sentences))
                        if synthetic:
                            embedder.register(batch[-1], int(hashlib.sha256(batch[-1].encode()).hexdigest()[:15], 16))
                    added += len(store.add(batch, collection="scale")[0])
                return added, time.perf_counter() - t

            embedder.collect = True
            n, dt = fill(min(args.real, sizes[0]), synthetic=False)
            embedder.collect = False
            out["real_add"] = {"chunks": n, "seconds": round(dt, 1), "chunks_per_s": round(n / dt, 1)}
            queries = [q for q, _ in QUESTIONS] + [f"what is record {rng.choice(ids)}" for _ in range(len(QUESTIONS))]
            out["latency"] = []
            for size in sizes:
                n, dt = fill(size, synthetic=True)
                entry: dict[str, Any] = {"chunks": store.count("scale"), "synthetic_chunks": store.count("scale") - args.real,
                                         "synthetic_add": {"chunks": n, "seconds": round(dt, 1), "chunks_per_s": round(n / max(dt, 1e-9), 1)}}
                entry.update(latency(store, queries, args.queries, "scale"))
                entry["hybrid_parts_p50_ms"] = parts(store, real, queries, "scale")
                # The keyword index and its word statistics span all collections: the real set's
                # recall again, now that this many other chunks share them.
                entry["recall_pydoc_topics_beside_these_chunks"] = recall(store, "pydoc")
                probe = rng.sample(ids, 50)
                entry["exact_id_recall@1"] = {
                    mode: sum(p in (store.search(f"record {p}", k=1, collection="scale", mode=mode) or [None])[0].text for p in probe) / 50
                    for mode in ("hybrid", "vector")
                }
                out["latency"].append(entry)
    out["load_average_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
