"""The one composition root: a config plus shared resources in, a ready Kernel out.

Every front door builds here: `llmos run`, the shell, `llmos agent`, the shell's /run, and library
users (`llmos.build`). Resources own what agents share and close each thing once.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from llmos.config import Config, ConfigError, MemoryConfig, ModelConfig, home_dir
from llmos.kernel import Kernel
from llmos.messages import ToolCall
from llmos.scheduler import Publisher, Scheduler


class Resources:
    """What agents share, made on first use: one loaded model per way of loading it (agents that
    differ only in sampling share it), one scheduler per model, one store per folder (a store has
    a single writer). `close()` closes each once. publisher: publishes the schedulers' tables for
    `llmos ps` (optional)."""

    def __init__(self, publisher: Publisher | None = None, home: Path | None = None) -> None:
        self.home = home or home_dir()  # where the hashes of models first used are kept
        self.backends: dict[ModelConfig, Any] = {}
        self.schedulers: dict[int, Scheduler] = {}
        self.stores: dict[str, Any] = {}
        self.publisher = publisher
        self._router: Any = None

    def backend(self, model: ModelConfig) -> Any:
        if model not in self.backends and model.server is not None:
            from llmos.remote import RemoteBackend

            self.backends[model] = RemoteBackend(model)
        if model not in self.backends:
            from llmos.llama import LlamaBackend
            from llmos.models import record_model

            backend = self.backends[model] = LlamaBackend(model)
            changed = record_model(backend.path, self.home)
            if changed:
                backend.notes = (*backend.notes, changed)
        return self.backends[model]

    def router(self) -> Any:
        """The tool router, shared: its embedder (offline MiniLM) loads on the first decision."""
        if self._router is None:
            from llmos.decide import Router
            from llmos.memory.embed import MiniLMEmbedder

            self._router = Router(MiniLMEmbedder())
        return self._router

    def scheduler(self, backend: Any) -> Scheduler:
        if id(backend) not in self.schedulers:
            sched = Scheduler(slots=getattr(backend, "slots", 1))
            self.schedulers[id(backend)] = self.publisher.watch(sched) if self.publisher is not None else sched
        return self.schedulers[id(backend)]

    def store(self, memory: MemoryConfig, base: Path) -> Any:
        """The memory section's store, or None when memory is off."""
        if not memory.enabled:
            return None
        from llmos.memory.store import MemoryStore

        folder = (base / Path(memory.store).expanduser()).resolve() if memory.store else home_dir() / "memory"
        if str(folder) not in self.stores:
            self.stores[str(folder)] = MemoryStore(folder, server=memory.server)
        return self.stores[str(folder)]

    def switch(self, old: ModelConfig, new: ModelConfig) -> Any:
        """Load `new` in place of `old` (the shell's /model): its agents' scheduler moves with it,
        and the old model is closed once the new one has loaded."""
        backend = self.backend(new)
        previous = self.backends.pop(old, None)
        if previous is not None and previous is not backend:
            if id(previous) in self.schedulers:
                self.schedulers[id(backend)] = self.schedulers.pop(id(previous))
            previous.close()
        return backend

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        for backend in self.backends.values():
            backend.close()
        self.stores.clear()
        self.backends.clear()
        if self.publisher is not None:
            self.publisher.close()


def user_tool(spec: str, base: Path) -> Any:
    """A user tool named `module:attribute` (a @tool, a typed function or an OpenAI tool dict);
    the module is looked up on sys.path and in `base` (the task file's folder)."""
    module_name, _, attr = spec.partition(":")
    if str(base) not in sys.path:
        sys.path.append(str(base))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"tools.enabled: {spec!r}: cannot import {module_name!r} ({exc}); put it on PYTHONPATH or beside the task file") from None
    if not hasattr(module, attr):
        raise ConfigError(f"tools.enabled: {spec!r}: module {module_name!r} has no {attr!r}")
    return getattr(module, attr)


def make_tools(config: Config, artifacts: Path, base: Path, approve: Callable[..., bool] | None = None) -> list[Any]:
    """The config's tools: built-ins get a context (artifacts, workspace, file roots, their options);
    MCP servers are started and their tools listed (llmos.tools.mcp)."""
    from llmos.tools import BUILTIN, ToolContext, load_builtin

    t = config.tools
    ctx = ToolContext(artifacts=artifacts, workspace=artifacts / "workspace", python=t.python, browser=t.browser,
                      file_roots=tuple((base / Path(r).expanduser()).resolve() for r in t.file_roots))
    tools = [load_builtin(name, ctx) if name in BUILTIN else user_tool(name, base) for name in dict.fromkeys(t.enabled)]
    if t.mcp:
        from llmos.tools.mcp import connect

        home = Path(getattr(config, "home", None) or home_dir())
        for spec in t.mcp:
            try:
                tools += connect(spec, home, (lambda name, why: approve(ToolCall(f"mcp:{name}", {}), why)) if approve else None)
            except BaseException:
                for made in tools:
                    if getattr(made, "close", None) is not None:
                        made.close()
                raise
    return tools


def build(
    config: Config | Mapping[str, Any] | None = None,
    *,
    tools: Iterable[Any] = (),
    resources: Resources | None = None,
    base: Path | None = None,
    artifacts: Path | None = None,
    trace: str | Path | None = None,
    approve: Callable[[ToolCall, str], bool] | None = None,
) -> Kernel:
    """A ready kernel for `config` (a Config, a Task, Settings, or a dict of their fields).

    tools: your own tools, beside the config's. resources: shared models, stores and schedulers
    (default: the kernel's own, closed with it). base: the folder relative paths in the config
    are relative to (default: the current one). artifacts: where tools write (default
    <home>/runs/<name>-<time>). trace: a .jsonl file or a folder (default <home>/traces).
    approve: `approve(call, why) -> bool` answers the policy's questions (none: unattended).
    """
    from llmos.memory.window import Budget, Memory

    config = config if isinstance(config, Config) else Config.model_validate(config or {})
    own = resources is None
    resources = resources or Resources()
    base = Path(base) if base is not None else Path.cwd()
    try:
        backend = resources.backend(config.model)
        m = config.memory
        memory = Memory(resources.store(m, base), system=config.agent.system, collection=m.collection,
                        recall=m.recall, budget=Budget(warn=m.warn, limit=m.limit))
        folder = artifacts or home_dir() / "runs" / f"{config.agent.name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        kernel = Kernel(backend, [*make_tools(config, Path(folder), base, approve), *tools], memory=memory, config=config,
                        scheduler=resources.scheduler(backend), approve=approve, trace=trace,
                        router=resources.router() if config.tools.route else None)
    except BaseException:
        if own:
            resources.close()
        raise
    if own:
        kernel.owned.append(resources)
    names = [t.name for t in kernel.tools]
    if config.tools.tool_choice not in ("auto", "required", "none", *names):
        kernel.close()
        raise ConfigError(f"tools.tool_choice: {config.tools.tool_choice!r} is not one of the tools: {', '.join(names) or 'none'}")
    unknown = [n for n in config.policy.tools if n not in names]
    if unknown:
        import difflib

        kernel.close()
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"policy.tools: {unknown[0]!r} is not one of the tools{hint} (tools: {', '.join(names) or 'none'})")
    return kernel
