"""The KV caches of agents that share one loaded model.

One llama.cpp context holds one agent's cells at a time (the owner's). When another agent takes the
model, the owner's cells are saved with llama.cpp's per-sequence state calls, which copy only the
used cells (~24 MB at 1k tokens for the default model), and the newcomer's are restored, so neither
re-reads its context. Saved states stay in RAM up to a budget; beyond it the least recently used
go to a temporary folder and are read back from there.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

Context = tuple[str, list[int]]  # what a KV cache holds: the prompt and reply text, and its exact tokens


class _SavedState:
    """One agent's KV cache cells (llama.cpp sequence state) plus the tokens they hold; the bytes
    live in RAM (`data`) or, once spilled, in `file`."""

    def __init__(self, data: Any, size: int, ids: Any, context: Context) -> None:
        self.data, self.size, self.ids, self.context = data, size, ids, context
        self.file: Path | None = None

    def spill(self, folder: Path, key: str) -> None:
        path = folder / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".kv")
        with open(path, "wb") as fh:
            fh.write(memoryview(self.data)[: self.size])
        self.file, self.data = path, None

    def bytes(self) -> Any:
        if self.data is None:
            assert self.file is not None
            buf = (ctypes.c_uint8 * self.size)()
            with open(self.file, "rb") as fh:
                fh.readinto(buf)
            return buf
        return self.data

    def drop(self) -> None:
        if self.file is not None:
            self.file.unlink(missing_ok=True)


class KVStates:
    """The saved KV states of the agents sharing `llm` (a llama_cpp.Llama), RAM first, then disk.

    Not thread-safe: the backend calls it under its own lock. `ram` is the budget in bytes for
    states kept in memory; `folder` is created when a state first goes to disk.
    """

    def __init__(self, llm: Any, ram: int) -> None:
        import llama_cpp

        self.lc, self.llm, self.ram = llama_cpp, llm, ram
        self.owner: str | None = None  # the agent whose conversation is in the KV cache
        self._saved: dict[str, _SavedState] = {}  # other agents' states, least recently used first
        self.folder: Path | None = None
        self.switches = 0
        self.spilled = 0  # states written to disk so far

    def switch(self, agent: str, context: Context) -> Context:
        """Give the KV cache to `agent`: save the owner's cells (whose cache holds `context`) and
        restore `agent`'s. Returns what the cache now holds for `agent`: its saved context, or an
        empty one for a new agent (which keeps the cells: they share the system prompt and tools
        prefix) and after a failed restore (its prompt is then evaluated from scratch)."""
        if agent == self.owner:
            return context
        if self.owner is not None and self.llm.n_tokens > 0:
            self._saved[self.owner] = self.save(context)
            self._spill()
        state = self._saved.pop(agent, None)
        self.owner = agent
        self.switches += 1
        if state is None:
            return ("", [])
        ok = self.load(state)
        state.drop()
        if not ok:
            self.llm.n_tokens = 0
            return ("", [])
        return state.context

    def save(self, context: Context) -> _SavedState:
        """The cells now in the cache (sequence 0), with the tokens and `context` they hold."""
        ctx = self.llm._ctx.ctx
        size = self.lc.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        written = self.lc.llama_state_seq_get_data(ctx, buf, size, 0)
        n = self.llm.n_tokens
        return _SavedState(buf, written, self.llm.input_ids[:n].copy(), context)

    def load(self, state: _SavedState) -> bool:
        """Replace the cache's cells with `state`'s; False (and an empty cache) if llama.cpp refuses."""
        self.llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        if not state.size or not self.lc.llama_state_seq_set_data(self.llm._ctx.ctx, state.bytes(), state.size, 0):
            return False
        n = len(state.ids)
        self.llm.input_ids[:n] = state.ids
        self.llm.n_tokens = n
        return True

    def _spill(self) -> None:
        in_ram = [(k, s) for k, s in self._saved.items() if s.data is not None]
        total = sum(s.size for _, s in in_ram)
        for key, state in in_ram:  # oldest first
            if total <= self.ram:
                return
            if self.folder is None:
                self.folder = Path(tempfile.mkdtemp(prefix="llmos-kv-"))
            state.spill(self.folder, key)
            total -= state.size
            self.spilled += 1

    def forget(self, agent: str) -> None:
        """Drop an agent's saved state (in RAM or on disk)."""
        state = self._saved.pop(agent, None)
        if state is not None:
            state.drop()
        if self.owner == agent:
            self.owner = None  # its cells stay as a prefix the next agent may share

    def close(self) -> None:
        """Drop every saved state and the spill folder; safe to call twice."""
        self._saved.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
