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


def prepare(task: Task, task_path: Path, resources: Any, runs_dir: Path, name: str | None = None,
            approve: Callable[[Any, str], bool] | None = None) -> tuple[Any, Path]:
    """The kernel for one task, built on shared resources, and the run's artifacts folder."""
    from llmos.build import build

    name = name or task.agent.name or task_path.stem
    task = task.model_copy(update={"agent": task.agent.model_copy(update={"name": name})})
    folder = artifacts_dir(task, task_path, runs_dir, time.strftime("%Y%m%d-%H%M%S"))
    folder.mkdir(parents=True, exist_ok=True)
    kernel = build(task, resources=resources, base=task_path.parent, artifacts=folder, trace=folder / "trace.jsonl",
                   approve=approve)
    return kernel, folder


def run_task(task: Task, task_path: Path, kernel: Any, folder: Path,
             on_message: Callable[[Message], None] = lambda m: None) -> dict[str, Any]:
    """Run one task to its end (or interruption) on its kernel and return what result.json holds.
    The kernel is closed at the end (its tools and cached state; shared resources stay)."""
    ingested = None
    store = kernel.memory.store
    result: dict[str, Any] = {"task": str(task_path), "name": kernel.name, "artifacts": str(folder),
                              "trace": str(kernel.trace.path), "status": "running", "ingested": None}
    answer, exit_reason, steps, called, decisions = "", None, 0, set(), []
    tokens = {"prompt": 0, "evaluated": 0, "generated": 0}
    t0 = time.perf_counter()
    first_token_s = None
    try:
        if store is not None and task.memory.documents:
            from llmos.memory.ingest import ingest

            report = ingest(store, [task_path.parent / d for d in task.memory.documents], collection=task.memory.collection)
            ingested = {"files": report.files, "chunks": report.chunks, "duplicates": report.duplicates, "skipped": report.skipped}
            result["ingested"] = ingested
            on_message(Message("kernel", f"ingested {report.files} files: {report.chunks} new chunks, {report.duplicates} already stored",
                               meta={"event": "ingest", **ingested}))
        for message in kernel.run(task.prompt(), stream=True):
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
            if message.role == "kernel" and message.meta.get("event") == "policy":
                decisions.append(dict(message.meta))
            if message.role == "kernel" and message.meta.get("exit"):
                exit_reason, steps = message.meta["exit"], message.meta.get("steps") or 0
        result["status"] = "interrupted" if exit_reason == "stopped" else "finished"
    except KeyboardInterrupt:
        result["status"] = "interrupted"
    finally:
        kernel.close()
        checks = run_checks(task, answer, called, folder) if result["status"] == "finished" else []
        result.update({
            "answer": answer, "exit": exit_reason, "steps": steps, "tools_called": sorted(called),
            "tokens": tokens, "policy": decisions, "checks": checks, "passed": result["status"] == "finished" and all(c["passed"] for c in checks),
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
    """Run several prepared tasks (run_task's arguments) as agents on threads. Kernels that share a
    model share a scheduler: their turns go by priority, then round-robin, each agent's KV cache
    kept; tool calls run meanwhile. Ctrl-C stops them all; results come back in order."""
    import threading

    results: list[dict[str, Any] | None] = [None] * len(jobs)
    # Completion is signalled with events, not Thread.join: a KeyboardInterrupt landing inside
    # join() can leave the thread looking finished while it is still writing its result.
    done = [threading.Event() for _ in jobs]

    def work(i: int, job: dict[str, Any]) -> None:
        try:
            results[i] = run_task(**job, on_message=lambda m: on_message(job["kernel"].name, m))
        finally:
            done[i].set()

    for i, job in enumerate(jobs):
        threading.Thread(target=work, args=(i, job), name=job["kernel"].name, daemon=True).start()

    def wait_all() -> None:
        for event in done:
            while not event.wait(0.2):
                pass

    try:
        wait_all()
    except KeyboardInterrupt:
        for job in jobs:
            job["kernel"].stop.set()
        wait_all()
    return [r for r in results if r is not None]
