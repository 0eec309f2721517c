"""The KV caches of agents that share one loaded model.

Each sequence (slot) of the llama.cpp context holds one agent's cells at a time (its owner's). When
another agent takes the slot, the owner's cells are saved with llama.cpp's per-sequence state calls, which copy only the
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
    """The saved KV states of the agents sharing one llama.cpp context, RAM first, then disk.

    The context has one or more sequences (slots, each with `seq`, `ids`: the tokens in its cells,
    `owner` and `context`). Not thread-safe: the backend calls it under its own lock. `ctx` gives
    the llama_context; `ram` is the budget in bytes for states kept in memory; `folder` is created
    when a state first goes to disk.
    """

    def __init__(self, ctx: Any, ram: int) -> None:
        import llama_cpp

        self.lc, self.ctx, self.ram = llama_cpp, ctx, ram
        self._saved: dict[str, _SavedState] = {}  # other agents' states, least recently used first
        self.folder: Path | None = None
        self.switches = 0
        self.spilled = 0  # states written to disk so far

    def __contains__(self, agent: str) -> bool:
        return agent in self._saved

    def switch(self, slot: Any, agent: str) -> None:
        """Give `slot` to `agent`: save the owner's cells and restore `agent`'s. slot.context is
        then what the cells hold for `agent`: its saved context, or an empty one for a new agent
        (which keeps the cells: they share the system prompt and tools prefix) and after a failed
        restore (its prompt is then evaluated from scratch)."""
        if agent == slot.owner:
            return
        if slot.owner is not None and slot.ids:
            self._saved[slot.owner] = self.save(slot)
            self._spill()
        state = self._saved.pop(agent, None)
        slot.owner, slot.context = agent, ("", [])
        self.switches += 1
        if state is None:
            return
        if self.load(slot, state):
            slot.context = state.context
        state.drop()

    def save(self, slot: Any) -> _SavedState:
        """The cells of the slot's sequence, with the tokens and the context they hold."""
        ctx = self.ctx()
        size = self.lc.llama_state_seq_get_size(ctx, slot.seq)
        buf = (ctypes.c_uint8 * size)()
        written = self.lc.llama_state_seq_get_data(ctx, buf, size, slot.seq)
        return _SavedState(buf, written, list(slot.ids), slot.context)

    def load(self, slot: Any, state: _SavedState) -> bool:
        """Replace the slot's cells with `state`'s; False (and empty cells) if llama.cpp refuses."""
        ctx = self.ctx()
        self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(ctx), slot.seq, 0, -1)
        slot.ids = []
        if not state.size or not self.lc.llama_state_seq_set_data(ctx, state.bytes(), state.size, slot.seq):
            self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(ctx), slot.seq, 0, -1)
            return False
        slot.ids = list(state.ids)
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

    def close(self) -> None:
        """Drop every saved state and the spill folder; safe to call twice."""
        self._saved.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
