"""Task files: a pydantic schema for unattended runs, validation with file:line:field errors, checks.

    llmos validate task.yaml          every problem, one line each, exit 2 if any
    llmos agent task.yaml --var n=3   run it; exit 0 checks passed, 1 checks failed, 2 bad input
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import string
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pydantic
import yaml

from llmos.config import ModelOptions, apply_overrides, yaml_error_text

_HOST_RE = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_IPV4_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")


MEMORY_TOOLS = ("core_memory", "memory_search", "memory_insert")  # given to the model when memory is enabled


class TaskError(ValueError):
    """A task file that cannot run; `problems` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _is_domain(entry: str) -> bool:
    m = _IPV4_RE.match(entry)
    if m:
        return all(0 <= int(part) <= 255 for part in m.groups())
    return bool(_HOST_RE.match(entry)) and not entry.replace(".", "").isdigit()


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class ToolsSection(_Strict):
    """Which tools the agent may use, and what they may reach."""

    enabled: list[str] = ["calculator"]
    tool_choice: str = "auto"  # first turn: auto | required | none | a tool name
    allow_domains: list[str] = ["127.0.0.1", "localhost"]  # browser allow-list
    python_unsandboxed: bool = False  # explicit opt-out of the bubblewrap sandbox
    file_roots: list[str] = []  # folders the python tool may read (read-only, at /files/<name>); relative to the task file

    @pydantic.field_validator("enabled")
    @classmethod
    def _known_tools(cls, names: list[str]) -> list[str]:
        from llmos.tools import BUILTIN

        for name in names:
            if name not in BUILTIN:
                close = difflib.get_close_matches(name, BUILTIN, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown tool {name!r}{hint} (available: {', '.join(BUILTIN)})")
        return names

    @pydantic.field_validator("allow_domains")
    @classmethod
    def _domains(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            if not _is_domain(entry):
                raise ValueError(f"{entry!r} is not a domain (use a host such as 'example.org', '*.example.org' or '127.0.0.1', without scheme or path)")
        return entries



class MemorySection(_Strict):
    """Long-term memory: a store to page the window out to, documents to ingest first, recall."""

    enabled: bool = False
    store: Optional[str] = None  # folder; default <home>/memory; relative paths are relative to the task file
    server: Optional[str] = None  # Chroma server (`chroma run`) URL, e.g. http://127.0.0.1:8000: vectors shared across machines
    collection: str = pydantic.Field("default", min_length=1, max_length=63)
    documents: list[str] = []  # files or folders ingested before the run (relative to the task file)
    recall: int = pydantic.Field(0, ge=0, le=20)  # pages retrieved for each user turn (0: only via memory_search)
    warn: float = pydantic.Field(0.70, gt=0, lt=1)  # window share that triggers a memory-pressure notice
    limit: float = pydantic.Field(0.90, gt=0, lt=1)  # window share that triggers paging out

    @pydantic.field_validator("server")
    @classmethod
    def _server_url(cls, url: Optional[str]) -> Optional[str]:
        if url is not None:
            from llmos.memory.store import parse_server_url

            parse_server_url(url)
        return url

    @pydantic.model_validator(mode="after")
    def _order(self) -> "MemorySection":
        if self.warn > self.limit:
            raise ValueError(f"warn ({self.warn}) must not exceed limit ({self.limit})")
        return self


class Budget(_Strict):
    max_steps: int = pydantic.Field(8, ge=1, le=1000)
    max_seconds: float = pydantic.Field(600.0, gt=0)
    max_tokens: Optional[int] = pydantic.Field(None, ge=1)  # tokens the model evaluates and generates for the run


class Check(_Strict):
    """One condition on the finished run; every given field must hold."""

    answer_matches: Optional[str] = None  # a regular expression searched in the final answer
    answer_contains: Optional[str] = None
    file_exists: Optional[str] = None  # a glob under the artifacts folder
    tool_called: Optional[str] = None

    @pydantic.field_validator("answer_matches")
    @classmethod
    def _regex(cls, pattern: Optional[str]) -> Optional[str]:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return pattern

    @pydantic.model_validator(mode="after")
    def _one(self) -> "Check":
        if not any(v is not None for v in self.model_dump().values()):
            raise ValueError("a check needs one of: answer_matches, answer_contains, file_exists, tool_called")
        return self


class Task(_Strict):
    """A task file: what to run, with which model and tools, within which budgets, checked how."""

    name: Optional[str] = None
    goal: str = pydantic.Field(min_length=1)  # the prompt; {variables} are filled from vars and --var
    system: Optional[str] = None
    priority: int = pydantic.Field(0, ge=-100, le=100)  # among agents sharing a model, higher decodes first
    vars: dict[str, Union[str, int, float, bool]] = {}
    model: ModelOptions = ModelOptions()
    tools: ToolsSection = ToolsSection()
    memory: MemorySection = MemorySection()
    budget: Budget = Budget()
    artifacts: Optional[str] = None  # folder for trace, result.json and tool files; relative to the task file
    checks: list[Check] = []

    @pydantic.model_validator(mode="after")
    def _choice(self) -> "Task":
        allowed = list(self.tools.enabled) + (list(MEMORY_TOOLS) if self.memory.enabled else [])
        if self.tools.tool_choice not in ("auto", "required", "none", *allowed):
            raise ValueError(f"tools.tool_choice {self.tools.tool_choice!r} must be auto, required, none or one of: {', '.join(allowed) or 'no tools enabled'}")
        return self

    def prompt(self) -> str:
        """The goal with {variables} filled; unknown variables are an error naming them."""
        names = {f for _, f, _, _ in string.Formatter().parse(self.goal) if f}
        missing = sorted(names - set(self.vars))
        if missing:
            raise TaskError([f"goal: variable(s) {', '.join(missing)} have no value (fix: vars: or --var {missing[0]}=...)"])
        return self.goal.format(**{k: v for k, v in self.vars.items()})


def _locate(node: Any, loc: tuple, key_node: bool = False) -> Any:
    """The YAML node for a pydantic error location (as deep as it exists), for its line number."""
    for i, key in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            pick = 0 if key_node and i == len(loc) - 1 else 1
            match = next((pair[pick] for pair in node.value if pair[0].value == key), None)
            if match is None:
                match = next((k for k, _ in node.value if k.value == key), None)
                return match or node
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
    return node


def _fields_of(model: type[pydantic.BaseModel], loc: tuple) -> list[str]:
    """Field names valid at `loc` (for 'did you mean')."""
    current: Any = model
    for key in loc:
        if isinstance(key, int):
            continue
        field = getattr(current, "model_fields", {}).get(key)
        if field is None:
            break
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        current = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, pydantic.BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _line(root: Any, loc: tuple, key_node: bool = False) -> int:
    node = _locate(root, loc, key_node) if root is not None else None
    return node.start_mark.line + 1 if node is not None else 1


def _problems(exc: pydantic.ValidationError, source: str, root: Any) -> list[tuple[int, str]]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = _line(root, loc, key_node=err["type"] == "extra_forbidden")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_of(Task, loc[:-1]), n=1)
            msg = f"unknown key {loc[-1]!r}" + (f"; did you mean {close[0]!r}?" if close else "")
        lines.append((line, f"{source}:{line}: {field}: {msg}"))
    return lines


def load_task(path: str | Path, overrides: list[str] | None = None, variables: dict[str, str] | None = None) -> Task:
    """Read, merge `-o key=value` overrides and `--var` values, and validate; raises TaskError."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskError([f"{source}: no such task file"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError([f"{source}: cannot read ({exc})"]) from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TaskError([f"{source}: invalid YAML ({yaml_error_text(exc)})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TaskError([f"{source}:1: a task file must be a mapping with at least 'goal:'"])
    from llmos.config import ConfigError

    try:
        data = apply_overrides(data, overrides or [])
    except ConfigError as exc:
        raise TaskError([f"{source}: {exc}"]) from None
    if variables:
        data["vars"] = {**(data.get("vars") or {}), **variables}
    from llmos.gguf import ModelFileError, read_gguf

    problems: list[tuple[int, str]] = []
    model_path = (data.get("model") or {}).get("path") if isinstance(data.get("model"), dict) else None
    if isinstance(model_path, str):
        resolved = Path(model_path).expanduser()
        resolved = resolved if resolved.is_absolute() else path.parent / resolved
        try:
            read_gguf(resolved)  # a missing, truncated or non-GGUF model is bad input, found before loading
        except ModelFileError as exc:
            line = _line(root, ("model", "path"))
            problems.append((line, f"{source}:{line}: model.path: {exc}"))
    tools_data = data.get("tools") if isinstance(data.get("tools"), dict) else {}
    for i, folder in enumerate(tools_data.get("file_roots") or []):
        if isinstance(folder, str) and not (path.parent / Path(folder).expanduser()).is_dir():
            line = _line(root, ("tools", "file_roots", i))
            problems.append((line, f"{source}:{line}: tools.file_roots.{i}: {folder!r} is not a folder (paths are relative to the task file)"))
    memory = data.get("memory") if isinstance(data.get("memory"), dict) else {}
    for i, doc in enumerate(memory.get("documents") or []):
        if isinstance(doc, str) and not (path.parent / Path(doc).expanduser()).exists():
            line = _line(root, ("memory", "documents", i))
            problems.append((line, f"{source}:{line}: memory.documents.{i}: {doc!r} does not exist (paths are relative to the task file)"))
    task = None
    try:
        task = Task.model_validate(data)
    except pydantic.ValidationError as exc:
        problems += _problems(exc, source, root)
    if task is not None and not problems:
        try:
            task.prompt()  # unfilled {variables} are bad input too
        except TaskError as exc:
            line = _line(root, ("goal",))
            problems += [(line, f"{source}:{line}: {p}") for p in exc.problems]
    if problems:
        raise TaskError([text for _, text in sorted(problems, key=lambda p: p[0])])
    if task.model.path is not None and not Path(task.model.path).is_absolute():
        task.model = task.model.model_copy(update={"path": str((path.parent / Path(task.model.path).expanduser()).resolve())})
    return task


def artifacts_dir(task: Task, task_path: Path, runs_dir: Path, stamp: str) -> Path:
    """Where this run writes: the task's `artifacts` (relative to the task file) or <home>/runs/<name>-<time>."""
    if task.artifacts:
        folder = Path(task.artifacts.format(name=task.name or task_path.stem, **{k: str(v) for k, v in task.vars.items()}))
        return folder if folder.is_absolute() else (task_path.parent / folder).resolve()
    return runs_dir / f"{task.name or task_path.stem}-{stamp}"


def run_checks(task: Task, answer: str, called: set[str], artifacts: Path) -> list[dict[str, Any]]:
    """Evaluate every check; each result says what was checked, whether it passed, and why."""
    results = []
    for check in task.checks:
        spec = {k: v for k, v in check.model_dump().items() if v is not None}
        failures = []
        if check.answer_matches is not None and not re.search(check.answer_matches, answer):
            failures.append(f"answer does not match /{check.answer_matches}/")
        if check.answer_contains is not None and check.answer_contains not in answer:
            failures.append(f"answer does not contain {check.answer_contains!r}")
        if check.file_exists is not None:
            found = [p for p in artifacts.rglob("*") if p.is_file() and fnmatch.fnmatch(str(p.relative_to(artifacts)), check.file_exists)]
            if not found:
                failures.append(f"no file matching {check.file_exists!r} in {artifacts}")
        if check.tool_called is not None and check.tool_called not in called:
            failures.append(f"tool {check.tool_called!r} was not called (called: {', '.join(sorted(called)) or 'none'})")
        results.append({"check": spec, "passed": not failures, "why": "; ".join(failures)})
    return results
