"""The one currency of llmos: an immutable Message, and the ToolCall it may carry."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Mapping

Role = Literal["system", "user", "assistant", "tool", "kernel"]
ROLES = ("system", "user", "assistant", "tool", "kernel")


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class ToolCall:
    """A request from the model to run one tool with parsed JSON arguments."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        object.__setattr__(self, "arguments", _frozen(self.arguments))

    def to_dict(self) -> dict[str, Any]:
        """OpenAI-style tool call dict (arguments as a JSON string, as OpenAI sends them)."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(dict(self.arguments))},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ToolCall":
        fn = data.get("function", data)
        args = fn.get("arguments", {})
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        return cls(name=fn["name"], arguments=args, id=data.get("id") or "call_" + uuid.uuid4().hex[:12])


@dataclass(frozen=True)
class Message:
    """What the kernel yields, the trace stores, tests assert on and replay feeds back.

    `meta` carries provenance and flags, e.g. {"source": "browser", "untrusted": True},
    {"delta": True} for a streamed token, or {"exit": "answer"} on the kernel's last message.
    """

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown message role {self.role!r}; expected one of {', '.join(ROLES)}")
        object.__setattr__(self, "tool_calls", tuple(self.tool_calls))
        object.__setattr__(self, "meta", _frozen(self.meta))

    @property
    def is_delta(self) -> bool:
        return bool(self.meta.get("delta"))

    def to_dict(self) -> dict[str, Any]:
        """OpenAI-style message dict plus `meta`; the JSONL trace format."""
        data: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            data["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.meta:
            data["meta"] = dict(self.meta)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Message":
        """Accepts OpenAI-style dicts (`tool_call_id`, `name`) as well as our own trace lines."""
        meta = dict(data.get("meta") or {})
        for key in ("tool_call_id", "name"):
            if key in data and key not in meta:
                meta[key] = data[key]
        return cls(
            role=data["role"],
            content=data.get("content") or "",
            tool_calls=tuple(ToolCall.from_dict(c) for c in data.get("tool_calls") or ()),
            meta=meta,
        )


class Trace:
    """Append-only JSONL of a kernel's messages; each line is written whole and flushed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @classmethod
    def at(cls, where: str | Path | None) -> "Trace":
        """A trace at a .jsonl file, or a new file in a folder (default <home>/traces)."""
        if where is None:
            from llmos.config import home_dir

            where = home_dir() / "traces"
        path = Path(where)
        if path.suffix != ".jsonl":
            path = path / (time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6] + ".jsonl")
        return cls(path)

    def write(self, message: Message) -> None:
        line = json.dumps({"ts": round(time.time(), 3), **message.to_dict()}, default=str)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def read(self) -> list[Message]:
        if not self.path.exists():
            return []
        with open(self.path, encoding="utf-8") as fh:
            return [Message.from_dict(json.loads(line)) for line in fh if line.strip()]
