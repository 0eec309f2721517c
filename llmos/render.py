"""Terminal rendering of Messages and tables (rich), shared by the CLI commands."""

from __future__ import annotations

import json
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmos.messages import Message

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class MessagePrinter:
    """Streams answer tokens as they come; shows tool calls and results as one line each."""

    def __init__(self) -> None:
        self.buffer = ""  # deltas of the current turn held back while they may be a tool call
        self.streaming = False

    def __call__(self, message: Message) -> None:
        if message.is_delta:
            if self.streaming:
                sys.stdout.write(message.content)
                sys.stdout.flush()
                return
            self.buffer += message.content
            if not "<tool_call>".startswith(self.buffer[: len("<tool_call>")]):
                self.streaming = True
                sys.stdout.write(self.buffer)
                sys.stdout.flush()
            return
        was_streaming, self.buffer, self.streaming = self.streaming, "", False
        if message.role == "assistant":
            for c in message.tool_calls:
                args = ", ".join(f"{k}={json.dumps(v)}" for k, v in c.arguments.items())
                out.print(f"[cyan]→ {c.name}({_short(args, 200)})[/cyan]")
            if not message.tool_calls:
                if was_streaming:
                    sys.stdout.write("\n")
                else:
                    out.print(message.content, markup=False)
        elif message.role == "tool":
            style = "red" if message.meta.get("error") else "green"
            out.print(f"[{style}]← {message.meta.get('name', 'tool')}: {_short(message.content)}[/{style}]", markup=True)
        elif message.role == "kernel":
            if message.meta.get("event") == "policy":
                style = {"allow": "dim", "deny": "red"}.get(str(message.meta.get("decision")), "yellow")
                err.print(f"[{style}]{escape(message.content)}[/{style}]")
            elif message.meta.get("exit"):
                err.print(f"[dim]done: {message.meta['exit']} after {message.meta.get('steps')} step(s)[/dim]")
            else:
                err.print(f"[yellow]kernel: {message.content}[/yellow]")


print_message = MessagePrinter()


def _count(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def models_table(rows: Iterable[dict[str, Any]]) -> None:
    table = Table(title="GGUF models")
    for col in ("origin", "name", "arch", "params", "quant", "context", "template", "path", "sha256"):
        table.add_column(col, overflow="fold")
    for r in rows:
        if "error" in r:
            table.add_row(r["origin"], "[red]unreadable[/red]", "", "", "", "", "", r["error"], "")
            continue
        table.add_row(
            r["origin"], r["name"], r["architecture"], _count(r["parameters"]), r["quantization"],
            str(r["context_length"] or "?"), "yes" if r["chat_template"] else "no", r["path"], str(r["sha256"]),
        )
    out.print(table)


def tools_table(tools: Iterable[Any]) -> None:
    table = Table(title="tools")
    for col in ("name", "description", "parameters", "effects", "touches"):
        table.add_column(col)
    for t in tools:
        props = t.parameters.get("properties", {})
        required = set(t.parameters.get("required", []))
        params = ", ".join(f"{k}{'' if k in required else '?'}: {v.get('type', 'any')}" for k, v in props.items())
        table.add_row(t.name, t.description, params, describe_effects(t), t.touches)


def describe_effects(t: Any) -> str:
    """A tool's declared effects in words, and whether its results are outside text."""
    e = t.effects
    said = ("undeclared: counts as side effects" if e is None else "by action" if callable(e) else ", ".join(e) or "read-only")
    return said + ("; results untrusted" if t.untrusted else "")
    out.print(table)


def agents_table(rows: list[dict[str, Any]], title: str | None = None) -> None:
    """A process table, one line per agent, cut to the terminal's width (`--json` has every field)."""
    def cut(text: str, width: int) -> str:
        return text if len(text) <= width else text[: width - 1] + "…"

    units = {"steps": " steps", "tokens": " tok", "seconds": "s"}
    lines = [f"{'ID':>3} {'NAME':14} {'PRI':>3} {'STATE':8} {'STEPS':>5} {'TOKENS':>7} {'AGE':>5}  {'BUDGET':18} NOTE"]
    for r in rows:
        budget = " ".join(f"{v:g}{units.get(k, ' ' + k)}" for k, v in r.get("budget", {}).items())
        lines.append(f"{r['id']:>3} {cut(r['name'], 14):14} {r['priority']:>3} {r['state']:8} {r['steps']:>5} {r['tokens']:>7} "
                     f"{r['age_s']:>4.0f}s  {cut(budget, 18):18} {' '.join((r.get('note') or '').split())}")
    if title:
        out.print(title, markup=False)
    for line in lines:
        out.print(cut(line, max(out.width, 60)), markup=False, soft_wrap=True)
