"""Every grammar the kernel builds is accepted by the real llama.cpp; bad ones raise, never crash."""

from typing import Literal, Optional

import pydantic
import pytest

from llmos import tool
from llmos.grammar import GrammarError, parse_calls, render_call, tool_call_grammar
from llmos.llama import compile_grammar
from llmos.messages import ToolCall


class Address(pydantic.BaseModel):
    street: str
    city: str
    zip: Optional[str] = None


@tool
def book(name: str, when: Literal["today", "tomorrow"], guests: int = 2, address: Optional[Address] = None, tags: list[str] = []) -> str:
    """Book a table."""
    return "ok"


SCHEMAS = {
    "empty": {"type": "object", "properties": {}},
    "nested": book.parameters,
    "huge_bounds": {"type": "object", "properties": {
        "text": {"type": "string", "maxLength": 100000, "minLength": 1},
        "items": {"type": "array", "items": {"type": "string"}, "maxItems": 5000},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{4}$"},
    }, "required": ["text"]},
    "enum_and_numbers": {"type": "object", "properties": {
        "unit": {"enum": ["c", "f"]}, "value": {"type": "number"}, "flag": {"type": "boolean"},
        "any": {}, "free": {"type": "object"},
    }},
    "odd_names": {"type": "object", "properties": {"with space": {"type": "string"}, "ünï": {"type": "integer"}}},
}


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_llama_cpp_accepts_every_kernel_grammar(llama_backend, mode):
    tools = [(f"tool_{k}", v) for k, v in SCHEMAS.items()] + [("name-with-dash", {"type": "object"})]
    compile_grammar(llama_backend, tool_call_grammar(tools, mode))
    for name, schema in tools:
        compile_grammar(llama_backend, tool_call_grammar([(name, schema)], mode))


def test_large_bounds_are_not_expanded():
    grammar = tool_call_grammar([("t", SCHEMAS["huge_bounds"])])
    assert len(grammar) < 5000


def test_broken_grammar_raises_instead_of_crashing(llama_backend):
    with pytest.raises(GrammarError):
        compile_grammar(llama_backend, 'root ::= ( "a" | ')
    with pytest.raises(GrammarError):
        compile_grammar(llama_backend, "root ::= missing-rule")


def test_unconvertible_schema_is_a_clear_error():
    with pytest.raises(GrammarError, match="tool 'weird'"):
        tool_call_grammar([("weird", {"type": "object", "properties": {"x": {"type": "no-such-type"}}})])


def test_render_and_parse_round_trip():
    call = ToolCall("calc", {"expression": "1+1", "nested": {"a": [1, 2]}})
    text = render_call(call) + "\n" + render_call(ToolCall("other", {}))
    parsed = parse_calls(text)
    assert [(c.name, dict(c.arguments)) for c in parsed] == [("calc", {"expression": "1+1", "nested": {"a": [1, 2]}}), ("other", {})]


def test_forced_text_is_what_the_grammar_allows_one_way():
    from llmos.grammar import CALL_HEAD, NAME_END, forced_text

    names = ["calculator", "memory_search", "memory_insert"]
    assert forced_text("", names, calls_only=True) == CALL_HEAD
    assert forced_text("", names, calls_only=False) == ""  # an answer is allowed too
    assert forced_text("<tool", names, calls_only=False) == CALL_HEAD[len("<tool"):]
    assert forced_text(CALL_HEAD, names, calls_only=False) == ""  # three names fit
    assert forced_text(CALL_HEAD + "memory", names, calls_only=False) == ""
    assert forced_text(CALL_HEAD + "memory_s", names, calls_only=False) == "earch" + NAME_END
    assert forced_text(CALL_HEAD, ["calculator"], calls_only=True) == "calculator" + NAME_END
    assert forced_text(CALL_HEAD + 'calculator", "arguments": {', names, calls_only=False) == ""
    assert forced_text("The answer", names, calls_only=False) == ""
    assert forced_text("Write " + CALL_HEAD + "memory_s", names, calls_only=False) == ""  # inside an answer: free text


# -- schemas as real tools write them ---------------------------------------------------------------

class Item(pydantic.BaseModel):
    name: str
    qty: int = 1


class Node(pydantic.BaseModel):
    label: str
    children: list["Node"] = []


@tool
def order(items: list[Item], note: Optional[str] = None, priority: Optional[int] = None) -> str:
    """Place an order."""
    return "ok"


@tool
def tree(root: Node) -> str:
    """Store a tree."""
    return "ok"


POINT = {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}, "required": ["x", "y"]}
# name: (parameters schema, arguments its grammar must accept, arguments it must reject)
CONSTRUCTS = {
    "untyped": ({"type": "object", "properties": {"value": {"description": "any JSON value"}}, "required": ["value"]},
                ['{"value": 3}', '{"value": "x"}', '{"value": [1, {"a": null}]}', '{"value": {"k": true}}'], []),
    "empty_schema": ({"type": "object", "properties": {"value": {}}, "required": ["value"]}, ['{"value": "x"}', '{"value": 1.5}'], []),
    "true_schema": ({"type": "object", "properties": {"value": True}, "required": ["value"]}, ['{"value": null}'], []),
    "any_of": ({"type": "object", "properties": {"id": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}, "required": ["id"]},
               ['{"id": 7}', '{"id": "A-7"}'], ['{"id": true}']),
    "one_of_objects": ({"type": "object", "required": ["shape"], "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"radius": {"type": "number"}}, "required": ["radius"], "additionalProperties": False},
        {"type": "object", "properties": {"side": {"type": "number"}}, "required": ["side"], "additionalProperties": False}]}}},
        ['{"shape": {"radius": 2}}', '{"shape": {"side": 1.5}}'], ['{"shape": {}}']),
    "any_of_with_siblings": ({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
                              "anyOf": [{"required": ["a"]}, {"required": ["b"]}]}, ['{"a": "x"}', '{"b": 2}'], ['{}']),
    "nested_objects": ({"type": "object", "required": ["user"], "properties": {"user": {"type": "object", "required": ["name", "address"], "properties": {
        "name": {"type": "string"}, "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}}},
        ['{"user": {"name": "Ann", "address": {"city": "Oslo"}}}'], ['{"user": {"name": "Ann"}}']),
    "array_of_objects": ({"type": "object", "required": ["rows"], "properties": {"rows": {"type": "array", "minItems": 1, "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "qty": {"type": "integer"}}, "required": ["name", "qty"]}}}},
        ['{"rows": [{"name": "a", "qty": 1}, {"name": "b", "qty": 2}]}'], ['{"rows": []}', '{"rows": [{"name": "a"}]}']),
    "enum_strings": ({"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["unit"]},
                     ['{"unit": "celsius"}'], ['{"unit": "kelvin"}']),
    "enum_numbers": ({"type": "object", "properties": {"level": {"type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
                     ['{"level": 2}'], ['{"level": 4}']),
    "enum_mixed": ({"type": "object", "properties": {"v": {"enum": ["auto", 0, 1.5, None, True]}}, "required": ["v"]},
                   ['{"v": "auto"}', '{"v": 1.5}', '{"v": null}', '{"v": true}'], ['{"v": false}']),
    "default": ({"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string", "default": "celsius"},
                                                  "days": {"type": "integer", "default": 3}}, "required": ["city"]},
                ['{"city": "Rome"}', '{"city": "Rome", "days": 2}'], []),
    "additional_true": ({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": True},
                        ['{"name": "a"}', '{"name": "a", "extra": 1}', '{"name": "a", "more": "b"}'], []),
    "additional_false": ({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": False},
                         ['{"name": "a"}'], ['{"name": "a", "extra": 1}']),
    "additional_schema": ({"type": "object", "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}}}, "required": ["labels"]},
                          ['{"labels": {}}', '{"labels": {"env": "prod", "team": "a"}}'], ['{"labels": {"env": 1}}']),
    "refs_pydantic": (order.parameters, ['{"items": [{"name": "tea", "qty": 2}], "note": null}'], ['{"items": [{"qty": 2}]}']),
    "refs_recursive": (tree.parameters, ['{"root": {"label": "a", "children": [{"label": "b", "children": []}]}}'], []),
    "refs_definitions": ({"type": "object", "definitions": {"Point": POINT}, "properties": {"p": {"$ref": "#/definitions/Point"}}, "required": ["p"]},
                         ['{"p": {"x": 1, "y": 2}}'], ['{"p": {"x": 1}}']),
    "all_of_ref": ({"type": "object", "$defs": {"Point": POINT}, "required": ["p"],
                    "properties": {"p": {"allOf": [{"$ref": "#/$defs/Point"}], "description": "where"}}}, ['{"p": {"x": 1, "y": 2}}'], []),
    "type_list": ({"type": "object", "properties": {"v": {"type": ["string", "integer"]}}, "required": ["v"]}, ['{"v": "a"}', '{"v": 3}'], ['{"v": 1.5}']),
    "type_list_with_items": ({"type": "object", "properties": {"ids": {"type": ["array", "null"], "items": {"type": "integer"}}}, "required": ["ids"]},
                             ['{"ids": [1, 2]}', '{"ids": null}'], ['{"ids": ["a"]}']),
    "const": ({"type": "object", "properties": {"version": {"const": "v1"}, "q": {"type": "string"}}, "required": ["version", "q"]},
              ['{"version": "v1", "q": "a"}'], ['{"version": "v2", "q": "a"}']),
    "nullable": ({"type": "object", "properties": {"name": {"type": "string", "nullable": True}}, "required": ["name"]},
                 ['{"name": "a"}', '{"name": null}'], []),
    "null_union": ({"type": "object", "properties": {"limit": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}}, "required": ["limit"]},
                   ['{"limit": 5}', '{"limit": null}'], []),
    "keyword_named_properties": ({"type": "object", "properties": {"format": {"type": "string", "enum": ["png", "svg"]}, "pattern": {"type": "string"},
                                                                   "maxLength": {"type": "integer"}}, "required": ["format", "pattern", "maxLength"]},
                                 ['{"format": "png", "pattern": "a*", "maxLength": 3}'], []),
    "required_undeclared": ({"type": "object", "properties": {}, "required": ["query"]}, ['{"query": "x"}'], ['{}']),
    "no_root_type": ({"properties": {"q": {"type": "string"}}, "required": ["q"]}, ['{"q": "x"}'], []),
    "tuple": ({"type": "object", "properties": {"at": {"type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}]}}, "required": ["at"]},
              ['{"at": [1, 2.5]}'], []),
}


def _tool_for(name: str):
    from llmos.toolbox import from_openai

    by_model = {"refs_pydantic": order, "refs_recursive": tree}
    if name in by_model:
        return by_model[name]
    return from_openai({"type": "function", "function": {"name": name, "description": f"Example tool ({name}).",
                                                          "parameters": CONSTRUCTS[name][0]}})


def _validate(tool, arguments):
    """The call against the tool's own schema (with jsonschema when installed) and its pydantic model."""
    try:
        import jsonschema
    except ImportError:  # pragma: no cover
        jsonschema = None
    if jsonschema is not None:
        jsonschema.validate(arguments, _nullable_as_type_list(dict(tool.parameters)))
    if tool.model is not None:
        tool.validate(arguments)
    if jsonschema is None and tool.model is None:
        assert set(tool.parameters.get("required", ())) <= set(arguments)


def _nullable_as_type_list(s):
    """OpenAPI's `nullable: true` as JSON Schema spells it (jsonschema ignores `nullable`)."""
    if isinstance(s, list):
        return [_nullable_as_type_list(v) for v in s]
    if not isinstance(s, dict):
        return s
    out = {k: _nullable_as_type_list(v) for k, v in s.items() if k != "nullable"}
    if s.get("nullable") is True and isinstance(s.get("type"), str):
        out["type"] = [s["type"], "null"]
    return out


def _accepts(backend, grammar: str, text: str, end: bool = True) -> bool:
    """Whether llama.cpp's grammar takes `text` token by token (and then lets the turn end)."""
    from llmos.llama import _Grammar

    g = _Grammar(backend.lc, backend.vocab, grammar, backend.n_vocab)
    try:
        for token in backend.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False):
            if not g.allows(token):
                return False
            g.accept(token)
        return g.allows(backend.llm.token_eos()) if end else True
    finally:
        g.close()


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_schema_construct_grammar_takes_valid_arguments_only(llama_backend, name):
    from llmos.grammar import CALL_CLOSE, CALL_OPEN

    schema, good, bad = CONSTRUCTS[name]
    grammar = tool_call_grammar([(name, schema)], "required")
    compile_grammar(llama_backend, grammar)
    call = lambda args: CALL_OPEN + '{"name": "' + name + '", "arguments": ' + args + "}" + CALL_CLOSE  # noqa: E731
    for args in good:
        assert _accepts(llama_backend, grammar, call(args)), args
    for args in bad:
        assert not _accepts(llama_backend, grammar, call(args)), args


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_forced_call_on_schema_construct_validates(llama_backend, name):
    from llmos.config import Sampling
    from llmos.messages import Message

    tools = [_tool_for(n) for n in sorted(CONSTRUCTS)]  # one prompt for all: its prefix stays in the KV cache
    tool_ = _tool_for(name)
    out = list(llama_backend.turn([Message("user", f"Call {tool_.name}.")], tools, tool_choice=tool_.name,
                                  sampling=Sampling(max_tokens=64)))
    reply = out[-1]
    assert reply.tool_calls and reply.tool_calls[0].name == tool_.name, reply.meta["raw"]
    _validate(tool_, dict(reply.tool_calls[0].arguments))
    assert reply.meta["raw"].endswith("</tool_call>")  # the turn ended at the close


def test_all_constructs_share_one_grammar(llama_backend):
    tools = [(name, schema) for name, (schema, _, _) in CONSTRUCTS.items()]
    for mode in ("auto", "required"):
        grammar = tool_call_grammar(tools, mode)
        compile_grammar(llama_backend, grammar)
    from llmos.grammar import CALL_CLOSE, CALL_OPEN

    for name, (_, good, bad) in CONSTRUCTS.items():  # each tool keeps its own rules, refs included
        assert _accepts(llama_backend, grammar, CALL_OPEN + '{"name": "' + name + '", "arguments": ' + good[0] + "}" + CALL_CLOSE), name


def test_same_def_name_in_two_tools_keeps_both_shapes(llama_backend):
    from llmos.grammar import CALL_CLOSE, CALL_OPEN

    a = {"type": "object", "$defs": {"Item": POINT}, "properties": {"it": {"$ref": "#/$defs/Item"}}, "required": ["it"]}
    b = {"type": "object", "$defs": {"Item": {"type": "object", "properties": {"sku": {"type": "string"}}, "required": ["sku"]}},
         "properties": {"it": {"$ref": "#/$defs/Item"}}, "required": ["it"]}
    grammar = tool_call_grammar([("a", a), ("b", b)], "required")
    call = lambda n, args: CALL_OPEN + '{"name": "' + n + '", "arguments": ' + args + "}" + CALL_CLOSE  # noqa: E731
    assert _accepts(llama_backend, grammar, call("a", '{"it": {"x": 1, "y": 2}}'))
    assert _accepts(llama_backend, grammar, call("b", '{"it": {"sku": "k"}}'))
    assert not _accepts(llama_backend, grammar, call("b", '{"it": {"x": 1, "y": 2}}'))


def test_unsupported_refs_are_clear_errors():
    with pytest.raises(GrammarError, match="tool 'r'.*https://"):
        tool_call_grammar([("r", {"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}})])
    with pytest.raises(GrammarError, match="points at nothing"):
        tool_call_grammar([("r", {"type": "object", "properties": {"x": {"$ref": "#/$defs/Missing"}}})])


def test_a_closed_call_ends_the_turn(llama_backend):
    """After `</tool_call>` only the end of the turn or another call: no newline, no free text."""
    call = render_call(ToolCall("t", {"q": "x"}))
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    for mode in ("auto", "required"):
        grammar = tool_call_grammar([("t", schema)], mode)
        assert _accepts(llama_backend, grammar, call) and _accepts(llama_backend, grammar, call + call)
        for after in ("\n", " ", "Done.", "\nThe answer is 4."):
            assert not _accepts(llama_backend, grammar, call + after, end=False), repr(after)
    assert not _accepts(llama_backend, tool_call_grammar([("t", schema)], "required"), call * 5)  # MAX_CALLS_PER_TURN


def test_forced_text_opens_a_further_call():
    from llmos.grammar import CALL_HEAD, forced_text

    first = render_call(ToolCall("calculator", {"expression": "1+1"}))
    assert forced_text(first, ["calculator"], calls_only=True) == ""  # the model decides: end, or one more
    assert forced_text(first + "<", ["calculator"], calls_only=True) == CALL_HEAD[1:]
    assert forced_text(first + CALL_HEAD, ["calculator", "plot"], calls_only=True) == ""
    assert forced_text(first + CALL_HEAD + "c", ["calculator", "plot"], calls_only=True) == "alculator" + '", "arguments": '
