"""Tools from MCP servers (Model Context Protocol, the `mcp` SDK 2.x): stdio or Streamable HTTP.

`connect(spec, home)` returns a server's tools as llmos Tools, named `<server>_<tool>` so they
cannot shadow built-ins. Each server runs its own event loop on a thread. The first time, it is
started to list its tools; after that its recorded definitions are offered and it starts on the
first call. It is closed with the kernel (`Tool.close`).

Trust: the first time llmos sees a server's tool definitions it records them and their SHA-256
under <home>/mcp.json. If they change later ("rug pull"), its tools refuse to run, with one line
naming the server and what changed, unless `approve(server, why)` says yes (the shell asks;
unattended runs do not). Descriptions reach the model as data about a tool (control strings and call tags broken).
Results are untrusted, and a tool counts as having side effects unless the server marks it
read-only and the config marks the server trusted. A stdio server runs inside bubblewrap with no
network when its config says `sandbox: true`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from llmos.grammar import GrammarError, tool_call_grammar
from llmos.toolbox import Tool, ToolError

START_TIMEOUT = 30.0


# The SDK logs a misbehaving server's unreadable lines with tracebacks on stderr; the call's own
# error says what matters (a handler here keeps Python's last-resort printer quiet).
logging.getLogger("mcp").addHandler(logging.NullHandler())

def _name(server: str, tool: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}_{tool}")
    return name[:64]


def definitions_hash(tools: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(tools, sort_keys=True).encode()).hexdigest()


class Server:
    """One MCP server: its process (or URL) and session on a private event-loop thread."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.loop: asyncio.AbstractEventLoop | None = None
        self.client: Any = None
        self.tools: list[Any] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _command(self) -> list[str]:
        cmd = list(self.spec.command or [])
        if not cmd:
            raise ToolError(f"MCP server {self.spec.name!r}: give a command (stdio) or a url")
        if shutil.which(cmd[0]) is None and not os.access(cmd[0], os.X_OK):
            raise ToolError(f"MCP server {self.spec.name!r}: command {cmd[0]!r} not found; install it or fix tools.mcp")
        if self.spec.sandbox:
            bwrap = shutil.which("bwrap")
            if bwrap is None:
                raise ToolError(f"MCP server {self.spec.name!r}: sandbox: true needs bubblewrap (apt-get install bubblewrap)")
            # the whole file system read-only (the server's own files stay visible wherever they are), no network
            cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
                   "--unshare-net", "--unshare-pid", "--die-with-parent", "--", *cmd]
        return cmd

    def start(self) -> None:
        """Start the server and list its tools (once); raises ToolError with the reason."""
        with self._lock:
            if self._thread is not None:
                if self._error is not None:
                    raise ToolError(str(self._error))
                return
            transport = self._transport()
            self._thread = threading.Thread(target=self._run, args=(transport,), name=f"mcp-{self.spec.name}", daemon=True)
            self._thread.start()
        if not self._ready.wait(self.spec.timeout + START_TIMEOUT):
            self.close()
            raise ToolError(f"MCP server {self.spec.name!r} did not start within {self.spec.timeout + START_TIMEOUT:g} s")
        if self._error is not None:
            raise ToolError(str(self._error))

    def _transport(self) -> Any:
        if self.spec.url:
            return self.spec.url
        from mcp.client.stdio import StdioServerParameters, stdio_client

        cmd = self._command()
        errlog = open(os.devnull, "w")  # the server's own logging is not ours to show
        return stdio_client(StdioServerParameters(command=cmd[0], args=cmd[1:], env=dict(self.spec.env) or None), errlog=errlog)

    def _run(self, transport: Any) -> None:
        try:
            asyncio.run(self._main(transport))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller waiting in start()
            if not self._ready.is_set():
                how = f"command: {' '.join(self.spec.command)}; run it by hand to see why" if self.spec.command else f"url: {self.spec.url}"
                self._error = ToolError(f"MCP server {self.spec.name!r} failed to start ({_why(exc)}; {how})")
            self._ready.set()

    async def _main(self, transport: Any) -> None:
        from mcp import Client

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with Client(transport, read_timeout_seconds=self.spec.timeout, cache=None) as client:
            self.client = client
            listed = await client.list_tools()
            self.tools = list(listed.tools)
            self._ready.set()
            await self._stop.wait()

    def call(self, name: str, arguments: Mapping[str, Any]) -> str:
        """Call one tool; its text content (or structured content as JSON). Errors raise."""
        self.start()
        if self.loop is None or self.client is None:
            raise ToolError(f"MCP server {self.spec.name!r} is not running")
        future = asyncio.run_coroutine_threadsafe(self.client.call_tool(name, dict(arguments)), self.loop)
        again = "; the server was stopped and starts again on the next call"
        try:
            result = future.result(self.spec.timeout)
        except TimeoutError:
            future.cancel()
            self.restart()
            raise ToolError(f"MCP server {self.spec.name!r}: {name} did not answer within {self.spec.timeout:g} s{again}") from None
        except Exception as exc:  # noqa: BLE001 - the server crashed, or sent something unreadable
            self.restart()
            raise ToolError(f"MCP server {self.spec.name!r}: {name} failed: {_why(exc)}{again}") from None
        texts = [getattr(c, "text", None) for c in result.content or ()]
        text = "\n".join(t for t in texts if isinstance(t, str))
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content)
        if result.is_error:
            raise ToolError(f"MCP server {self.spec.name!r}: {name}: {text or 'error'}")
        return text or "(no content)"

    def restart(self) -> None:
        """Stop the server (its process ends with the session) so that the next call starts a fresh one."""
        self.close()
        with self._lock:
            self.loop, self.client, self.tools, self._thread, self._error = None, None, [], None, None
            self._ready = threading.Event()

    def close(self) -> None:
        if self.loop is not None and self._stop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass
        if self._thread is not None:
            self._thread.join(10)


def _why(exc: BaseException) -> str:
    """One line on why a call failed (an answer that is not a valid MCP result names its fields)."""
    import pydantic

    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, pydantic.ValidationError):
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'result'}: {e['msg']}" for e in exc.errors()[:4])
        return f"its answer is not a valid MCP result ({fields})"[:300]
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _ledger(home: Path) -> dict[str, Any]:
    try:
        data = json.loads((home / "mcp.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record(home: Path, key: str, digest: str, defs: list[dict[str, Any]]) -> None:
    ledger = _ledger(home)
    ledger[key] = {"sha256": digest, "tools": defs}
    home.mkdir(parents=True, exist_ok=True)
    tmp = home / f"mcp.json.{os.getpid()}.part"
    tmp.write_text(json.dumps(ledger, indent=1), encoding="utf-8")
    os.replace(tmp, home / "mcp.json")


def _definitions(server: Server) -> list[dict[str, Any]]:
    return [{"name": t.name, "description": t.description or "", "input_schema": t.input_schema,
             "read_only": bool(t.annotations and t.annotations.read_only_hint)} for t in server.tools]


class _Trust:
    """Checks a server's definitions against the ledger when it starts: a change refuses its tools
    until `approve(server, why)` says yes; approved or new definitions are recorded."""

    def __init__(self, spec: Any, home: Path, approve: Callable[[str, str], bool] | None) -> None:
        self.spec, self.home, self.approve = spec, home, approve
        self.key = f"{spec.name} {spec.url or ' '.join(spec.command or [])}"
        entry = _ledger(home).get(self.key)
        self.known = entry.get("sha256") if isinstance(entry, dict) else entry if isinstance(entry, str) else None
        self.cached = entry.get("tools") if isinstance(entry, dict) and isinstance(entry.get("tools"), list) else None
        self.refused: str | None = None

    def changes(self, defs: list[dict[str, Any]]) -> str:
        """What changed against the recorded definitions, in words."""
        old = {d.get("name"): d for d in self.cached or () if isinstance(d, dict)}
        new = {d["name"]: d for d in defs}
        parts = [f"new tool {n}" for n in new if n not in old] + [f"tool {n} removed" for n in old if n not in new]
        for n in new.keys() & old.keys():
            for field in ("description", "input_schema", "read_only"):
                if new[n].get(field) != old[n].get(field):
                    parts.append(f"{n}: {field.replace('_', ' ')} changed")
        return ", ".join(sorted(parts)) or "definitions changed"

    def check(self, defs: list[dict[str, Any]]) -> None:
        digest = definitions_hash(defs)
        if self.known is not None and digest != self.known:
            why = (f"the tool definitions of MCP server {self.spec.name!r} changed since they were approved "
                   f"({self.changes(defs) if self.cached is not None else f'{self.known[:12]} -> {digest[:12]}'})")
            if self.approve is None or not self.approve(self.spec.name, why):
                self.refused = (f"{why}; its tools are disabled until you approve them again "
                                f"(in the shell, or delete its entry in {self.home / 'mcp.json'})")
                raise ToolError(self.refused)
        if digest != self.known:
            _record(self.home, self.key, digest, defs)
            self.known = digest


def connect(spec: Any, home: Path, approve: Callable[[str, str], bool] | None = None) -> list[Tool]:
    """The tools of one configured MCP server (see the module docstring); raises ToolError. A
    server seen before is not started here: its recorded definitions are offered, and it starts
    on the first call, which checks that they have not changed."""
    from llmos.policy import as_data

    server, trust = Server(spec), _Trust(spec, home, approve)
    if trust.cached is not None:
        defs = trust.cached
    else:
        server.start()
        defs = _definitions(server)
        try:
            trust.check(defs)
        except ToolError:
            server.close()
            raise

    def call(name: str, arguments: Mapping[str, Any]) -> str:
        if trust.refused is not None:
            raise ToolError(trust.refused)
        if not server.tools:  # started now, on first use: are these still the definitions offered?
            server.start()
            try:
                trust.check(_definitions(server))
            except ToolError:
                server.close()
                raise
        return server.call(name, arguments)

    tools = []
    for d in defs:
        schema = d["input_schema"] if isinstance(d["input_schema"], dict) else {"type": "object", "properties": {}}
        if schema.get("type", "object") != "object":
            server.close()
            raise ToolError(f"MCP server {spec.name!r}: tool {d['name']!r} has an input schema that is not an object")
        try:
            tool_call_grammar([(_name(spec.name, d["name"]), schema)], "required")  # a schema the grammar cannot take fails here
        except (GrammarError, ValueError, KeyError, TypeError, RecursionError) as exc:
            server.close()
            reason = exc.__context__ if isinstance(exc, GrammarError) and exc.__context__ is not None else exc
            raise ToolError(f"MCP server {spec.name!r}: tool {d['name']!r} has an input schema llmos cannot turn into "
                            f"a grammar: {' '.join(str(reason).split())[:200]}") from None
        description = as_data(" ".join(str(d["description"]).split())[:600]) or d["name"]
        tools.append(Tool(
            name=_name(spec.name, d["name"]),
            description=f"[{spec.name} MCP server] {description}",
            parameters=schema,
            fn=(lambda n: lambda **kw: call(n, kw))(d["name"]),
            timeout=spec.timeout + START_TIMEOUT + 5,
            untrusted=True,
            touches=f"whatever the MCP server {spec.name!r} reaches ({spec.url or ' '.join(spec.command or [])})",
            effects=() if d["read_only"] and spec.trusted else None,
            close=server.close if not tools else None,  # the first tool closes the server, once
        ))
    if not tools:
        server.close()
    return tools
