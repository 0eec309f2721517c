"""How the kernel decides a user turn: answer, or which tool (the router), and with which
arguments (grounding and a verifier: the "System 2" pass).

Small local models rarely open a tool call on their own (the bundled 135M model almost never
does) and, when forced to, often invent argument values. So the decision is made in front of
the model and checked behind it:

  route   the request is embedded (offline MiniLM) and compared with each tool's description and
          example requests, and with requests that need no tool. A tool's patterns (regular
          expressions) or its name in the request add to its score. The best tool wins when it
          beats "no tool" by a margin; the turn is then forced to call it (the grammar makes the
          call well-formed); otherwise the model must answer.
  read    a tool may read its arguments from a plain request itself (Tool.reads: the calculator
          reads "subtract 7,845 from 20,000" as 20000 - 7845); such a call needs no model turn.
  ground  values a request states (numbers, words) are what a call should carry. A call whose
          arguments do not validate, fail the tool's own check, or carry numbers the request
          never mentioned gets a second candidate, decoded under a schema whose values are
          limited to the request's numbers and word spans; the best candidate by (makes sense,
          grounded) is kept, and the trace says what it cost.

Nothing here imports the model or the embedder: they come in as functions.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

from llmos.grammar import render_call
from llmos.messages import Message, ToolCall
from llmos.toolbox import Tool

# Requests that need no tool: small talk, opinions, knowledge the model has, writing.
NO_TOOL = (
    "Hello!", "Hi, how are you today?", "Thanks a lot, that was helpful.", "Good morning!", "Who are you?",
    "Tell me a joke.", "What is your favourite colour?", "Can you help me with something?", "Goodbye, see you later.",
    "What is the capital of France?", "Who wrote Romeo and Juliet?", "Why is the sky blue?",
    "Explain photosynthesis in simple words.", "What does GGUF stand for?", "Summarize the plot of Hamlet.",
    "Write a short poem about the sea.", "Write a haiku about autumn leaves.", "Give me three tips for better sleep.",
    "Translate 'good night' into Spanish.", "What do you think about modern art?", "Recommend a good science fiction book.",
    "How do I make a cup of tea?", "What is the difference between a cat and a dog?", "Tell me about the history of Rome.",
    "Describe a sunset in one sentence.", "Is it better to rent or to buy a house?", "What is love?",
    "Write an email to my boss asking for a day off.", "Suggest a name for my new puppy.", "What is machine learning?",
    "How many legs does a spider have?", "Who painted the Mona Lisa?", "What year did World War II end?",
    "Can you explain what a black hole is?", "I'm feeling a bit sad today.", "What should I cook for dinner tonight?",
    "Tell me a fun fact about octopuses.", "What language is spoken in Brazil?",
    "How does a rainbow form?", "What is JavaScript used for?", "What is a spreadsheet good for?",
    "How does the internet work?", "What does CPU stand for?", "What is the difference between rain and snow?",
    "Explain what a compiler does.", "What is a histogram?", "Is Rust harder to learn than Go?",
    "Tell me the story of Cinderella.", "Why do people like graphs so much?",
)
PATTERN_BOOST = 0.25  # a tool's own pattern matched the request, or it reads the request
NAME_BOOST = 0.2  # the request names the tool
TOPIC_BOOST = 0.1  # a tool with no examples: the request has every significant word of its name ("weather")
MARGIN = 0.04  # how far the best tool must beat "no tool"
FLOOR = 0.3  # the least similarity a routed tool needs
MAX_SPAN_WORDS = 12
SHORT_SPAN_WORDS = 5  # a tool with no check of its own: its required strings are limited to short spans (names, units, places)
MAX_SPANS = 200
_STOP = {"get", "set", "find", "make", "run", "do", "the", "a", "an", "of", "to", "for", "and", "tool", "data", "info"}
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w])")


@dataclass(frozen=True)
class Decision:
    """What the router decided for one request, and why."""

    tool: str | None
    how: str  # "router": by similarity (with patterns and names); "no tools"
    scores: Mapping[str, float]
    ms: float

    def message(self) -> Message:
        said = f"route: {self.tool}" if self.tool else "route: answer without a tool"
        return Message("kernel", said, meta={"event": "route", "tool": self.tool, "how": self.how,
                                             "scores": dict(self.scores), "ms": self.ms})


def _named(name: str, request: str) -> float:
    """1 when the request names the tool as something to use ("use the calculator", "with python",
    "get weather"): the whole name of several words, or a one-word name after a verb of use. A
    word merely mentioned ("the plot of Hamlet", "what a web browser does") does not count."""
    text = request.lower()
    spaced = name.lower().replace("_", " ").replace("-", " ")
    if " " in spaced and re.search(rf"\b{re.escape(spaced)}\b", text):
        return 1.0
    words = [w for w in spaced.split() if len(w) > 3 and w not in _STOP]
    if len(words) > 1 and all(re.search(rf"\b{re.escape(w)}", text) for w in words):
        return 1.0  # every significant word of a multi-word name: "search the memory" names memory_search
    return 1.0 if re.search(rf"\b(?:use|using|with|via|through|call|run|in|ask|try|write)\s+(?:the\s+|a\s+|my\s+|your\s+)?{re.escape(spaced)}\b", text) else 0.0


def _topic(name: str, request: str) -> bool:
    """The request has every significant word of the name ("weather in Paris" for get_weather)."""
    words = [w for w in name.lower().replace("-", "_").split("_") if len(w) > 3 and w not in _STOP]
    return bool(words) and all(re.search(rf"\b{re.escape(w)}", request.lower()) for w in words)


def _reads(tool: Tool, request: str) -> bool:
    """The tool reads a whole call from the request (Tool.reads): as strong a sign as a pattern."""
    try:
        return tool.reads is not None and bool(tool.reads(request))
    except Exception:  # noqa: BLE001 - a failing reader is no evidence
        return False


def _texts(tool: Tool) -> list[str]:
    """What a tool is compared by: its description, its example requests and, for a tool with no
    examples, each clause of its description and each parameter's description on its own."""
    params = [str(p.get("description", "")) for p in (tool.parameters.get("properties") or {}).values() if isinstance(p, Mapping)]
    head = f"{tool.name.replace('_', ' ')}: {tool.description}"
    if tool.examples:
        return [head, *tool.examples]
    clauses = [c.strip() for c in re.split(r"[.;:()]|, (?:or|and) ", tool.description) if len(c.strip().split()) >= 2]
    return [head, tool.name.replace("_", " ").replace("-", " "), *clauses[:8], *[p for p in params if p][:8]]


class Router:
    """Chooses a tool (or none) for a request. embed: texts -> unit vectors (e.g. MiniLMEmbedder);
    vectors of tool texts are computed once and kept."""

    def __init__(self, embed: Callable[[Sequence[str]], Sequence[Any]], no_tool: Sequence[str] = NO_TOOL) -> None:
        self.embed = embed
        self.no_tool = tuple(no_tool)
        self._vectors: dict[tuple[str, ...], Any] = {}  # texts -> their stacked unit vectors

    def _matrix(self, texts: Sequence[str]) -> Any:
        """The texts' vectors as one matrix, embedded and stacked once per set of texts."""
        import numpy as np

        key = tuple(texts)
        if key not in self._vectors:
            self._vectors[key] = np.stack(self.embed(list(key)))
        return self._vectors[key]

    def scores(self, request: str, tools: Sequence[Tool]) -> dict[str, float]:
        """Each tool's score for the request, and "none"'s (the best match among requests that need no tool)."""
        query = self.embed([request[:2000]])[0]
        out = {"none": float((self._matrix(self.no_tool) @ query).max())}
        for t in tools:
            score = float((self._matrix(_texts(t)) @ query).max())
            if any(re.search(p, request, re.I) for p in t.patterns) or _reads(t, request):
                score += PATTERN_BOOST
            named = _named(t.name, request)
            if not named and not t.examples and _topic(t.name, request):
                score += TOPIC_BOOST
            out[t.name] = round(score + NAME_BOOST * named, 4)
        out["none"] = round(out["none"], 4)
        return out

    def decide(self, request: str, tools: Sequence[Tool]) -> Decision:
        t0 = time.perf_counter()
        if not tools:
            return Decision(None, "no tools", {}, 0.0)
        scores = self.scores(request, tools)
        best = max((t.name for t in tools), key=lambda n: scores[n])
        chosen = best if scores[best] >= FLOOR and scores[best] >= scores["none"] + MARGIN else None
        return Decision(chosen, "router", scores, round((time.perf_counter() - t0) * 1000, 2))


# ---- arguments: grounded in the request, checked ------------------------------------------------

def numbers_in(text: str) -> list[float]:
    return [float(n.replace(",", "")) for n in _NUMBER.findall(text)]


def spans(request: str) -> list[str]:
    """Word spans of the request (up to MAX_SPAN_WORDS words, outer punctuation trimmed), longest first."""
    words = request.split()
    out: dict[str, None] = {}
    for n in range(min(MAX_SPAN_WORDS, len(words)), 0, -1):
        for i in range(len(words) - n + 1):
            span = " ".join(words[i:i + n]).strip(" \t,;:!?\"'`").rstrip(".")
            if span:
                out[span] = None
            if len(out) >= MAX_SPANS:
                return list(out)
    return list(out)


def leaves(value: Any) -> Iterable[Any]:
    """The scalar values inside nested mappings and lists."""
    if isinstance(value, Mapping):
        for v in value.values():
            yield from leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from leaves(v)
    else:
        yield value


_PERCENT = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(?:%|percent\b|per cent\b)", re.I)
_AS_FRACTION = re.compile(r"\bdecimal\b|\bfraction\b|\b0\.\d+\b|between 0 and 1|\bratio\b|\brate\b", re.I)  # rates are fractions by convention


_SCALED = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*(thousand|million|billion|trillion)\b", re.I)
_SCALE = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}


def percents(request: str) -> list[float]:
    """The request's percentages as fractions ("5%" -> 0.05)."""
    return [round(float(n) / 100, 12) for n in _PERCENT.findall(request)]


def scaled(request: str) -> dict[float, float]:
    """Numbers the request says with a scale word, by what is written: "213 million" -> {213: 213000000}."""
    return {float(n): round(float(n) * _SCALE[w.lower()], 6) for n, w in _SCALED.findall(request)}


_CHOICES = re.compile(r"(?:(?i:\bcan be\b|\bone of\b|\boptions?:|\beither\b)|\b(e\.g\.|i\.e\.|such as\b|like\b))\s*[:,]?\s*(.+?)(?:\.(?:\s+[A-Z]|\s*$)|$)")


def choices(schema: Mapping[str, Any]) -> tuple[list[str], bool]:
    """The values a string parameter names, and whether they are all it takes: its enum or a
    list its description gives ("Can be 'melting', 'freezing'": all; "e.g. king size, suite":
    examples)."""
    if isinstance(schema.get("enum"), list):
        return [str(v) for v in schema["enum"] if isinstance(v, str)], True
    described = str(schema.get("description", ""))
    found = _CHOICES.search(described)
    if not found:  # values quoted in the description: "'real' for real roots, 'all' for both"
        quoted = list(dict.fromkeys(re.findall(r"'([^'\s][^']{0,30})'|\"([^\"\s][^\"]{0,30})\"", described)))
        values = list(dict.fromkeys(a or b for a, b in quoted))
        return (values, True) if len(values) >= 2 else ([], False)
    parts = re.split(r",\s*|\s+or\s+|\s+and\s+", found.group(2))
    out = [p.strip(" '\"`").removesuffix(" etc").strip(" '\"`") for p in parts]
    return [p for p in out if p and p.lower() != "etc" and len(p.split()) <= 3], found.group(1) is None


def _said(word: str, request: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word.lower())}(?!\w)", request.lower()) is not None


def as_stated(tool: Tool, call: ToolCall, request: str) -> ToolCall | None:
    """The call with what the request states written as the parameters ask, without a model: a
    number said with a scale word written out ("213 million" -> 213000000); a percentage
    ("5%") as the fraction a rate asks for; a string parameter with named choices (see `choices`)
    set to the one choice the request names, and an optional one the model left out added (a
    list: every choice named, in order); an optional true/false the request never mentions left
    to its default. None if nothing changes."""
    out = as_fractions(tool, call, request) or call
    props, required = tool.parameters.get("properties") or {}, set(tool.parameters.get("required") or ())
    arguments, changed = dict(out.arguments), out is not call
    for name, value in list(arguments.items()):
        schema = props.get(name)
        if not isinstance(schema, Mapping):
            continue
        if schema.get("type") == "string" and isinstance(value, str):
            options, closed = choices(schema)
            named = [c for c in options if _said(c, request)]
            other = value.lower() not in {c.lower() for c in options}
            # a closed list: the one choice named wins over a value that is no choice or is not said;
            # examples: only over a value it contains ("King" for "king size")
            if len(named) == 1 and named[0] != value and (
                    (closed and (other or not _said(value, request))) or (not closed and other and value.lower() in named[0].lower())):
                arguments[name], changed = named[0], True
        elif schema.get("type") == "boolean" and isinstance(value, bool) and name not in required:  # noqa: SIM114
            words = [w for w in re.split(r"[_\W]+", name.lower()) if len(w) >= 4]
            if not any(re.search(rf"\b{re.escape(w[:4])}", request.lower()) for w in words):
                del arguments[name]  # a flag the request never asks about keeps its default
                changed = True
    for name, schema in props.items():  # an optional choice the model left out but the request names
        if name in arguments or name in required or not isinstance(schema, Mapping):
            continue
        if schema.get("type") == "string":
            named = [c for c in choices(schema)[0] if _said(c, request)]
            if len(named) == 1:
                arguments[name], changed = named[0], True
        elif schema.get("type") == "array" and isinstance(schema.get("items"), Mapping) and schema["items"].get("type") == "string":
            options = choices(schema["items"])[0] or choices(schema)[0]
            named = sorted((c for c in options if _said(c, request)), key=lambda c: request.lower().index(c.lower()))
            if named:
                arguments[name], changed = named, True
    return ToolCall(call.name, arguments, call.id) if changed else None


def as_fractions(tool: Tool, call: ToolCall, request: str) -> ToolCall | None:
    """The call with a number said with a scale word written out ("213 million" -> 213000000), and
    a percentage the request states ("5%") written as the fraction its parameter
    asks for (a rate, or a description that says decimal, fraction or gives 0.x, and never percent):
    5 -> 0.05. None if nothing changes."""
    stated = {round(p * 100, 10): p for p in percents(request)}
    big = scaled(request)
    props, arguments, changed = tool.parameters.get("properties") or {}, dict(call.arguments), False
    for name, value in call.arguments.items():
        schema = props.get(name)
        if (isinstance(schema, Mapping) and schema.get("type") in ("number", "integer", "float") and isinstance(value, (int, float))
                and not isinstance(value, bool) and float(value) in big):  # "213 million" is 213000000, not 213
            full = big[float(value)]
            arguments[name], changed = int(full) if full == int(full) else full, True
            continue
        said = f"{name.replace('_', ' ')} {schema.get('description', '')}" if isinstance(schema, Mapping) else ""
        if (isinstance(schema, Mapping) and schema.get("type") in ("number", "float") and isinstance(value, (int, float))
                and not isinstance(value, bool) and round(float(value), 10) in stated and _AS_FRACTION.search(said)
                and not re.search(r"percent", said, re.I)):
            arguments[name], changed = stated[round(float(value), 10)], True
    return ToolCall(call.name, arguments, call.id) if changed else None


def grounded(arguments: Mapping[str, Any], request: str) -> float:
    """Share of the call's checkable claims that the request states: number values (a percentage
    also as its fraction), numbers inside short strings, and short strings themselves. 1.0 when
    there is nothing to check."""
    stated = numbers_in(request) + percents(request) + list(scaled(request).values())
    text = request.lower()
    claims = found = 0
    for value in leaves(arguments):
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            claims += 1
            found += any(abs(float(value) - n) < 1e-9 for n in stated)
        elif isinstance(value, str) and len(value) <= 80:
            inner = numbers_in(value)
            if inner:
                claims += len(inner)
                found += sum(any(abs(v - n) < 1e-9 for n in stated) for v in inner)
            elif 0 < len(value) <= 40 and not text.count(value.lower()):
                claims += 1  # a short word value the request never says
    return 1.0 if not claims else found / claims


def coverage(arguments: Mapping[str, Any], request: str) -> float:
    """Share of the request's distinct numbers that the call carries (1.0 when it states none)."""
    stated = set(numbers_in(request))
    if not stated:
        return 1.0
    carried = set()
    for value in leaves(arguments):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            carried.add(float(value))
        elif isinstance(value, str):
            carried.update(numbers_in(value))
    return len(stated & carried) / len(stated)


def judge(tool: Tool, call: ToolCall, request: str) -> tuple[bool, float, str]:
    """(makes sense, grounded, why not): the arguments validate and pass the tool's own check."""
    try:
        arguments = tool.validate(call.arguments)
        if tool.check is not None and tool.check(arguments) is False:
            return False, grounded(call.arguments, request), "the tool's check failed"
    except Exception as exc:  # noqa: BLE001 - any failure of validation or of the check means "does not make sense"
        return False, grounded(call.arguments, request), f"{type(exc).__name__}: {str(exc)[:120]}"
    return True, grounded(call.arguments, request), ""


def _limited(schema: Any, numbers: list[float], words: list[str]) -> Any:
    """A property schema whose numbers (also as array items) must be request numbers and whose
    plain strings must be request spans (when `words` is given); None when nothing changes."""
    if not isinstance(schema, Mapping) or "enum" in schema or "const" in schema:
        return None
    kind = schema.get("type")
    if kind in ("number", "integer") and numbers:
        values = [int(n) if n == int(n) else n for n in numbers if kind == "number" or n == int(n)]
        return {k: v for k, v in schema.items() if k not in ("minimum", "maximum")} | {"enum": values} if values else None
    if kind == "string" and words and "format" not in schema:
        return {k: v for k, v in schema.items() if k not in ("pattern", "maxLength", "minLength")} | {"enum": words}
    if kind == "array":
        items = _limited(schema.get("items"), numbers, [])
        return {**schema, "items": items} if items is not None else None
    return None


def grounded_tool(tool: Tool, request: str) -> Tool | None:
    """The tool with a grammar (its `constraint`) under which its required number values are the
    request's numbers and its required plain strings are spans of the request (short ones for a
    tool with no check of its own); None when the request states nothing to limit them to."""
    numbers = sorted(set(numbers_in(request)))
    words = spans(request) if tool.check is not None else [w for w in spans(request) if len(w.split()) <= SHORT_SPAN_WORDS]
    props = dict(tool.parameters.get("properties") or {})
    changed = False
    for name in tool.parameters.get("required") or []:
        limited = _limited(props.get(name), numbers, words)
        if limited is not None:
            props[name], changed = limited, True
    return replace(tool, constraint={**tool.parameters, "properties": props}) if changed else None


def copied_call(tool: Tool, call: ToolCall, request: str) -> ToolCall | None:
    """The call with what it failed to copy taken from the request itself (no model needed):
    lists of numbers become the request's numbers in order, a checked tool's required string
    becomes the longest request span that makes sense, and optional values the request never
    states are left to their defaults. None when there is nothing to copy."""
    props, required = tool.parameters.get("properties") or {}, tool.parameters.get("required") or []
    arguments, changed = dict(call.arguments), False
    sound = judge(tool, call, request)[0]
    for name, schema in props.items():
        if not isinstance(schema, Mapping):
            continue
        value_ok = name in arguments and grounded({name: arguments[name]}, request) == 1.0
        items = schema.get("items") if isinstance(schema.get("items"), Mapping) else {}
        if not value_ok and schema.get("type") == "array" and items.get("type") in ("number", "integer") and numbers_in(request):
            arguments[name] = [int(n) if n == int(n) else n for n in numbers_in(request)]
            changed = True
        elif (not value_ok or not sound) and schema.get("type") == "string" and tool.check is not None and name in required:
            for span in spans(request):
                trial = ToolCall(tool.name, {**arguments, name: span})
                if judge(tool, trial, request)[:2] == (True, 1.0):
                    canonical = tool.check(dict(trial.arguments))  # a check may return the arguments as the tool writes them
                    arguments, changed = dict(canonical if isinstance(canonical, Mapping) else trial.arguments), True
                    break
        elif not value_ok and name in arguments and name not in required:
            del arguments[name]  # an optional value the request never states: leave it to its default
            changed = True
    return ToolCall(tool.name, arguments) if changed else None


def read_call(tool: Tool | None, request: str) -> tuple[Message, Message] | None:
    """The call a tool reads straight from the request (Tool.reads), when its arguments validate and
    pass the tool's check: (the call as the assistant's message, the kernel's notice); else None.
    No model turn is spent on it."""
    if tool is None or tool.reads is None:
        return None
    t0 = time.perf_counter()
    try:
        arguments = tool.reads(request)
    except Exception:  # noqa: BLE001 - a reader that fails leaves the call to the model
        arguments = None
    if not arguments:
        return None
    call = ToolCall(tool.name, dict(arguments))
    if not judge(tool, call, request)[0]:
        return None
    canonical = tool.check(dict(arguments)) if tool.check is not None else None
    call = ToolCall(tool.name, dict(canonical) if isinstance(canonical, Mapping) else dict(arguments))
    reply = Message("assistant", "", tool_calls=(call,), meta={"raw": render_call(call), "read": True})
    shown = ", ".join(f"{k}={v!r}" for k, v in call.arguments.items())
    notice = Message("kernel", f"read the call from the request: {tool.name}({shown})", meta={
        "event": "read", "tool": tool.name, "arguments": dict(call.arguments), "ms": round((time.perf_counter() - t0) * 1000, 2)})
    return reply, notice


def says(tool: Tool | None, call: ToolCall, result: Message) -> str:
    """How an answer starts when a tool declares it (e.g. "17*23 = 391"): only for a short, clean result."""
    if tool is None or tool.says is None or result.meta.get("error") or len(result.content) > 300:
        return ""
    try:
        if callable(tool.says):
            return tool.says(dict(call.arguments), result.content) or ""
        return tool.says.format(**dict(call.arguments), result=" ".join(result.content.split()))
    except (KeyError, IndexError, ValueError, TypeError):
        return ""


def second_pass(reply: Message, tools: Sequence[Tool], request: str,
                redo: Callable[[list[Tool], str], Message], one: bool = False) -> tuple[Message, Message | None]:
    """Keep a call that makes sense and is grounded. Otherwise try, in order of cost: the call with
    what it failed to copy taken from the request (copied_call), then a turn decoded again under a
    grounded grammar (redo: the turn with these tools, forced to this one) and its copy; the best
    by (makes sense, grounded + coverage) is kept. one: the kernel decided on one call, so further
    calls in the turn are dropped. Returns (reply, the notice or None)."""
    if one and len(reply.tool_calls) > 1:
        reply = Message("assistant", "", tool_calls=reply.tool_calls[:1], meta={**reply.meta, "raw": render_call(reply.tool_calls[0])})
    if len(reply.tool_calls) != 1:
        return reply, None
    tool = next((t for t in tools if t.name == reply.tool_calls[0].name), None)
    stated = as_stated(tool, reply.tool_calls[0], request) if tool is not None else None
    if stated is not None:  # values as the request states them ("5%" for a rate: 0.05): a rewrite, not a decode
        reply = Message("assistant", "", tool_calls=(stated,), meta={**reply.meta, "raw": render_call(stated), "rewritten": True})
    if tool is None or judge(tool, reply.tool_calls[0], request)[:2] == (True, 1.0):
        return reply, None
    t0 = time.perf_counter()
    candidates: list[tuple[str, Message]] = [("model", reply)]

    def add_copy(of: Message) -> None:
        copy = copied_call(tool, of.tool_calls[0], request)
        if copy is not None and all(copy.arguments != m.tool_calls[0].arguments for _, m in candidates):
            candidates.append(("copied", Message("assistant", "", tool_calls=(copy,))))

    add_copy(reply)
    variant = grounded_tool(tool, request)
    if variant is not None and judge(tool, candidates[-1][1].tool_calls[0], request)[:2] != (True, 1.0):
        again = redo([variant if t.name == tool.name else t for t in tools], tool.name)
        if again.tool_calls:
            candidates.append(("grounded", Message("assistant", "", tool_calls=again.tool_calls[:1], meta=dict(again.meta))))
            add_copy(candidates[-1][1])
    verdicts = [judge(tool, m.tool_calls[0], request) for _, m in candidates]
    rank = lambda i: (verdicts[i][0], verdicts[i][1] + coverage(candidates[i][1].tool_calls[0].arguments, request), -i)  # noqa: E731
    chosen = max(range(len(candidates)), key=rank)
    kind, best = candidates[chosen]
    spent = sum((m.meta.get("stats") or {}).get("generated_tokens", 0) for _, m in candidates[1:])
    notice = Message("kernel", f"second pass: kept the {kind} call of {len(candidates)} candidates", meta={
        "event": "system2", "chosen": kind, "extra_s": round(time.perf_counter() - t0, 3), "extra_tokens": spent,
        "candidates": [{"kind": k, "makes_sense": v[0], "grounded": round(v[1], 3), "why": v[2],
                        "arguments": dict(m.tool_calls[0].arguments)} for (k, m), v in zip(candidates, verdicts)]})
    if best is not reply:  # the chosen call keeps the token use of the turn that produced the first one
        best = Message("assistant", "", tool_calls=best.tool_calls, meta={**best.meta, "stats": reply.meta.get("stats") or {}})
    return best, notice
