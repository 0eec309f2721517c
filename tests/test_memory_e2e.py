"""The memory hierarchy end to end: the real default model, the real store (Chroma + FTS5, offline
embedder). A fact stated early is paged out of a small window, then found again through memory_search."""

import pytest

from llmos import Kernel
from llmos.config import ModelConfig, Sampling
from llmos.llama import LlamaBackend
from llmos.memory.window import Memory


@pytest.fixture(scope="module")
def small_backend():
    backend = LlamaBackend(ModelConfig(gpu_layers=0, n_ctx=1024), Sampling(max_tokens=48))
    yield backend
    backend.close()


def test_early_fact_is_paged_out_then_recalled_by_memory_search(small_backend, tmp_path):
    from llmos.memory.store import MemoryStore

    store = MemoryStore(tmp_path / "memory")
    try:
        kernel = Kernel(small_backend, tools=[], trace=tmp_path, memory=Memory(store), config={"sampling": {"max_tokens": 48}})
        list(kernel.run("Remember this: my locker code is 7391."))
        filler = "Tell me something about the history of lighthouses and ships at sea, in detail. " * 3
        notices = []
        for _ in range(12):
            notices += [m for m in kernel.run(filler) if m.role == "kernel"]
            if kernel.memory.paged_out and not any("7391" in m.content for m in kernel.messages):
                break
        assert any(m.meta.get("event") == "page_out" for m in notices), "the window never paged out"
        assert not any("7391" in m.content for m in kernel.messages), "the fact is still in the window"
        assert any("7391" in h.text for h in store.search("locker code", k=5))  # on disk, searchable

        msgs = list(kernel.run("What is my locker code? Search your memory for 'locker code'.", tool_choice="memory_search"))
        call = next(m for m in msgs if m.role == "assistant" and m.tool_calls).tool_calls[0]
        assert call.name == "memory_search" and isinstance(call.arguments["query"], str)
        result = next(m for m in msgs if m.role == "tool")
        assert result.meta.get("untrusted") is True
        assert "7391" in result.content, f"query {call.arguments['query']!r} did not find the fact: {result.content[:300]}"
        assert msgs[-1].meta["exit"] in ("answer", "max_steps")
    finally:
        store.close()
