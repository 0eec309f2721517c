"""The kernel decides: routing per user turn (real offline embedder), calls checked and repaired
against the request, answers that state the result, with the scripted backend and the real model."""

import json
from pathlib import Path

import pytest

from llmos import Kernel, build, tool
from llmos.decide import Router, copied_call, coverage, grounded, grounded_tool, judge, second_pass, spans
from llmos.messages import Message, ToolCall
from llmos.testing import ScriptedBackend, call
from llmos.tools import ToolContext, load_builtin


@pytest.fixture(scope="module")
def router():
    from llmos.memory.embed import MiniLMEmbedder

    return Router(MiniLMEmbedder())


@pytest.fixture(scope="module")
def builtins(tmp_path_factory):
    ctx = ToolContext.under(tmp_path_factory.mktemp("tools"))
    tools = [load_builtin(n, ctx) for n in ("calculator", "plot", "python", "browser")]
    yield tools
    for t in tools:
        if t.close:
            t.close()


@tool(examples=["What's the weather like in Paris?", "Will it rain in Oslo tomorrow?"])
def get_weather(city: str) -> str:
    """Current weather for a city."""
    return f"sunny in {city}"


@tool
def convert_currency(amount: float, source: str, target: str) -> str:
    """Convert an amount of money from one currency to another (e.g. USD to EUR)."""
    return f"{amount * 0.9:.2f} {target}"


TRANSLATE = {"type": "function", "function": {"name": "translate_text", "description": "Translate text into another language.",
                                              "parameters": {"type": "object", "properties": {"text": {"type": "string"},
                                                                                              "language": {"type": "string"}},
                                                             "required": ["text", "language"]}}}

NEEDS = [
    ("calculator", "How much is 4096 divided by 16?"),
    ("calculator", "what's 7 to the power of 5"),
    ("calculator", "Integrate cos(x) * x from 0 to pi."),
    ("plot", "Draw me a line chart of 5, 10, 7, 12."),
    ("plot", "Could you make a histogram of these ages: 21, 25, 25, 30, 41?"),
    ("python", "Run this: print('ab' * 3)"),
    ("python", "Execute the following code and show the output: import math; print(math.gcd(48, 18))"),
    ("browser", "Go to http://127.0.0.1:9000/status and tell me what it reports."),
    ("browser", "What's on the page at localhost:8080?"),
]
SMALL_TALK = ["Hey there!", "Thank you so much!", "Who was Ada Lovelace?", "Write a limerick about a frog.",
              "What is the meaning of life?", "Can you recommend a movie for tonight?", "Good night!"]


@pytest.mark.parametrize("expected, prompt", NEEDS)
def test_routes_each_builtin(router, builtins, expected, prompt):
    decision = router.decide(prompt, builtins)
    assert decision.tool == expected, decision.scores
    assert decision.message().meta["event"] == "route" and decision.message().meta["scores"]


@pytest.mark.parametrize("prompt", SMALL_TALK)
def test_small_talk_needs_no_tool(router, builtins, prompt):
    decision = router.decide(prompt, builtins + [get_weather])
    assert decision.tool is None, decision.scores


def test_routes_user_tools_and_openai_dicts(router, builtins):
    from llmos.toolbox import as_tool

    tools = builtins + [get_weather, convert_currency, as_tool(TRANSLATE)]
    assert router.decide("Is it cold in Helsinki right now?", tools).tool == "get_weather"
    assert router.decide("Convert 250 US dollars to euros.", tools).tool == "convert_currency"  # description only
    assert router.decide("Translate 'where is the station' into German.", tools).tool == "translate_text"  # a dict
    assert router.decide("Tell me a story about a dragon.", tools).tool is None


def test_the_kernel_routes_forces_the_call_then_answers_with_the_result(router, tmp_path):
    calc = load_builtin("calculator")
    backend = ScriptedBackend([call("calculator", expression="37 * 14"), "That is the total."])
    kernel = Kernel(backend, [calc], trace=tmp_path / "t.jsonl", router=router)
    msgs = list(kernel.run("Use the calculator: what do 37 boxes cost if one box costs 14 dollars?"))
    assert [s.tool_choice for s in backend.seen] == ["calculator", "none"]
    assert backend.seen[1].prefix == "37 * 14 = 518"
    assert msgs[-2].content.startswith("37 * 14 = 518") and msgs[-1].meta["exit"] == "answer"
    route = next(json.loads(l) for l in (tmp_path / "t.jsonl").read_text().splitlines() if '"route"' in l)
    assert route["meta"]["tool"] == "calculator" and route["meta"]["ms"] >= 0


def test_a_plain_math_request_is_read_without_a_model_turn(router, tmp_path):
    backend = ScriptedBackend(["That is the difference."])
    kernel = Kernel(backend, [load_builtin("calculator")], trace=tmp_path / "t.jsonl", router=router)
    msgs = list(kernel.run("Subtract 7,845 from 20,000."))
    assert [s.tool_choice for s in backend.seen] == ["none"]  # the only model turn is the answer
    read = next(m for m in msgs if m.meta.get("event") == "read")
    assert read.meta["arguments"] == {"expression": "20000 - 7845"} and read.meta["ms"] >= 0
    assert next(m for m in msgs if m.role == "tool").content == "12155"
    assert msgs[-2].content.startswith("20000 - 7845 = 12155") and msgs[-1].meta["exit"] == "answer"
    assert any(json.loads(l).get("meta", {}).get("event") == "read" for l in (tmp_path / "t.jsonl").read_text().splitlines())


def test_a_one_step_budget_reads_nothing_and_runs_nothing(router, tmp_path):
    backend = ScriptedBackend(["391"])
    kernel = Kernel(backend, [load_builtin("calculator")], trace=tmp_path, router=router, config={"budget": {"steps": 1}})
    list(kernel.run("What is 17 * 23?"))  # one step must be the answer: nothing is read or run
    assert [s.tool_choice for s in backend.seen] == ["none"] and not any(m.role == "tool" for m in kernel.trace.read())


def test_small_talk_is_answered_without_a_call(router, tmp_path):
    backend = ScriptedBackend(["Hello! How can I help?"])
    kernel = Kernel(backend, [load_builtin("calculator")], trace=tmp_path, router=router)
    assert list(kernel.run("Hi, how are you?"))[-1].meta["exit"] == "answer"
    assert backend.seen[0].tool_choice == "none"


def test_a_given_tool_choice_wins_over_the_router(router, tmp_path):
    backend = ScriptedBackend(["no tools today"])
    kernel = Kernel(backend, [load_builtin("calculator")], trace=tmp_path, router=router)
    list(kernel.run("What is 17 * 23?", tool_choice="none"))
    assert backend.seen[0].tool_choice == "none"
    assert not any(m.meta.get("event") == "route" for m in kernel.trace.read())


def test_a_senseless_call_is_repaired_from_the_request(router, tmp_path):
    # the model writes a broken expression: the request's own span, which the calculator can
    # compute, is what runs, written as the calculator reads it; no second decode was needed
    backend = ScriptedBackend([call("calculator", expression="}"), "done"])
    kernel = Kernel(backend, [load_builtin("calculator")], trace=tmp_path, router=router)
    msgs = list(kernel.run("My 2 kids ask: what is 17 times 23?"))  # not read: no span carries the 2 as well
    notice = next(m for m in msgs if m.meta.get("event") == "system2")
    assert notice.meta["chosen"] == "copied" and [c["kind"] for c in notice.meta["candidates"]] == ["model", "copied"]
    assert next(m for m in msgs if m.tool_calls).tool_calls[0].arguments == {"expression": "17 * 23"}
    assert next(m for m in msgs if m.role == "tool").content == "391" and backend.seen[-1].prefix == "17 * 23 = 391"
    assert notice.meta["extra_tokens"] == 0 and "extra_s" in notice.meta


def test_an_ungrounded_call_is_decoded_again_under_a_grounded_grammar(router, tmp_path):
    @tool(examples=["What is the area of a triangle with base 3 and height 4?"])
    def triangle_area(base: float, height: float) -> float:
        """Area of a triangle from its base and height."""
        return base * height / 2

    backend = ScriptedBackend([call("triangle_area", base=12, height=5), call("triangle_area", base=10, height=5), "ok"])
    kernel = Kernel(backend, [triangle_area], trace=tmp_path, router=router)
    msgs = list(kernel.run("Find the area of a triangle with base 10 and height 5."))
    notice = next(m for m in msgs if m.meta.get("event") == "system2")
    assert notice.meta["chosen"] == "grounded" and next(m for m in msgs if m.role == "tool").content == "25.0"
    assert [s.tool_choice for s in backend.seen] == ["triangle_area", "triangle_area", "none"]


def test_grounding_rules():
    request = "Find the area of a triangle with base 10 and height 5"
    assert grounded({"base": 10, "height": 5}, request) == 1.0 and coverage({"base": 10, "height": 5}, request) == 1.0
    assert grounded({"base": 12, "height": 5}, request) == 0.5
    assert grounded({"expression": "17*23"}, "what is 17 times 23") == 1.0
    assert grounded({"expression": "17*24"}, "what is 17 times 23") == 0.5
    assert "17 times 23" in spans("What is 17 times 23?") and "23" in spans("What is 17 times 23?")

    @tool
    def area(base: float, height: float, unit: str = "cm") -> float:
        """Area of a triangle."""
        return base * height / 2

    variant = grounded_tool(area, request)
    assert variant.constraint["properties"]["base"]["enum"] == [5, 10] and variant.parameters == area.parameters
    fixed = copied_call(area, ToolCall("area", {"base": 10, "height": 5, "unit": "furlongs"}), request)
    assert dict(fixed.arguments) == {"base": 10, "height": 5}  # an optional value nobody asked for is dropped
    assert judge(area, ToolCall("area", {"base": "ten"}), request)[0] is False


def test_second_pass_keeps_a_sound_call_without_extra_work():
    calc = load_builtin("calculator")
    reply = Message("assistant", "", tool_calls=(ToolCall("calculator", {"expression": "2**10"}),))
    kept, notice = second_pass(reply, [calc], "What is 2**10?", redo=lambda tools, name: pytest.fail("no second decode"))
    assert kept is reply and notice is None


def test_answers_stop_before_repeating_a_sentence():
    from llmos.llama import _repeated_sentence

    text = "The lamp failed. Replace the bulb now. The lamp failed."
    assert text[: _repeated_sentence(text)].strip() == "The lamp failed. Replace the bulb now."
    assert _repeated_sentence("One short answer. And another different one.") is None


# ---- the real default model --------------------------------------------------------------------

@pytest.mark.model
def test_real_model_answers_arithmetic_through_the_calculator(tmp_path):
    kernel = build({"tools": ["calculator", "plot"], "sampling": {"max_tokens": 96}}, trace=tmp_path)
    try:
        msgs = list(kernel.run("What is 19 * 21?"))
        calls = [c for m in msgs for c in m.tool_calls]
        assert [c.name for c in calls] == ["calculator"] and "399" in msgs[-2].content, [m.content for m in msgs]
        msgs = list(kernel.run("Thanks! That is all."))
        assert not any(m.tool_calls for m in msgs) and msgs[-1].meta["exit"] == "answer"
    finally:
        kernel.close()


@pytest.mark.model
def test_real_model_answers_never_open_like_a_call(llama_backend):
    from llmos.grammar import ANSWER_ONLY
    from llmos.llama import compile_grammar

    compile_grammar(llama_backend, ANSWER_ONLY)
    calc = load_builtin("calculator")
    msgs = [Message("user", "What is 2+2?"), Message("assistant", "", tool_calls=(ToolCall("calculator", {"expression": "2+2"}),)),
            Message("tool", "4", meta={"name": "calculator"})]
    reply = list(llama_backend.turn(msgs, [calc], "none"))[-1]
    assert reply.content and not reply.content.startswith("<") and not reply.tool_calls
    prefixed = list(llama_backend.turn(msgs, [calc], "none", prefix="2+2 = 4"))[-1]
    assert prefixed.content.startswith("2+2 = 4")


def test_percentages_and_scale_words_are_written_as_the_parameter_asks():
    from llmos.decide import as_fractions, grounded
    from llmos.toolbox import from_openai

    t = from_openai({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "interest_rate": {"type": "number", "description": "The annual interest rate."},
        "discount_percent": {"type": "number", "description": "Discount in percent."},
        "population": {"type": "integer"}, "years": {"type": "integer"}}}}})
    request = "A rate of 5%, 20% off, a population of 213 million, over 5 years."
    fixed = as_fractions(t, ToolCall("f", {"interest_rate": 5, "discount_percent": 20, "population": 213, "years": 5}), request)
    assert dict(fixed.arguments) == {"interest_rate": 0.05, "discount_percent": 20, "population": 213000000, "years": 5}
    assert grounded(dict(fixed.arguments), request) == 1.0
    assert as_fractions(t, ToolCall("f", {"years": 5}), request) is None


def test_named_choices_and_unasked_flags_are_set_from_the_request():
    from llmos.decide import as_stated
    from llmos.toolbox import from_openai

    t = from_openai({"type": "function", "function": {"name": "book", "parameters": {"type": "object", "properties": {
        "unit": {"type": "string", "enum": ["meter", "feet"]},
        "room": {"type": "string", "description": "Room type, e.g. king size, queen size, suite."},
        "city": {"type": "string", "description": "City, e.g. Paris, London."},
        "kind": {"type": "string", "description": "Can be 'melting', 'vaporization'."},
        "refundable": {"type": "boolean"}}, "required": ["unit", "room", "city", "kind"]}}})
    request = "A king size room in Rome, heights in feet, for the vaporization test."
    fixed = as_stated(t, ToolCall("book", {"unit": "meter", "room": "King", "city": "Rome", "kind": "melting", "refundable": True}), request)
    assert dict(fixed.arguments) == {"unit": "feet", "room": "king size", "city": "Rome", "kind": "vaporization"}
    same = ToolCall("book", {"unit": "feet", "room": "suite", "city": "Rome", "kind": "vaporization", "refundable": False})
    assert as_stated(t, same, "feet, a suite in Rome, vaporization, and it must be refundable") is None


def test_an_optional_choice_the_request_names_is_added():
    from llmos.decide import as_stated
    from llmos.toolbox import from_openai

    t = from_openai({"type": "function", "function": {"name": "fetch", "parameters": {"type": "object", "properties": {
        "employee_id": {"type": "integer"},
        "fields": {"type": "array", "items": {"type": "string", "enum": ["Personal Info", "Job History", "Payroll"]}},
        "roots": {"type": "string", "description": "'real' for real roots, 'all' for both. Default is 'real'."}},
        "required": ["employee_id"]}}})
    fixed = as_stated(t, ToolCall("fetch", {"employee_id": 7}), "Get all the roots, and the Job History and Personal Info of 7.")
    assert dict(fixed.arguments) == {"employee_id": 7, "fields": ["Job History", "Personal Info"], "roots": "all"}
    assert as_stated(t, ToolCall("fetch", {"employee_id": 7}), "Employee 7, please.") is None
