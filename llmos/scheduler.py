"""The scheduler: agents as processes that share one model.

Every agent (a Kernel) has a Process in a Scheduler's table: an id, a name, a priority, a state,
budgets and what it has used. The model has `slots` (the backend's: 1, or the sequences it decodes
together in shared batches). Before each turn an agent asks for one; the ready agent with the
highest priority gets it, and agents of equal priority take it in the order they became ready, so
an agent that just decoded queues behind the others (round-robin). Turns are not preempted (a turn
is bounded by the model's max_tokens). Tool calls run outside the slot: while one agent waits for a
browser page, another decodes.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

# idle: no run yet · ready: waiting for the model · running: decoding · waiting: its tools run ·
# done / failed / stopped: its last run ended so. "paused" is shown for a paused agent not decoding.
STATES = ("idle", "ready", "running", "waiting", "done", "failed", "stopped")


_PIDS = itertools.count(1)  # agent ids are unique in the OS process, across schedulers (one per model)


class Stopped(Exception):
    """An agent was asked to stop (Scheduler.stop, Kernel.stop); its run ends with exit "stopped"."""


class NoSuchAgent(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(eq=False)
class Process:
    """An agent's entry in the process table. Counters cover all of the agent's runs."""

    pid: int
    name: str
    priority: int = 0  # higher decodes first
    state: str = "idle"
    max_steps: int | None = None  # per run
    max_tokens: int | None = None  # per run: tokens the model evaluates and generates for it
    max_seconds: float | None = None  # per run, wall clock
    steps: int = 0
    tokens: int = 0
    turns: int = 0  # times it was given the model
    note: str = ""  # how its last run ended: answer, max_steps, tokens, timeout, or the error
    paused: bool = False
    stop: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.time)
    messages: list[Any] = field(default_factory=list)  # the last run's messages, for start()/wait()
    ended: threading.Event = field(default_factory=threading.Event)
    ticket: int = 0  # when it became ready; the lowest ticket of the top priority goes first

    @property
    def shown_state(self) -> str:
        return "paused" if self.paused and self.state in ("idle", "ready", "waiting") else self.state

    def row(self) -> dict[str, Any]:
        budget = {"steps": self.max_steps, "tokens": self.max_tokens, "seconds": self.max_seconds}
        return {"id": self.pid, "name": self.name, "priority": self.priority, "state": self.shown_state,
                "steps": self.steps, "tokens": self.tokens, "turns": self.turns,
                "age_s": round(time.time() - self.started, 1), "budget": {k: v for k, v in budget.items() if v},
                "note": self.note}

    def wait(self, timeout: float | None = None) -> list[Any]:
        """Block until the current run ends; returns its messages (see Scheduler.start)."""
        if not self.ended.wait(timeout):
            raise TimeoutError(f"agent {self.pid} ({self.name}) is still {self.shown_state}")
        return self.messages


class Scheduler:
    """The process table and the model's slots. Thread-safe; one per loaded model.

    on_change, if given, is called with the table's rows after every change (e.g. to publish
    them for `llmos ps`); it runs under the scheduler's lock, so it must be quick.
    """

    def __init__(self, on_change: Callable[[list[dict[str, Any]]], None] | None = None, slots: int = 1) -> None:
        self._cond = threading.Condition()
        self._tickets = itertools.count(1)
        self._table: dict[int, Process] = {}
        self._holders: set[int] = set()  # pids of the agents decoding now
        self.slots = max(1, slots)
        self.on_change = on_change

    # ---- the table -----------------------------------------------------------------------------
    def spawn(self, name: str, *, priority: int = 0, stop: threading.Event | None = None, **budgets: Any) -> Process:
        with self._cond:
            proc = Process(next(_PIDS), name, priority, stop=stop or threading.Event(), **budgets)
            self._table[proc.pid] = proc
            self._changed()
        return proc

    def ps(self) -> list[dict[str, Any]]:
        """The table's rows: id, name, priority, state, steps, tokens, turns, age_s, budget, note."""
        with self._cond:
            return [p.row() for p in self._table.values()]

    def get(self, key: int | str) -> Process:
        """An agent by id (a number) or by name."""
        with self._cond:
            text = str(key).strip()
            if text.isdigit() and int(text) in self._table:
                return self._table[int(text)]
            named = [p for p in self._table.values() if p.name == text]
            if not named:
                known = ", ".join(f"{p.pid} ({p.name})" for p in self._table.values()) or "none"
                raise NoSuchAgent(f"no agent {text!r}; agents: {known}")
            return named[-1]

    def set_state(self, proc: Process, state: str, note: str | None = None) -> None:
        assert state in STATES, state
        with self._cond:
            proc.state = state
            if note is not None:
                proc.note = note
            self._changed()

    def count(self, proc: Process, steps: int = 0, tokens: int = 0) -> None:
        with self._cond:
            proc.steps += steps
            proc.tokens += tokens
            self._changed()

    # ---- control -------------------------------------------------------------------------------
    def pause(self, key: int | str) -> Process:
        """The agent gets no more turns until resumed (a turn in progress finishes; tools finish)."""
        proc = self.get(key)
        with self._cond:
            proc.paused = True
            self._changed()
        return proc

    def resume(self, key: int | str) -> Process:
        proc = self.get(key)
        with self._cond:
            proc.paused = False
            self._changed()
            self._cond.notify_all()
        return proc

    def stop(self, key: int | str) -> Process:
        """Ask the agent to stop at its next safe point (next token, step or turn request)."""
        proc = self.get(key)
        proc.stop.set()
        with self._cond:
            self._cond.notify_all()
        return proc

    def stop_all(self) -> None:
        with self._cond:
            for proc in self._table.values():
                proc.stop.set()
            self._cond.notify_all()

    # ---- the model's slots ------------------------------------------------------------------------
    def _first_ready(self) -> Process | None:
        ready = [p for p in self._table.values() if p.state == "ready" and not p.paused]
        return min(ready, key=lambda p: (-p.priority, p.ticket), default=None)

    @contextmanager
    def turn(self, proc: Process) -> Iterator[None]:
        """Hold a model slot for one turn. Waits while all slots are held, while higher-priority or
        earlier-queued agents are ready, and while this one is paused. A stop request while
        waiting raises Stopped, as a stop during the turn does in the kernel."""
        with self._cond:
            proc.state, proc.ticket = "ready", next(self._tickets)
            self._changed()
            while not (len(self._holders) < self.slots and self._first_ready() is proc):
                if proc.stop.is_set():
                    proc.state = "stopped"
                    self._changed()
                    self._cond.notify_all()
                    raise Stopped(proc.name)
                self._cond.wait(0.25)  # a stop set directly on the event is noticed within this
            self._holders.add(proc.pid)
            proc.state = "running"
            proc.turns += 1
            self._changed()
        try:
            yield
        finally:
            with self._cond:
                self._holders.discard(proc.pid)
                if proc.state == "running":
                    proc.state = "waiting"  # until the kernel says what it does next
                self._changed()
                self._cond.notify_all()

    # ---- running agents ------------------------------------------------------------------------
    def start(self, kernel: Any, prompt: str, on_message: Callable[[Any], None] | None = None, **run_args: Any) -> Process:
        """Run `kernel.run(prompt)` on a thread; returns its Process (`.wait()` gives the messages).
        The kernel must belong to this scheduler (built with this scheduler)."""
        proc = kernel.process
        if proc.pid not in self._table or self._table[proc.pid] is not proc:
            raise ValueError(f"kernel {kernel.name!r} belongs to another scheduler; pass scheduler= when creating it")
        if proc.state in ("ready", "running", "waiting"):
            raise RuntimeError(f"agent {proc.pid} ({proc.name}) is already running")
        proc.ended.clear()
        proc.messages = []

        def work() -> None:
            try:
                for message in kernel.run(prompt, **run_args):
                    if not message.is_delta:
                        proc.messages.append(message)
                    if on_message is not None:
                        on_message(message)
            except Exception as exc:  # noqa: BLE001 - one agent failing must not take the others down
                self.set_state(proc, "failed", f"{type(exc).__name__}: {exc}")
            finally:
                proc.ended.set()

        threading.Thread(target=work, name=f"agent-{proc.pid}-{proc.name}", daemon=True).start()
        return proc

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change([p.row() for p in self._table.values()])


# ---- `llmos ps`: the tables of running llmos processes -------------------------------------------

def run_dir() -> Path:
    from llmos.config import home_dir

    return home_dir() / "run"


class Publisher:
    """Keeps <home>/run/<os pid>.json equal to this process's schedulers' tables, for `llmos ps`
    in another terminal; written atomically, removed by close()."""

    def __init__(self, command: str) -> None:
        self.path = run_dir() / f"{os.getpid()}.json"
        self.info = {"pid": os.getpid(), "command": command, "started": time.time(), "start_ticks": _start_ticks(os.getpid())}
        self._tables: dict[int, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def watch(self, scheduler: Scheduler) -> Scheduler:
        scheduler.on_change = lambda rows: self._update(id(scheduler), rows)
        scheduler.on_change(scheduler.ps())
        return scheduler

    def _update(self, key: int, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._tables[key] = rows
            agents = [row for table in self._tables.values() for row in table]
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".part")
                tmp.write_text(json.dumps({**self.info, "updated": time.time(), "agents": agents}), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError:
                pass  # a read-only home: `llmos ps` will not list this process; nothing else depends on it

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def _start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux); None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, started: int | None) -> bool:
    """Whether the process that wrote a table still runs (a PID can be reused after a crash)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = _start_ticks(pid)
    return started is None or now is None or now == started


def running_tables() -> list[dict[str, Any]]:
    """The published tables of live llmos processes (files of dead ones are removed)."""
    tables = []
    for file in sorted(run_dir().glob("*.json")):
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            pid = int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours
        if not _alive(pid, data.get("start_ticks")):
            file.unlink(missing_ok=True)  # its process died without cleaning up (kill -9, power loss)
            continue
        tables.append(data)
    return tables
