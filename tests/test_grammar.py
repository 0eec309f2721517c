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
