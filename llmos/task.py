"""Task files: a pydantic schema for unattended runs, validation with file:line:field errors, checks.

    llmos validate task.yaml          every problem, one line each, exit 2 if any
    llmos agent task.yaml --var n=3   run it; exit 0 checks passed, 1 checks failed, 2 bad input
"""

from __future__ import annotations

import fnmatch
import re
import string
from pathlib import Path
from typing import Any, Optional, Union

import pydantic
import yaml

from llmos.config import Budget, Config, ConfigError, ToolsConfig, apply_overrides, error_lines, yaml_error_text


class TaskError(ValueError):
    """A task file that cannot run; `problems` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


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


class Task(Config):
    """A task file: a Config (model, sampling, budget, tools, memory, agent) plus what to run and
    how the run is checked. Unattended runs get a wall-clock budget by default."""

    goal: str = pydantic.Field(min_length=1)  # the prompt; {variables} are filled from vars and --var
    vars: dict[str, Union[str, int, float, bool]] = {}
    tools: ToolsConfig = ToolsConfig(enabled=["calculator"])
    budget: Budget = Budget(seconds=600)
    artifacts: Optional[str] = None  # folder for trace, result.json and tool files; relative to the task file
    checks: list[Check] = []

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


def _line(root: Any, loc: tuple, key_node: bool = False) -> int:
    node = _locate(root, loc, key_node) if root is not None else None
    return node.start_mark.line + 1 if node is not None else 1


def _problems(exc: pydantic.ValidationError, source: str, root: Any) -> list[tuple[int, str]]:
    lines = []
    for loc, field, msg in error_lines(exc, Task):
        line = _line(root, loc, key_node=msg.startswith("unknown key") or " moved to " in msg)
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
    raw = data.get("tools")
    tools_data = raw if isinstance(raw, dict) else {"enabled": raw} if isinstance(raw, list) else {}
    for i, name in enumerate(tools_data.get("enabled") or []):
        if isinstance(name, str) and ":" in name:  # a user tool must import now, not mid-run
            from llmos.build import user_tool

            try:
                user_tool(name, path.parent.resolve())
            except ConfigError as exc:
                line = _line(root, ("tools", "enabled", i) if isinstance(raw, dict) else ("tools", i))
                problems.append((line, f"{source}:{line}: {exc}"))
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
        model = task.model.model_copy(update={"path": str((path.parent / Path(task.model.path).expanduser()).resolve())})
        task = task.model_copy(update={"model": model})
    return task


def artifacts_dir(task: Task, task_path: Path, runs_dir: Path, stamp: str) -> Path:
    """Where this run writes: the task's `artifacts` (relative to the task file) or <home>/runs/<name>-<time>."""
    if task.artifacts:
        folder = Path(task.artifacts.format(name=task.agent.name or task_path.stem, **{k: str(v) for k, v in task.vars.items()}))
        return folder if folder.is_absolute() else (task_path.parent / folder).resolve()
    return runs_dir / f"{task.agent.name or task_path.stem}-{stamp}"


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
