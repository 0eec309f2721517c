"""`llmos eval`: tool-use suites run against a model, scored, and reported as JSON.

A suite is a JSONL file, one case a line; the keys tell the two formats apart:

- BFCL-style (`question` or `messages`, `function` or `tools`, `ground_truth`): one turn is planned
  with `Kernel.complete` (nothing runs) in each mode asked for ("auto", "required"), and its calls
  are scored by BFCL's AST rules (`check_calls`). BFCL function docs become JSON Schema
  (`bfcl_tools`: dict→object, float→number, tuple→array, any→no type; dots in names become `_`).
- routing (`prompt`, `tools`, `expect`, optional `answer_contains` / `answer_matches`): the prompt
  runs end to end with `Kernel.run`, tools executed. The selection is right when the first call's
  tool is `expect` (no call when it is null); `{site}` in a prompt becomes the URL of the `site/`
  folder beside the suite, served on 127.0.0.1, the only host the browser may load.

`evaluate` returns the report: scores per group ("routing", "bfcl:auto", "bfcl:required") with
selection accuracy, parse rate (of turns that call, those whose calls parse and validate against
the schema), AST or answer accuracy, latency p50/p95, and one detail per case.
"""

from __future__ import annotations

import difflib
import functools
import http.server
import json
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from llmos.config import Config

MODES = ("auto", "required")
ROUTING_KEYS = {"id", "prompt", "tools", "expect", "answer_contains", "answer_matches"}
BFCL_KEYS = {"id", "question", "messages", "function", "tools", "ground_truth"}
# Beneath the config file and -o: a case is one question, memory would leak between cases.
EVAL_DEFAULTS: dict[str, Any] = {"memory": {"enabled": False}, "budget": {"steps": 4, "seconds": 180},
                                 "sampling": {"max_tokens": 256}}


class SuiteError(ValueError):
    """A suite file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Case:
    """One line of a suite: `kind` is "bfcl" or "routing"; `data` the line as parsed."""

    id: str
    kind: str
    data: Mapping[str, Any]
    suite: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.suite}:{self.line}"


# -- loading --------------------------------------------------------------------------------------


def load_suite(path: str | Path, limit: int | None = None) -> list[Case]:
    """The cases of one suite file (the first `limit` of them), each checked for its format."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such suite file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: cannot read it ({exc})") from None
    cases: list[Case] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        if limit is not None and len(cases) >= limit:
            break
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SuiteError(f"{path}:{number}: not a JSON object ({exc.msg} at column {exc.colno})") from None
        if not isinstance(data, dict):
            raise SuiteError(f"{path}:{number}: a case must be a JSON object, got {type(data).__name__}")
        kind = "routing" if "prompt" in data else "bfcl" if "ground_truth" in data else None
        if kind is None:
            raise SuiteError(f"{path}:{number}: a case needs 'prompt' (routing) or 'ground_truth' (BFCL-style)")
        problem = _routing_problem(data) if kind == "routing" else _bfcl_problem(data)
        if kind == "routing" and "{site}" in data["prompt"] and not (path.parent / "site").is_dir():
            problem = f"the prompt uses {{site}} but there is no folder {path.parent / 'site'} to serve"
        if problem:
            raise SuiteError(f"{path}:{number}: {problem}")
        case_id = str(data.get("id") or f"{path.stem}-{number}")
        if case_id in {c.id for c in cases}:
            raise SuiteError(f"{path}:{number}: case id {case_id!r} is used twice")
        cases.append(Case(case_id, kind, data, path, number))
    if not cases:
        raise SuiteError(f"{path}: no cases (one JSON object a line)")
    return cases


def _unknown_keys(data: Mapping[str, Any], known: set[str]) -> str | None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            return f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(known))})")
    return None


def _routing_problem(data: Mapping[str, Any]) -> str | None:
    from llmos.tools import BUILTIN

    if (problem := _unknown_keys(data, ROUTING_KEYS)):
        return problem
    if not isinstance(data["prompt"], str) or not data["prompt"].strip():
        return "'prompt' must be a non-empty string"
    tools = data.get("tools", [])
    if not isinstance(tools, list):
        return "'tools' must be a list: built-in names, 'module:function' or OpenAI tool dicts"
    for spec in tools:
        if isinstance(spec, str) and ":" not in spec and spec not in BUILTIN:
            close = difflib.get_close_matches(spec, BUILTIN, n=1)
            return f"unknown tool {spec!r}" + (f"; did you mean {close[0]!r}?" if close else f" (built-ins: {', '.join(BUILTIN)}, or module:function)")
        if not isinstance(spec, (str, dict)):
            return f"tool {spec!r} must be a name or an OpenAI tool dict"
    if "expect" not in data:
        return "'expect' is missing: the tool the prompt needs, or null when it needs none"
    expect = data["expect"]
    if expect is not None and _tool_name(expect) not in [_tool_name(t) for t in tools]:
        return f"'expect' {expect!r} is not one of the case's tools"
    for key in ("answer_contains", "answer_matches"):
        if key in data and not isinstance(data[key], str):
            return f"{key!r} must be a string"
    if "answer_matches" in data:
        try:
            re.compile(data["answer_matches"])
        except re.error as exc:
            return f"'answer_matches' is not a regular expression ({exc})"
    return None


def _bfcl_problem(data: Mapping[str, Any]) -> str | None:
    if (problem := _unknown_keys(data, BFCL_KEYS)):
        return problem
    try:
        messages = bfcl_messages(data)
    except (TypeError, KeyError, IndexError):
        return "'question' must be [[{role, content}, ...]] (or give 'messages': [...])"
    if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        return "the case's messages must be a non-empty list of {role, content} objects"
    functions = data.get("function", data.get("tools"))
    if not isinstance(functions, list) or not functions or not all(isinstance(f, dict) for f in functions):
        return "'function' (BFCL docs) or 'tools' (OpenAI dicts) must be a non-empty list of objects"
    truth = data["ground_truth"]
    if not isinstance(truth, list) or not truth or not all(
            isinstance(t, dict) and len(t) == 1 and isinstance(next(iter(t.values())), dict) for t in truth):
        return "'ground_truth' must be [{function_name: {parameter: [accepted values]}}]"
    for t in truth:
        for param, accepted in next(iter(t.values())).items():
            if not isinstance(accepted, list):
                return f"ground_truth parameter {param!r}: accepted values must be a list ('' = may be omitted)"
    return None


def _tool_name(spec: Any) -> str:
    """The name a tool spec gives the model: a built-in's name, module:function's function, a dict's name."""
    if isinstance(spec, dict):
        return str(spec.get("function", spec).get("name", ""))
    return str(spec).partition(":")[2] or str(spec)


# -- BFCL cases: schemas and the AST check ---------------------------------------------------------

BFCL_TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None}
# Python types BFCL checks values against, by BFCL's type names and by JSON Schema's ("any" is a
# string to BFCL: a variable's name).
PY_TYPES = {"string": str, "integer": int, "float": float, "number": float, "boolean": bool,
            "array": list, "tuple": list, "dict": dict, "object": dict, "any": str}


def json_schema(node: Any) -> Any:
    """A BFCL parameter doc as JSON Schema: BFCL type names mapped, "any" left without a type."""
    if isinstance(node, list):
        return [json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "type" and isinstance(value, str):
            if BFCL_TYPES.get(value, value) is not None:
                out["type"] = BFCL_TYPES.get(value, value)
        elif key == "properties" and isinstance(value, dict):
            out[key] = {name: json_schema(p) for name, p in value.items()}  # names are not keywords
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "prefixItems"):
            out[key] = json_schema(value)
        else:
            out[key] = value
    return out


def openai_name(name: str) -> str:
    """A function name as OpenAI tools allow it (^[A-Za-z0-9_-]{1,64}$): BFCL's dots become '_'."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64]
    return name if re.match(r"^[A-Za-z_]", name) else "_" + name[:63]


@dataclass(frozen=True)
class Functions:
    """A BFCL case's functions: the OpenAI tool dicts sent, and how to score calls to them."""

    tools: list[dict[str, Any]]
    original: dict[str, str]  # OpenAI name -> the case's own name (as in ground_truth)
    params: dict[str, dict[str, Any]]  # the case's own name -> its parameters doc (types as the case wrote them)


def bfcl_tools(data: Mapping[str, Any]) -> Functions:
    """OpenAI tool dicts for a case's `function` (BFCL docs) or `tools` (OpenAI dicts)."""
    tools, original, params = [], {}, {}
    for spec in data.get("function", data.get("tools")):
        doc = spec.get("function", spec)
        name = openai_name(doc["name"])
        parameters = doc.get("parameters") or {"type": "object", "properties": {}}
        tools.append({"type": "function", "function": {"name": name, "description": doc.get("description") or doc["name"],
                                                       "parameters": json_schema(parameters)}})
        original[name] = doc["name"]
        params[doc["name"]] = parameters
    return Functions(tools, original, params)


def bfcl_messages(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The messages of the case's first turn: `messages`, or BFCL's `question` ([[...]] or [...])."""
    if "messages" in data:
        return list(data["messages"])
    question = data["question"]
    return list(question[0]) if isinstance(question[0], list) else list(question)


def standardize(text: str) -> str:
    """BFCL's string normalisation: no spaces or ,./-_*^, lower case, single quotes as double."""
    return re.sub(r"[ ,./\-_*^]", "", text).lower().replace("'", '"')


def _std(value: Any) -> Any:
    return standardize(value) if isinstance(value, str) else value


def _dict_ok(value: Mapping[str, Any], accepted: Sequence[Any]) -> bool:
    """A dict matches one accepted dict: its keys accepted, each value among that key's values,
    every key it leaves out allowed to be omitted ("")."""
    for option in accepted:
        if not isinstance(option, dict):
            continue
        if all(k in option and _std(v) in [_std(a) for a in option[k]] for k, v in value.items()) and \
                all(k in value or "" in vals for k, vals in option.items()):
            return True
    return False


def check_value(name: str, value: Any, spec: Mapping[str, Any], accepted: Sequence[Any]) -> str | None:
    """Why `value` is not an accepted value of parameter `name` (None: it is), by BFCL's rules."""
    kind = spec.get("type")
    want = PY_TYPES.get(kind) if isinstance(kind, str) else None
    if want is float and type(value) is int:
        value = float(value)  # Python's own int -> float, which BFCL allows at the top level
    answer_type = next((type(a) for a in accepted if a != ""), None)
    # A "variable": the accepted values have another type than the schema's (e.g. a name as a
    # string for a dict parameter); such values are compared as they are.
    variable = False
    if want is not None and type(value) is not want:
        if answer_type is None or type(value) is not answer_type:
            return f"{name}: expected {kind}, got {type(value).__name__} {value!r}"
        variable = True
    elif want is not None and answer_type is not None and answer_type is not want:
        variable = True
    items = spec.get("items") if isinstance(spec.get("items"), dict) else {}
    item_type = PY_TYPES.get(items.get("type")) if isinstance(items.get("type"), str) else None
    if want is list and not variable and item_type is not None and "" not in accepted:
        typed = [a for a in accepted if isinstance(a, list)]
        if not any(all(type(v) is item_type or (a and type(v) is type(a[0])) for v in value) for a in typed):
            return f"{name}: expected a list of {items.get('type')}, got {value!r}"
    if variable:
        ok = value in accepted
    elif want is dict:
        ok = _dict_ok(value, accepted)
    elif want is list and item_type is dict:
        ok = any(isinstance(a, list) and len(a) == len(value) and all(_dict_ok(v, [d]) for v, d in zip(value, a))
                 for a in accepted)
    elif want is list or isinstance(value, list):
        ok = [_std(v) for v in value] in [[_std(x) for x in a] for a in accepted if isinstance(a, list)]
    elif isinstance(value, str):
        ok = standardize(value) in [standardize(a) for a in accepted if isinstance(a, str)]
    else:
        ok = value in accepted
    return None if ok else f"{name}: {value!r} is not one of {list(accepted)!r}"


def check_call(params: Mapping[str, Any], arguments: Mapping[str, Any], accepted: Mapping[str, Sequence[Any]]) -> str | None:
    """Why one call's arguments fail BFCL's AST check against a function's parameters doc and the
    accepted values per parameter (None: they pass)."""
    props = params.get("properties") or {}
    for name in params.get("required") or []:
        if name not in arguments:
            return f"missing required parameter {name!r}"
    for name, value in arguments.items():
        if name not in props or name not in accepted:
            return f"unexpected parameter {name!r}"
        if (why := check_value(name, value, props[name], accepted[name])):
            return why
    for name, values in accepted.items():
        if name not in arguments and "" not in values:
            return f"parameter {name!r} left out but it may not be"
    return None


def check_calls(functions: Functions, calls: Sequence[Any], ground_truth: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the turn's calls fail the AST check (None: they pass): as many calls as expected, and
    each expected call matched by one call, in any order (BFCL's simple, multiple and parallel)."""
    if len(calls) != len(ground_truth):
        return f"{len(calls)} call(s), expected {len(ground_truth)}" if calls else "no call"
    left = list(calls)
    for expected in ground_truth:
        name, accepted = next(iter(expected.items()))
        reasons = []
        for call in left:
            got = functions.original.get(call.name, call.name)
            why = f"wrong function {got!r}, expected {name!r}" if got != name else \
                check_call(functions.params.get(name, {}), call.arguments, accepted)
            if why is None:
                left.remove(call)
                break
            reasons.append(why)
        else:
            return reasons[0]
    return None


def validation_error(schema: Mapping[str, Any], arguments: Mapping[str, Any]) -> str | None:
    """Why arguments do not validate against a JSON Schema (None: they do)."""
    import jsonschema

    try:
        validator = jsonschema.validators.validator_for(schema)(schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(dict(arguments)))
    except jsonschema.exceptions.SchemaError as exc:
        return f"the tool's schema is invalid ({exc.message})"
    if error is None:
        return None
    where = ".".join(str(p) for p in error.absolute_path)
    return f"{where + ': ' if where else ''}{error.message}"


def _turn_parse(reply: Any, schemas: Mapping[str, Mapping[str, Any]]) -> tuple[bool, str | None]:
    """(attempted a call, why its calls do not parse or validate or None): a turn whose text opens
    a call but yields none did not parse."""
    if not reply.tool_calls:
        opened = str(reply.meta.get("raw", "")).lstrip().startswith("<tool_call>")
        return opened, "a call was opened but did not parse" if opened else None
    for call in reply.tool_calls:
        if call.name not in schemas:
            return True, f"call to unknown tool {call.name!r}"
        if (why := validation_error(schemas[call.name], call.arguments)):
            return True, f"{call.name}: {why}"
    return True, None


# -- running ---------------------------------------------------------------------------------------


class Sites:
    """Local web servers, one per folder, on 127.0.0.1, started when a case first needs one."""

    def __init__(self) -> None:
        self.servers: dict[Path, http.server.ThreadingHTTPServer] = {}

    def url(self, folder: Path) -> str:
        if folder not in self.servers:
            handler = functools.partial(_QuietHandler, directory=str(folder))
            server = self.servers[folder] = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.servers[folder].server_address[1]}/"

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()
        self.servers.clear()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:  # the progress bar owns the terminal
        pass


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:80] or "case"


def _trace(folder: Path, case: Case, mode: str = "") -> Path:
    return folder / "traces" / _slug(case.suite.stem) / f"{_slug(case.id)}{'-' + mode if mode else ''}.jsonl"


def _config(settings: Config, enabled: list[str], **tools: Any) -> dict[str, Any]:
    """The settings as a config dict for one case: its tools, the browser kept on 127.0.0.1."""
    data = settings.model_dump(mode="json", include=set(Config.model_fields))
    data["tools"].update(enabled=enabled, **tools)
    data["tools"]["browser"]["allow_domains"] = ["127.0.0.1"]
    return data


def _answer_problem(case: Mapping[str, Any], answer: str) -> str | None:
    """Why the final answer fails the case's answer checks (None: it passes)."""
    flat = re.sub(r"(?<=\d)[,\u202f\u00a0](?=\d{3}\b)", "", answer)  # 83,810,205 states 83810205
    needle = case.get("answer_contains")
    if needle is not None:
        # A number stands alone: "391" is not found in "1391" or "3.391", nor "12" in "12.5" (but in "12.0"); a
        # decimal may go on with more digits ("1.41421" is in "1.414214").
        pattern = re.escape(needle)
        if re.fullmatch(r"-?\d+", needle):
            pattern = rf"(?<![\d.]){pattern}(?:\.0+)?(?!\.?\d)"  # 50.0 states 50
        elif re.fullmatch(r"-?\d+\.\d+", needle):
            pattern = rf"(?<![\d.]){pattern}"
        if not (re.search(pattern, answer, re.I) or re.search(pattern, flat, re.I)):
            return f"answer lacks {needle!r}"
    pattern = case.get("answer_matches")
    if pattern is not None and not (re.search(pattern, answer, re.I | re.S) or re.search(pattern, flat, re.I | re.S)):
        return f"answer does not match /{pattern}/"
    return None


def _expected(case: Case) -> str | None:
    """The tool (routing) or function (BFCL, the first expected call) a case expects."""
    if case.kind == "bfcl":
        return next(iter(case.data["ground_truth"][0]))
    return _tool_name(case.data["expect"]) if case.data["expect"] is not None else None


def run_routing(case: Case, settings: Config, resources: Any, sites: Sites, folder: Path) -> dict[str, Any]:
    """Run a routing case end to end; its detail for the report."""
    from llmos.build import build

    data = case.data
    specs = data.get("tools", [])
    prompt = data["prompt"]
    if "{site}" in prompt:
        prompt = prompt.replace("{site}", sites.url(case.suite.parent / "site"))
    expect = _expected(case)
    config = _config(settings, [s for s in specs if isinstance(s, str)])
    start = time.perf_counter()
    with build(config, tools=[s for s in specs if isinstance(s, dict)], resources=resources, base=case.suite.parent,
               artifacts=folder / "artifacts" / _slug(case.suite.stem) / _slug(case.id), trace=_trace(folder, case)) as kernel:
        schemas = {t.name: dict(t.parameters) for t in kernel.tools}
        messages = [m for m in kernel.run(prompt) if not m.is_delta]
        trace = str(kernel.trace.path)
    seconds = time.perf_counter() - start
    turns = [m for m in messages if m.role == "assistant"]
    calls = [c for m in turns for c in m.tool_calls]
    got = calls[0].name if calls else None
    parses = [_turn_parse(m, schemas) for m in turns]
    answer = next((m.content for m in reversed(turns) if not m.tool_calls), "")
    checked = "answer_contains" in data or "answer_matches" in data
    reasons = []
    if got != expect:
        reasons.append(f"called {got!r}, expected {expect!r}" if got else f"no call, expected {expect!r}")
    answer_why = _answer_problem(data, answer) if checked else None
    if answer_why:
        reasons.append(answer_why)
    return {
        "id": case.id, "suite": str(case.suite), "kind": "routing", "mode": str(settings.tools.tool_choice),
        "prompt": prompt, "expected": expect, "got": got, "calls": [{"name": c.name, "arguments": dict(c.arguments)} for c in calls],
        "selected": got == expect, "parse": [why is None for opened, why in parses if opened],
        "parse_errors": [why for opened, why in parses if opened and why],
        "answer": answer, "answer_ok": (answer_why is None) if checked else None,
        "passed": not reasons, "reason": "; ".join(reasons) or "ok",
        "route": [{"content": m.content, **dict(m.meta)} for m in messages if m.role == "kernel" and m.meta.get("event") == "route"],
        "exit": messages[-1].meta.get("exit") if messages else None, "trace": trace, "seconds": round(seconds, 3),
    }


def run_bfcl(case: Case, mode: str, settings: Config, resources: Any, folder: Path) -> dict[str, Any]:
    """Plan one turn of a BFCL-style case in `mode` ("auto" or "required"); its detail for the report."""
    from llmos.build import build

    functions = bfcl_tools(case.data)
    truth = case.data["ground_truth"]
    expected = [next(iter(t)) for t in truth]
    start = time.perf_counter()
    with build(_config(settings, [], tool_choice="auto"), resources=resources, artifacts=folder / "artifacts" / _slug(case.suite.stem) / _slug(case.id),
               trace=_trace(folder, case, mode)) as kernel:
        reply = kernel.complete(bfcl_messages(case.data), functions.tools, tool_choice=mode)
    seconds = time.perf_counter() - start
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in functions.tools}
    opened, parse_why = _turn_parse(reply, schemas)
    got = [functions.original.get(c.name, c.name) for c in reply.tool_calls]
    why = check_calls(functions, reply.tool_calls, truth)
    return {
        "id": case.id, "suite": str(case.suite), "kind": "bfcl", "mode": mode,
        "expected": expected[0] if len(expected) == 1 else expected, "got": (got[0] if len(got) == 1 else got) or None,
        "calls": [{"name": functions.original.get(c.name, c.name), "arguments": dict(c.arguments)} for c in reply.tool_calls],
        "selected": bool(got) and got[0] == expected[0], "parse": [parse_why is None] if opened else [],
        "parse_errors": [parse_why] if parse_why else [], "ast": why is None,
        "answer": reply.content, "passed": why is None, "reason": why or "ok",
        "route": [], "seconds": round(seconds, 3),
    }


def evaluate(cases: Sequence[Case], settings: Config, resources: Any, *, modes: Iterable[str] = MODES,
             folder: Path | None = None, progress: Callable[[int, int, str], None] | None = None) -> dict[str, Any]:
    """Run every case (BFCL-style ones once per mode) on `resources`' model; the report.

    settings: the config every case starts from (its tools replaced by the case's). folder: where
    per-case traces and tool artifacts go (default: a temporary folder, removed afterwards).
    progress(done, total, case id) is called after each case. A case that raises is recorded as
    failed with the error as its reason; the others still run. Ctrl-C (KeyboardInterrupt) ends the
    run early: the report covers the cases done and says `"interrupted": true`."""
    modes = [m for m in MODES if m in set(modes)]
    jobs = [(case, mode) for case in cases for mode in (modes if case.kind == "bfcl" else ["auto"])]
    backend = resources.backend(settings.model)  # a bad model path fails here, before any case
    sites = Sites()
    scratch = tempfile.TemporaryDirectory(prefix="llmos-eval-") if folder is None else None
    where = Path(scratch.name) if scratch else Path(folder)
    details: list[dict[str, Any]] = []
    interrupted = False
    try:
        for done, (case, mode) in enumerate(jobs, 1):
            start = time.perf_counter()
            try:
                if case.kind == "routing":
                    detail = run_routing(case, settings, resources, sites, where)
                else:
                    detail = run_bfcl(case, mode, settings, resources, where)
            except Exception as exc:  # noqa: BLE001 - one broken case is a result, not the end of the suite
                detail = {"id": case.id, "suite": str(case.suite), "kind": case.kind, "mode": mode, "passed": False,
                          "selected": False, "parse": [], "parse_errors": [], "ast": False if case.kind == "bfcl" else None,
                          "answer_ok": False if {"answer_contains", "answer_matches"} & set(case.data) else None,
                          "expected": _expected(case), "got": None, "route": [],
                          "reason": f"error: {type(exc).__name__}: {exc}", "seconds": round(time.perf_counter() - start, 3)}
            details.append(detail)
            if progress is not None:
                progress(done, len(jobs), case.id)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sites.close()
        if scratch is not None:
            scratch.cleanup()
            for detail in details:
                detail.pop("trace", None)  # removed with the scratch folder
    suites = list(dict.fromkeys(str(c.suite) for c in cases))
    return {
        "model": backend.name,
        "settings": {"temperature": settings.sampling.temperature, "max_tokens": settings.sampling.max_tokens,
                     "steps": settings.budget.steps, "tool_choice": settings.tools.tool_choice, "modes": modes},
        "suites": suites,
        "interrupted": interrupted,
        "cases_run": len(details), "cases_total": len(jobs),
        "scores": scores(details),
        "by_suite": {s: scores([d for d in details if d["suite"] == s]) for s in suites} if len(suites) > 1 else {},
        "traces": str(Path(folder) / "traces") if folder is not None else None,
        "cases": details,
    }


# -- scoring and reporting -------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th quantile (0..1) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 3)


def _rate(flags: Iterable[bool]) -> float | None:
    flags = list(flags)
    return round(sum(flags) / len(flags), 4) if flags else None


def group_name(detail: Mapping[str, Any]) -> str:
    return "routing" if detail["kind"] == "routing" else f"bfcl:{detail['mode']}"


def scores(details: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Scores per group ("routing", "bfcl:auto", "bfcl:required")."""
    out: dict[str, Any] = {}
    for group in dict.fromkeys(group_name(d) for d in details):
        ds = [d for d in details if group_name(d) == group]
        seconds = [d["seconds"] for d in ds]
        row: dict[str, Any] = {
            "cases": len(ds),
            "selection": _rate(d["selected"] for d in ds),
            "call_rate": _rate(bool(d.get("got")) for d in ds),
            "parse_rate": _rate(ok for d in ds for ok in d["parse"]),
            "passed": _rate(d["passed"] for d in ds),
            "errors": sum(1 for d in ds if str(d["reason"]).startswith("error: ")),
            "latency_s": {"p50": percentile(seconds, 0.5), "p95": percentile(seconds, 0.95), "total": round(sum(seconds), 3)},
        }
        if group == "routing":
            needed = [d for d in ds if d["expected"] is not None]
            checked = [d for d in ds if d.get("answer_ok") is not None]
            row["selection_tool"] = _rate(d["selected"] for d in needed)
            row["selection_no_tool"] = _rate(d["selected"] for d in ds if d["expected"] is None)
            row["answer"] = _rate(d["answer_ok"] for d in checked)
            row["answer_cases"] = len(checked)
            row["per_tool"] = {}
            for tool in dict.fromkeys(d["expected"] for d in ds):
                same = [d for d in ds if d["expected"] == tool]
                row["per_tool"][tool or "(none)"] = {"cases": len(same), "selection": _rate(d["selected"] for d in same)}
        else:
            row["ast"] = _rate(d["ast"] for d in ds)
        out[group] = row
    return out


HEADLINE = ("selection", "parse_rate", "ast", "answer")


def print_report(report: Mapping[str, Any], console: Any) -> None:
    """The scores as a short rich table, then the failed cases' ids and reasons (a few)."""
    from rich.table import Table

    table = Table(title=f"llmos eval — {report['model']}", title_justify="left")
    for column in ("group", "cases", "selection", "parse", "AST", "answer", "p50 s", "p95 s", "errors"):
        table.add_column(column, justify="left" if column == "group" else "right")
    pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for group, s in report["scores"].items():
        table.add_row(group, str(s["cases"]), pct(s["selection"]), pct(s["parse_rate"]), pct(s.get("ast")),
                      pct(s.get("answer")), str(s["latency_s"]["p50"]), str(s["latency_s"]["p95"]), str(s["errors"]))
    console.print(table)
    routing = report["scores"].get("routing")
    if routing:
        console.print("selection per expected tool: " + ", ".join(
            f"{tool} {pct(v['selection'])} of {v['cases']}" for tool, v in routing["per_tool"].items()))
    failed = [d for d in report["cases"] if not d["passed"]]
    for d in failed[:10]:
        console.print(f"  ✗ {d['id']} ({group_name(d)}): {d['reason']}", markup=False)
    if len(failed) > 10:
        console.print(f"  … and {len(failed) - 10} more failed cases (--json or --out for all)")


def plot_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """A PNG bar chart of the headline scores per group, and per-tool selection for routing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report["scores"]
    routing = groups.get("routing")
    fig, axes = plt.subplots(1, 2 if routing else 1, figsize=(12 if routing else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(HEADLINE)
    for i, metric in enumerate(HEADLINE):
        values = [100 * (s.get(metric) or 0) for s in groups.values()]
        bars = ax.bar([g + i * width for g in range(len(groups))], values, width, label=metric)
        ax.bar_label(bars, labels=[f"{v:.0f}" if groups[g].get(metric) is not None else "" for g, v in zip(groups, values)], fontsize=7)
    ax.set_xticks([g + width * (len(HEADLINE) - 1) / 2 for g in range(len(groups))], list(groups))
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title("scores per group")
    ax.legend(fontsize=8)
    if routing:
        ax = axes[0][1]
        tools = list(routing["per_tool"])
        values = [100 * (routing["per_tool"][t]["selection"] or 0) for t in tools]
        bars = ax.bar(tools, values, color="tab:green")
        ax.bar_label(bars, labels=[f"{v:.0f}% of {routing['per_tool'][t]['cases']}" for t, v in zip(tools, values)], fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_title("routing: selection per expected tool")
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(str(report["model"])[:100], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_eval(paths: Sequence[str | Path], settings: Config, resources: Any, *, modes: Iterable[str] = MODES,
             limit: int | None = None, folder: Path | None = None, show_progress: bool = False) -> dict[str, Any]:
    """Load every suite (all checked before anything runs), run them with a progress bar on
    stderr if asked, and return the report."""
    cases = [case for path in paths for case in load_suite(path, limit)]
    if not show_progress:
        return evaluate(cases, settings, resources, modes=modes, folder=folder)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("loading the model", total=None)

        def progress(done: int, total: int, case_id: str) -> None:
            bar.update(task, completed=done, total=total, description=f"eval {case_id[:40]}")

        return evaluate(cases, settings, resources, modes=modes, folder=folder, progress=progress)
