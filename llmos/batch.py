"""Batched decoding: turns of several agents that are ready at once decode in one llama.cpp batch.

The in-process backend's context has `slots` sequences, one per turn in progress. Each turn hands
its next tokens to `Batcher.step` and gets back what its `pick` (sampling from the logits of its
last token) returns. The decode thread, once every running turn's step is queued or the first has
waited a short while for the others (half the last decode), decodes them all in one
`llama_decode`, each at its own sequence id and positions, then runs each turn's pick on its row
of logits. Prompts longer
than the batch are spread over several decodes; while others decode, a round takes at most
SHARED_PREFILL prompt tokens, so long prompts do not stall the streams of running turns.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

SHARED_PREFILL = 128  # prompt tokens per decode while other turns wait on it


@dataclass(eq=False)
class Slot:
    """One sequence of the context: the tokens in its cells, the agent whose they are, and what
    they hold for it (text and exact tokens, see LlamaBackend._tokens_for)."""

    seq: int
    ids: list[int] = field(default_factory=list)
    owner: str | None = None
    context: tuple[str, list[int]] = ("", [])
    busy: bool = False
    used: int = 0  # when it last ended a turn (a counter): the least recently used is given up first


@dataclass(eq=False)
class _Step:
    slot: Slot
    tokens: list[int]
    pick: Callable[[int], Any]
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    shared: bool = False  # decoded together with another sequence


class Batcher:
    """Gathers the steps of running turns and decodes them together, on a thread of its own: with
    llama.cpp's OpenMP workers, decoding from whichever thread runs a turn is ~40% slower than
    from one thread throughout (benchmarks/batched.py, "threads"). `lock` (a Condition) guards the
    context: anything else touching it (KV state saves, cell removal) holds it too."""

    def __init__(self, lc: Any, ctx: Callable[[], Any], n_batch: int, n_seq: int) -> None:
        self.lc, self.ctx, self.n_batch = lc, ctx, n_batch
        self.lock = threading.Condition()
        self.running = 0  # turns holding a slot; a round waits for the steps of all of them
        self._queue: list[_Step] = []
        self._calls: list[list[Any]] = []  # [fn, done, result, error] to run on the decode thread
        self._batch = lc.llama_batch_init(n_batch, 0, n_seq)
        self._wait = 0.002
        self._closed = False
        self.decodes = 0
        self.shared_decodes = 0  # decodes that held more than one sequence
        self.most = 0  # the most sequences one decode held
        self.decode_s = 0.0  # time spent in llama_decode
        self._thread = threading.Thread(target=self._work, name="llmos-decode", daemon=True)
        self._thread.start()

    def step(self, slot: Slot, tokens: list[int], pick: Callable[[int], Any]) -> tuple[Any, bool]:
        """Evaluate `tokens` at the end of the slot's cells, then `pick(i)` with i the batch row of
        the last one's logits; returns (what pick returned, whether another sequence shared a decode)."""
        step = _Step(slot, list(tokens), pick)
        with self.lock:
            if self._closed:
                raise RuntimeError("the model was closed")
            self._queue.append(step)
            self.lock.notify_all()
            while not step.done:
                self.lock.wait()
        if step.error is not None:
            raise step.error
        return step.result, step.shared

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the decode thread, between decodes, and return what it returns (for code that
        drives llama.cpp directly, e.g. a benchmark's stock llama-cpp-python runs: from another
        thread they would decode slower, see above)."""
        job: list[Any] = [fn, False, None, None]
        with self.lock:
            if self._closed:
                raise RuntimeError("the model was closed")
            self._calls.append(job)
            self.lock.notify_all()
            while not job[1]:
                self.lock.wait()
        if job[3] is not None:
            raise job[3]
        return job[2]

    def _work(self) -> None:
        """Decode rounds: as soon as every running turn has a step queued, or the oldest queued
        step has waited half a decode for the others."""
        with self.lock:
            since = None
            while not self._closed:
                if self._calls:
                    job = self._calls.pop(0)
                    try:
                        job[2] = job[0]()
                    except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread
                        job[3] = exc
                    job[1] = True
                    self.lock.notify_all()
                    continue
                if not self._queue:
                    since = None
                    self.lock.wait()
                    continue
                since = since or time.perf_counter()
                left = since + self._wait - time.perf_counter()
                if len(self._queue) < self.running and left > 0:
                    self.lock.wait(left)
                    continue
                self._round()
                since = None
                self.lock.notify_all()
            for step in self._queue:
                step.error, step.done = RuntimeError("the model was closed"), True
            for job in self._calls:
                job[1], job[3] = True, RuntimeError("the model was closed")
            self._queue.clear()
            self._calls.clear()
            self.lock.notify_all()

    def _round(self) -> None:
        """One llama_decode of queued steps (in queue order, up to the batch size), then their picks."""
        lc, batch = self.lc, self._batch
        queue = self._queue
        room = self.n_batch if len(queue) == 1 else min(self.n_batch, SHARED_PREFILL + len(queue))
        n, taken, finished = 0, [], []
        # in sequence order: llama.cpp packs a run of consecutive sequence ids into one micro-batch,
        # so 0, 1, 2, 3 decode together where 2, 0, 3, 1 take several passes (benchmarks/batched.py)
        for step in sorted(queue, key=lambda st: st.slot.seq):
            take = min(len(step.tokens), room - n)
            if take <= 0:
                break
            start = len(step.slot.ids)
            for i, token in enumerate(step.tokens[:take]):
                batch.token[n + i] = token
                batch.pos[n + i] = start + i
                batch.n_seq_id[n + i] = 1
                batch.seq_id[n + i][0] = step.slot.seq
                batch.logits[n + i] = False
            n += take
            taken.append((step, start, take))
            if take == len(step.tokens):
                batch.logits[n - 1] = True
                finished.append((step, n - 1))
        batch.n_tokens = n
        t0 = time.perf_counter()
        code = lc.llama_decode(self.ctx(), batch)
        took = time.perf_counter() - t0
        self.decode_s += took
        self._wait = min(0.05, max(0.002, took / 2))
        self.decodes += 1
        seqs = len(taken)
        self.shared_decodes += seqs > 1
        self.most = max(self.most, seqs)
        if code != 0:
            mem = lc.llama_get_memory(self.ctx())
            for step, start, _ in taken:  # nothing of this decode stays in the cells
                lc.llama_memory_seq_rm(mem, step.slot.seq, start, -1)
                step.error = RuntimeError(f"llama.cpp could not decode the batch (llama_decode returned {code}; "
                                          "the context may be full: lower max_tokens or raise model.n_ctx)")
                step.done = True
                queue.remove(step)
            return
        for step, _, take in taken:
            step.slot.ids.extend(step.tokens[:take])
            del step.tokens[:take]
            step.shared = step.shared or seqs > 1
        for step, row in finished:
            try:
                step.result = step.pick(row)
            except BaseException as exc:  # noqa: BLE001 - raised in the turn's own thread
                step.error = exc
            step.done = True
            queue.remove(step)

    def close(self) -> None:
        """Stop the decode thread (steps still queued fail) and free the batch; safe to call twice."""
        with self.lock:
            self._closed = True
            self.lock.notify_all()
        self._thread.join()
        if self._batch is not None:
            self.lc.llama_batch_free(self._batch)
            self._batch = None
