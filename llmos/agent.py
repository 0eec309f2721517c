"""Running a task file unattended: tools in a per-run folder, a trace, checks and a result JSON."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from llmos.messages import Message
from llmos.task import Task, artifacts_dir, run_checks

EXIT_PASSED, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def write_atomic(path: Path, text: str) -> None:
    """Write a file atomically (temp file + rename): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def backend_for(task: Task, cache: dict[str, Any]) -> Any:
    """One loaded model per distinct way of loading it (path, context, offload, threads, template),
    shared by the tasks that ask for it; sampling settings are each agent's own."""
    from llmos.backend import SAMPLING

    key = task.model.model_copy(update={k: None for k in SAMPLING}).model_dump_json()
    if key not in cache:
        from llmos.backend import LlamaBackend

        cache[key] = LlamaBackend(task.model)
    return cache[key]


def store_for(task: Task, task_path: Path, cache: dict[str, Any]) -> Any:
    """The task's memory store (one per folder per process: a store has a single writer)."""
    if not task.memory.enabled:
        return None
    from llmos.memory.store import MemoryStore, default_path

    folder = (task_path.parent / Path(task.memory.store).expanduser()).resolve() if task.memory.store else default_path()
    if str(folder) not in cache:
        cache[str(folder)] = MemoryStore(folder, server=task.memory.server)
    return cache[str(folder)]


def run_task(
    task: Task,
    task_path: Path,
    runs_dir: Path,
    backend: Any,
    on_message: Callable[[Message], None] = lambda m: None,
    store: Any = None,
    name: str | None = None,
    stop: Any = None,
    scheduler: Any = None,
) -> dict[str, Any]:
    """Run one task to its end (or interruption) and return the result that result.json holds."""
    from llmos.kernel import Kernel
    from llmos.tools import ToolContext, load_builtin

    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = artifacts_dir(task, task_path, runs_dir, stamp)
    folder.mkdir(parents=True, exist_ok=True)
    ctx = ToolContext(
        artifacts=folder, workspace=folder / "workspace",
        allow_domains=tuple(task.tools.allow_domains), unsandboxed_python=task.tools.python_unsandboxed,
        file_roots=tuple((task_path.parent / Path(r).expanduser()).resolve() for r in task.tools.file_roots),
    )
    tools = [load_builtin(name, ctx) for name in dict.fromkeys(task.tools.enabled)]
    ingested = None
    if store is not None and task.memory.documents:
        from llmos.memory.ingest import ingest

        report = ingest(store, [task_path.parent / d for d in task.memory.documents], collection=task.memory.collection)
        ingested = {"files": report.files, "chunks": report.chunks, "duplicates": report.duplicates, "skipped": report.skipped}
        on_message(Message("kernel", f"ingested {report.files} files: {report.chunks} new chunks, {report.duplicates} already stored",
                           meta={"event": "ingest", **ingested}))
    kernel = Kernel(backend, tools, system=task.system, max_steps=task.budget.max_steps, options=task.model,
                    trace=folder / "trace.jsonl", max_seconds=task.budget.max_seconds,
                    memory=store, recall=task.memory.recall, collection=task.memory.collection,
                    name=name or task.name or task_path.stem, stop=stop, scheduler=scheduler,
                    priority=task.priority, max_tokens=task.budget.max_tokens)
    kernel.window.budget.warn, kernel.window.budget.limit = task.memory.warn, task.memory.limit
    result: dict[str, Any] = {"task": str(task_path), "name": task.name or task_path.stem, "artifacts": str(folder),
                              "trace": str(kernel.trace.path), "status": "running", "ingested": ingested}
    answer, exit_reason, steps, called = "", None, 0, set()
    tokens = {"prompt": 0, "evaluated": 0, "generated": 0}
    t0 = time.perf_counter()
    first_token_s = None
    try:
        for message in kernel.run(task.prompt(), stream=True, tool_choice=task.tools.tool_choice):
            if message.is_delta and first_token_s is None:
                first_token_s = time.perf_counter() - t0
            on_message(message)
            if message.is_delta:
                continue
            if message.role == "assistant":
                stats = message.meta.get("stats") or {}
                tokens["prompt"] += stats.get("prompt_tokens", 0)
                tokens["evaluated"] += stats.get("evaluated_tokens", 0)
                tokens["generated"] += stats.get("generated_tokens", 0)
                called |= {c.name for c in message.tool_calls}
                if not message.tool_calls:
                    answer = message.content
            if message.role == "kernel" and message.meta.get("exit"):
                exit_reason, steps = message.meta["exit"], message.meta.get("steps", 0)
        result["status"] = "finished"
    except KeyboardInterrupt:
        result["status"] = "interrupted"
    finally:
        for t in tools:
            if t.close is not None:
                t.close()
        forget = getattr(backend, "forget", None)
        if forget is not None:
            forget(kernel.key)  # free this agent's saved KV state
        checks = run_checks(task, answer, called, folder) if result["status"] == "finished" else []
        result.update({
            "answer": answer, "exit": exit_reason, "steps": steps, "tools_called": sorted(called),
            "tokens": tokens, "checks": checks, "passed": result["status"] == "finished" and all(c["passed"] for c in checks),
            "timings": {"total_s": round(time.perf_counter() - t0, 3),
                        "first_token_s": round(first_token_s, 3) if first_token_s is not None else None},
        })
        write_json(folder / "result.json", result)
    return result


def exit_code(result: dict[str, Any]) -> int:
    if result["status"] == "interrupted":
        return EXIT_INTERRUPTED
    return EXIT_PASSED if result["passed"] else EXIT_FAILED


def run_concurrently(jobs: list[dict[str, Any]], on_message: Callable[[str, Message], None]) -> list[dict[str, Any]]:
    """Run several tasks as agents on threads. Jobs that share a model should share a scheduler
    (job["scheduler"]): their turns go by priority, then round-robin, each agent's KV cache kept;
    tool calls run meanwhile. Ctrl-C stops them all; results come back in order."""
    import threading

    stops = [threading.Event() for _ in jobs]
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    # Completion is signalled with events, not Thread.join: a KeyboardInterrupt landing inside
    # join() can leave the thread looking finished while it is still writing its result.
    done = [threading.Event() for _ in jobs]

    def work(i: int, job: dict[str, Any]) -> None:
        try:
            results[i] = run_task(**job, on_message=lambda m: on_message(job["name"], m), stop=stops[i])
        finally:
            done[i].set()

    for i, job in enumerate(jobs):
        threading.Thread(target=work, args=(i, job), name=job["name"], daemon=True).start()

    def wait_all() -> None:
        for event in done:
            while not event.wait(0.2):
                pass

    try:
        wait_all()
    except KeyboardInterrupt:
        for event in stops:
            event.set()
        wait_all()
    return [r for r in results if r is not None]
