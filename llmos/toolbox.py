"""Tools as typed Python functions: `@tool` builds the JSON schema, `Toolbox` runs calls.

A tool is either a Python function (schema from its signature and docstring, arguments
validated by pydantic before the call) or an OpenAI-format tool dict (schema as given; such a
tool can be planned with `Kernel.complete` but has nothing to execute).
"""

from __future__ import annotations

import inspect
import json
import re
import threading
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import pydantic

from llmos.messages import Message, ToolCall

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


class ToolError(ValueError):
    """A tool definition that cannot be used (bad name, unsupported signature, bad dict)."""


@dataclass(frozen=True)
class Tool:
    """One callable device: its name, what the model reads about it, and how to run it."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    fn: Callable[..., Any] | None = None
    model: type[pydantic.BaseModel] | None = field(default=None, repr=False)
    timeout: float = 60.0
    untrusted: bool = False  # results come from outside (web pages, files): data, not instructions
    touches: str = "nothing outside the process"
    close: Callable[[], None] | None = field(default=None, repr=False)  # releases what a stateful tool holds
    # How the kernel decides (llmos/decide.py): requests that need this tool, regular expressions
    # that mark a request as needing it, a check that arguments make sense (raises or returns
    # False if not; may return the arguments rewritten as the tool writes them), and how an answer
    # states a result: a format string over the arguments and {result}, or a function of both;
    # `reads` takes a request and returns the arguments it plainly states (or None), so a routed
    # call needs no model turn (the calculator reads "subtract 7,845 from 20,000").
    examples: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    check: Callable[[Mapping[str, Any]], Any] | None = field(default=None, repr=False)
    says: str | Callable[[Mapping[str, Any], str], str] | None = None
    reads: Callable[[str], Mapping[str, Any] | None] | None = field(default=None, repr=False)  # arguments read from a request without the model
    constraint: Mapping[str, Any] | None = field(default=None, repr=False)  # a tighter schema for one turn's grammar (decide.py)
    # What a call can do (llmos/policy.py EFFECTS): () read-only, a tuple of effects, or a function of
    # the arguments that returns one; None (undeclared) counts as side effects. `origin` reads where
    # a result came from out of its text (the browser: "web:host:port"); default "tool:<name>".
    effects: tuple[str, ...] | Callable[[Mapping[str, Any]], tuple[str, ...]] | None = field(default=None, repr=False)
    origin: Callable[[str], str | None] | None = field(default=None, repr=False)

    def schema(self) -> dict[str, Any]:
        """The OpenAI-format tool dict."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fn is None:
            raise ToolError(f"tool {self.name!r} was given as a schema only; it has no function to run")
        return self.fn(*args, **kwargs)

    def validate(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """Arguments checked and coerced by the signature's types; raises pydantic.ValidationError."""
        if self.model is None:
            return dict(arguments)
        parsed = self.model.model_validate(dict(arguments))
        return {name: getattr(parsed, name) for name in self.model.model_fields}

    def invoke(self, arguments: Mapping[str, Any]) -> str:
        """Validate, run and render the result as text for the model."""
        result = self(**self.validate(arguments))
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result, default=str)
        except (TypeError, ValueError):
            return str(result)


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    """First paragraph as the description; `name: text` lines under Args: as parameter docs."""
    doc = inspect.cleandoc(doc or "")
    paragraphs = doc.split("\n\n")
    description = " ".join(paragraphs[0].split()) if paragraphs and paragraphs[0] else ""
    params: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            match = re.match(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$", stripped)
            if match:
                params[match.group(1)] = match.group(2)
            elif stripped and not line.startswith((" ", "\t")):
                in_args = False
    return description, params


def _strip_titles(schema: Any) -> Any:
    """pydantic adds a `title` to every node; the model does not need them (fewer prompt tokens)."""
    if isinstance(schema, dict):
        return {k: _strip_titles(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))}
    if isinstance(schema, list):
        return [_strip_titles(v) for v in schema]
    return schema


def _check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise ToolError(f"tool name {name!r} is invalid: use letters, digits, '_' or '-', at most 64 characters")
    return name


def make_tool(
    fn: Callable[..., Any],
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float = 60.0,
    untrusted: bool = False,
    touches: str = "nothing outside the process",
    close: Callable[[], None] | None = None,
    examples: Iterable[str] = (),
    patterns: Iterable[str] = (),
    check: Callable[[Mapping[str, Any]], Any] | None = None,
    says: str | Callable[[Mapping[str, Any], str], str] | None = None,
    reads: Callable[[str], Mapping[str, Any] | None] | None = None,
    effects: Any = None,
    origin: Callable[[str], str | None] | None = None,
) -> Tool:
    """Build a Tool from a typed function: each parameter needs a type hint (Annotated Field ok).
    examples, patterns, check, says and reads tell the kernel when and how to use it; effects
    what it does beyond reading (see Tool and llmos.policy.EFFECTS)."""
    name = _check_name(name or fn.__name__)
    doc_description, doc_params = _doc_parts(fn.__doc__ or "")
    fields: dict[str, Any] = {}
    try:
        hints = typing.get_type_hints(fn, include_extras=True)  # resolves `from __future__` string hints
    except (NameError, TypeError) as exc:
        raise ToolError(f"tool {name!r}: cannot resolve its type hints ({exc})") from None
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ToolError(f"tool {name!r}: *args/**kwargs cannot be described to the model; name each parameter")
        if pname not in hints:
            raise ToolError(f"tool {name!r}: parameter {pname!r} needs a type hint (e.g. `{pname}: str`)")
        default = ... if param.default is inspect.Parameter.empty else param.default
        if pname in doc_params:  # an Annotated Field's own description wins over the docstring's
            fields[pname] = (hints[pname], pydantic.Field(default, description=doc_params[pname]))
        else:
            fields[pname] = (hints[pname], default)
    model = pydantic.create_model(f"{name}_arguments", __config__=pydantic.ConfigDict(extra="forbid"), **fields)
    parameters = _strip_titles(model.model_json_schema())
    return Tool(
        name=name,
        description=description or doc_description or name,
        parameters=parameters,
        fn=fn,
        model=model,
        timeout=timeout,
        untrusted=untrusted,
        touches=touches,
        close=close,
        examples=tuple(examples),
        patterns=tuple(patterns),
        check=check,
        says=says,
        reads=reads,
        effects=declared_effects(effects, name),
        origin=origin,
    )


def declared_effects(effects: Any, name: str) -> Any:
    """A tool's effects as Tool keeps them: None (undeclared), a tuple of known effect names, or a
    function; "read-only" (or "none", [], ()) means no effects. Unknown names raise ToolError."""
    from llmos.policy import EFFECTS

    if effects is None or callable(effects):
        return effects
    if isinstance(effects, str):
        effects = () if effects.replace("_", "-").lower() in ("read-only", "readonly", "none") else (effects,)
    effects = tuple(str(e) for e in effects)
    unknown = [e for e in effects if e not in EFFECTS]
    if unknown:
        raise ToolError(f"tool {name!r}: unknown effect {unknown[0]!r}; use 'read-only' or some of: {', '.join(EFFECTS)}")
    return effects


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout: float = 60.0,
    untrusted: bool = False,
    touches: str = "nothing outside the process",
    examples: Iterable[str] = (),
    patterns: Iterable[str] = (),
    check: Callable[[Mapping[str, Any]], Any] | None = None,
    says: str | Callable[[Mapping[str, Any], str], str] | None = None,
    reads: Callable[[str], Mapping[str, Any] | None] | None = None,
    effects: Any = None,
) -> Any:
    """Decorator: `@tool` or `@tool(name=..., timeout=..., examples=[...], effects="read-only")` turns
    a typed function into a Tool. examples: requests that need it (the kernel routes by them);
    effects: "read-only", or some of llmos.policy.EFFECTS (undeclared: side effects); untrusted:
    its results come from outside. See Tool for the rest."""

    def wrap(f: Callable[..., Any]) -> Tool:
        return make_tool(f, name=name, description=description, timeout=timeout, untrusted=untrusted, touches=touches,
                         examples=examples, patterns=patterns, check=check, says=says, reads=reads, effects=effects)

    return wrap(fn) if fn is not None else wrap


def _check_schema(name: str, schema: Mapping[str, Any]) -> None:
    """Raise ToolError unless `schema` is a valid JSON Schema (checked against its metaschema)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "the top level"
        raise ToolError(f"tool {name!r}: 'parameters' is not a valid JSON Schema at {where}: {exc.message[:200]}") from None


def from_openai(spec: Mapping[str, Any], fn: Callable[..., Any] | None = None) -> Tool:
    """An OpenAI-format tool dict ({"type": "function", "function": {...}}) as a Tool."""
    fn_spec = spec.get("function", spec)
    if not isinstance(fn_spec, Mapping) or "name" not in fn_spec:
        raise ToolError("tool dict needs a 'function' object with a 'name' (OpenAI format)")
    parameters = fn_spec.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
        raise ToolError(f"tool {fn_spec['name']!r}: 'parameters' must be a JSON schema of type object")
    _check_schema(str(fn_spec["name"]), parameters)
    return Tool(
        name=_check_name(fn_spec["name"]),
        description=fn_spec.get("description") or fn_spec["name"],
        parameters=parameters,
        fn=fn,
        examples=tuple(str(e) for e in fn_spec.get("examples") or ()),  # optional, not part of OpenAI's format
        # also optional, beside OpenAI's format: what the tool does (undeclared: side effects), and
        # whether its results come from outside
        effects=declared_effects(fn_spec.get("effects"), fn_spec["name"]),
        untrusted=bool(fn_spec.get("untrusted", False)),
    )


def as_tool(obj: Any) -> Tool:
    """Accept a Tool, a typed function or an OpenAI-format tool dict."""
    if isinstance(obj, Tool):
        return obj
    if isinstance(obj, Mapping):
        return from_openai(obj)
    if callable(obj):
        return make_tool(obj)
    raise ToolError(f"cannot use {obj!r} as a tool: pass a @tool function, a typed function or an OpenAI tool dict")


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, pydantic.ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'arguments'}: {e['msg']}" for e in exc.errors())
        return f"invalid arguments: {problems}"
    return f"{type(exc).__name__}: {exc}"


class Toolbox:
    """The registered tools, by name; runs a turn's calls concurrently, results in call order."""

    def __init__(self, tools: Iterable[Any] = ()) -> None:
        if isinstance(tools, (str, Mapping)) or callable(tools):
            raise ToolError(f"tools must be a list of tools, not one {type(tools).__name__} ({tools!r:.60}); wrap it: [tool]")
        self._tools: dict[str, Tool] = {}
        for t in tools:
            self.add(t)

    def add(self, obj: Any) -> Tool:
        t = as_tool(obj)
        self._tools[t.name] = t
        return t

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self):
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema() for t in self._tools.values()]

    def call(self, call: ToolCall) -> Message:
        """Run one call; this is the one place a failing tool becomes a `tool` message."""
        meta: dict[str, Any] = {"tool_call_id": call.id, "name": call.name, "source": f"tool:{call.name}"}
        t = self._tools.get(call.name)
        if t is None:
            return Message("tool", f"error: no tool named {call.name!r}", meta={**meta, "error": True})
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["content"] = t.invoke(call.arguments)
            except BaseException as exc:  # noqa: BLE001 - the model reads the error and carries on
                box["error"] = _error_text(exc)

        # A daemon thread per call: a runaway tool cannot be killed from Python, but it must not
        # hold the kernel (or interpreter exit) hostage either.
        worker = threading.Thread(target=target, name=f"tool-{call.name}", daemon=True)
        worker.start()
        worker.join(t.timeout)
        if worker.is_alive():
            return Message("tool", f"error: tool {call.name!r} timed out after {t.timeout:g} s", meta={**meta, "error": True})
        if t.untrusted:
            meta["untrusted"] = True
        if "error" in box:
            return Message("tool", f"error: {box['error']}", meta={**meta, "error": True})
        content = box.get("content", "")
        if t.origin is not None:
            meta["source"] = t.origin(content) or meta["source"]
        return Message("tool", content, meta=meta)

    def call_all(self, calls: Iterable[ToolCall], refused: Mapping[str, str] | None = None) -> list[Message]:
        """Run calls concurrently (each on its own thread); results come back in call order. A call
        whose id is in `refused` is not run: its result is the reason given there."""
        calls = list(calls)
        if refused:
            done = dict(zip((c.id for c in calls if c.id not in refused), self.call_all([c for c in calls if c.id not in refused])))
            return [done.get(c.id) or Message("tool", f"error: {refused[c.id]}", meta={
                "tool_call_id": c.id, "name": c.name, "source": "kernel", "error": True, "refused": True}) for c in calls]
        if len(calls) <= 1:
            return [self.call(c) for c in calls]
        results: list[Message | None] = [None] * len(calls)

        def run(i: int, c: ToolCall) -> None:
            results[i] = self.call(c)

        threads = [threading.Thread(target=run, args=(i, c), daemon=True) for i, c in enumerate(calls)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return [r for r in results if r is not None]
