"""The long-term store on a real Chroma folder with the real offline embedder (no network)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from llmos.memory.embed import MODEL_SHA256, MiniLMEmbedder, default_embedder
from llmos.memory.store import MemoryStore, StoreCorrupt, StoreLocked
from llmos.memory.tools import make
from llmos.messages import ToolCall
from llmos.toolbox import Toolbox

DOCS = [
    "To change your account password, open Settings, choose Security and press 'Reset credentials'.",
    "Bananas are a yellow tropical fruit that is rich in potassium.",
    "The Eiffel Tower in Paris was completed in 1889 for the World's Fair.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen in plants.",
    "The quarterly sales report showed revenue grew by twelve percent compared to last year.",
]


def run_py(code, *args, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture
def store(tmp_path):
    s = MemoryStore(tmp_path / "mem", default_embedder())
    yield s
    s.close()


def test_embedder_is_semantic_and_pinned():
    import numpy as np

    e = default_embedder()
    v = np.array(e(["How do I reset my password?", "Steps to change the login credentials", "A recipe for chocolate cake"]))
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert e.get_config()["sha256"] == MODEL_SHA256 and MiniLMEmbedder.name()


def test_embedder_refuses_a_file_with_another_hash():
    from llmos.memory.embed import EmbedderError, _checked

    with pytest.raises(EmbedderError, match="expected " + MODEL_SHA256):
        _checked(b"not the model", MODEL_SHA256, "model.onnx")


def test_semantic_round_trip_and_reopen_in_new_process(tmp_path):
    path = tmp_path / "mem"
    with MemoryStore(path, default_embedder()) as s:
        added, dups = s.add(DOCS, source="notes.txt")
        assert len(added) == len(DOCS) and dups == 0
        hits = s.search("how can I modify my login secret", k=2)
        assert hits[0].text == DOCS[0] and hits[0].source == "notes.txt"
        assert s.search("which plant process makes sugar from light", k=1)[0].text == DOCS[3]
    out = run_py(
        """
        import sys
        from llmos.memory.store import MemoryStore
        with MemoryStore(sys.argv[1]) as s:
            print(s.count(), s.search("famous iron landmark in France", k=1)[0].text)
        """,
        path,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{len(DOCS)} ") and "Eiffel" in out.stdout


def test_dedup_by_content_hash_and_delete(store):
    ids, dups = store.add(DOCS[:2], source="a")
    again, dups2 = store.add([DOCS[1], DOCS[2]], source="b")
    assert dups == 0 and dups2 == 1 and len(again) == 1
    assert store.count() == 3
    assert store.add([DOCS[0]], collection="other")[0], "collections dedup separately"
    assert store.delete([ids[0]]) == 1
    assert store.count() == 2
    assert all(h.id != ids[0] for h in store.search(DOCS[0], k=5))


def test_hybrid_finds_exact_identifier_that_vectors_rank_low(store):
    target_id = str(uuid.uuid4())
    filler = [f"Incident {i}: request {uuid.uuid4()} failed with a timeout in the payment service." for i in range(30)]
    target = f"Shipping note: parcel {target_id} was delivered to the warehouse on Monday."
    store.add(filler + [target])
    query = f"did request {target_id} fail with a timeout?"
    vector = [h.text for h in store.search(query, k=5, mode="vector")]
    hybrid = store.search(query, k=5)
    assert target not in vector  # the sentence's meaning points at the incidents, not the parcel
    assert hybrid[0].text == target
    assert store.search("ERR_E4711", k=1, mode="keyword") == []
    assert store.search('weird "quote (paren) AND* NEAR -x ^', k=1)  # FTS5 syntax in a query is just text


def test_keyword_search_keeps_rare_words_and_a_lone_common_one(store):
    filler = [f"Payment {i} was approved by the bank and settled the next day." for i in range(40)]
    store.add(filler + ["Payment 99 bounced: the card ZX81Q was reported stolen."])
    # "payment", "the", "was" are in every chunk; the rare words decide
    assert store.search("was the payment with card zx81q stolen", k=1, mode="keyword")[0].text.endswith("stolen.")
    assert len(store.search("payment", k=5, mode="keyword")) == 5  # a query of only common words still matches


def test_second_process_gets_in_use_error_quickly(store):
    start = time.monotonic()
    out = run_py(
        """
        import sys, time
        from llmos.memory.store import MemoryStore, StoreLocked
        t = time.monotonic()
        try:
            MemoryStore(sys.argv[1])
        except StoreLocked as exc:
            print(f"{time.monotonic() - t:.2f}", exc)
        """,
        store.path,
    )
    assert out.returncode == 0, out.stderr
    assert f"is in use by PID {os.getpid()}" in out.stdout
    assert float(out.stdout.split()[0]) < 2.0
    with pytest.raises(StoreLocked):
        MemoryStore(store.path)
    assert time.monotonic() - start < 60


def test_kill_9_during_writes_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "mem"
    child = subprocess.Popen(
        [sys.executable, "-u", "-c", textwrap.dedent(
            """
            import sys
            from llmos.memory.store import MemoryStore
            s = MemoryStore(sys.argv[1])
            for i in range(10_000):
                ids, _ = s.add([f"fact number {i}: the code word is w{i * 7919}"], kind="fact")
                print(ids[0], flush=True)
            """
        ), str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    acked = []
    for line in child.stdout:
        acked.append(line.strip())
        if len(acked) >= 12:
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    acked += [line.strip() for line in child.stdout.read().splitlines() if line.strip()]
    assert len(acked) >= 12, child.stderr.read()
    with MemoryStore(path, default_embedder()) as s:
        for cid in acked:
            assert s.get(cid) is not None, cid
        assert s.count() >= len(acked)
        n = len(acked) - 1
        hits = s.search(f"w{n * 7919}", k=1)
        assert hits and hits[0].text.endswith(f"w{n * 7919}")
        # the vector index was re-synced: every chunk in the ledger is findable by vector search
        assert s._collection("default").count() == s.count()


def test_corrupt_index_gives_readable_error_and_rebuild_restores(tmp_path):
    path = tmp_path / "mem"
    with MemoryStore(path, default_embedder()) as s:
        s.add(DOCS)
    (path / "chroma" / "chroma.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreCorrupt, match="rebuild"):
        MemoryStore(path, default_embedder())
    with MemoryStore.rebuild(path, default_embedder()) as s:
        assert s.count() == len(DOCS)
        assert s.search("yellow fruit", k=1, mode="vector")[0].text == DOCS[1]


def test_corrupt_ledger_is_a_readable_error(tmp_path):
    path = tmp_path / "mem"
    path.mkdir()
    (path / "ledger.sqlite3").write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreCorrupt, match="ledger"):
        MemoryStore(path, default_embedder())
    with MemoryStore(tmp_path / "fresh", default_embedder()):
        pass  # the lock of the failed open was released; other stores still open


def test_store_from_another_version_is_a_readable_error(tmp_path):
    import sqlite3

    from llmos.memory.store import StoreError

    path = tmp_path / "mem"
    MemoryStore(path, default_embedder()).close()
    with sqlite3.connect(path / "ledger.sqlite3") as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema'")
    with pytest.raises(StoreError, match="schema version 99"):
        MemoryStore(path, default_embedder())


def test_memory_tools(store):
    tools = Toolbox(make(store))
    search, insert = tools.get("memory_search"), tools.get("memory_insert")
    assert search.untrusted and not insert.untrusted
    saved = tools.call(ToolCall("memory_insert", {"fact": "The user's cat is called Miso."}))
    assert saved.content == "saved"
    assert tools.call(ToolCall("memory_insert", {"fact": "The user's cat is called Miso."})).content == "already remembered"
    store.add(DOCS, source="notes.txt")
    found = tools.call(ToolCall("memory_search", {"query": "what is the name of my pet"}))
    assert found.meta.get("untrusted") is True
    assert "Miso" in found.content.split("[2]")[0] and "source:" in found.content
    # one turn's calls run on parallel threads against the same store
    calls = [ToolCall("memory_insert", {"fact": f"parallel fact {i}"}) for i in range(4)]
    calls += [ToolCall("memory_search", {"query": "parallel fact"})] * 2
    results = tools.call_all(calls)
    assert [r.content for r in results[:4]] == ["saved"] * 4 and not any(r.meta.get("error") for r in results)
