"""The kernel loop, made deterministic with the scripted backend."""

import json

import pytest

from llmos import Kernel, Message, tool
from llmos.testing import ScriptedBackend, ScriptOver, call


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@tool
def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(f"boom: {reason}")


def run(kernel, prompt, **kw):
    return list(kernel.run(prompt, **kw))


def test_call_then_answer(tmp_path):
    backend = ScriptedBackend([call("add", a=2, b=3), "The sum is 5."])
    kernel = Kernel(backend, tools=[add], trace=tmp_path)
    msgs = [m for m in run(kernel, "add 2 and 3")]
    roles = [m.role for m in msgs]
    assert roles == ["user", "assistant", "tool", "assistant", "kernel"]
    assert msgs[2].content == "5" and msgs[2].meta["name"] == "add"
    assert msgs[2].meta["tool_call_id"] == msgs[1].tool_calls[0].id
    assert msgs[-1].meta["exit"] == "answer" and msgs[-1].meta["steps"] == 2
    # the second turn saw the tool result
    assert backend.seen[1].messages[-1].role == "tool"


def test_failing_tool_becomes_tool_message_and_run_continues(tmp_path):
    backend = ScriptedBackend([call("explode", reason="x"), "It failed."])
    kernel = Kernel(backend, tools=[explode], trace=tmp_path)
    msgs = run(kernel, "go")
    tool_msg = next(m for m in msgs if m.role == "tool")
    assert tool_msg.meta["error"] is True
    assert "RuntimeError: boom: x" in tool_msg.content
    assert msgs[-1].meta["exit"] == "answer"


def test_invalid_arguments_come_back_as_tool_message(tmp_path):
    backend = ScriptedBackend([call("add", a="two", b=3), "ok"])
    kernel = Kernel(backend, tools=[add], trace=tmp_path)
    tool_msg = next(m for m in run(kernel, "go") if m.role == "tool")
    assert tool_msg.meta["error"] and "invalid arguments" in tool_msg.content and "a:" in tool_msg.content


def test_step_budget_forces_an_answer_on_the_last_step(tmp_path):
    backend = ScriptedBackend([call("add", a=1, b=1), call("add", a=2, b=2), "final"])
    kernel = Kernel(backend, tools=[add], config={"budget": {"steps": 3}}, trace=tmp_path)
    msgs = run(kernel, "loop")
    assert [s.tool_choice for s in backend.seen] == ["auto", "auto", "none"]
    assert msgs[-1].meta["exit"] == "max_steps"
    assert msgs[-2].content == "final"


def test_repeating_the_same_call_forces_an_answer(tmp_path):
    backend = ScriptedBackend([call("add", a=1, b=1), call("add", a=1, b=1), "done"])
    kernel = Kernel(backend, tools=[add], trace=tmp_path)
    run(kernel, "loop")
    assert [s.tool_choice for s in backend.seen] == ["auto", "auto", "none"]


def test_tool_choice_applies_to_first_turn_only(tmp_path):
    backend = ScriptedBackend([call("add", a=1, b=2), "3"])
    kernel = Kernel(backend, tools=[add], trace=tmp_path)
    run(kernel, "x", tool_choice="required")
    assert [s.tool_choice for s in backend.seen] == ["required", "auto"]


def test_several_calls_in_one_turn_results_in_call_order(tmp_path):
    import time

    @tool
    def sleepy(seconds: float, label: str) -> str:
        """Sleep then echo."""
        time.sleep(seconds)
        return label

    backend = ScriptedBackend([[call("sleepy", seconds=0.3, label="first"), call("sleepy", seconds=0.0, label="second")], "ok"])
    kernel = Kernel(backend, tools=[sleepy], trace=tmp_path)
    tools = [m.content for m in run(kernel, "x") if m.role == "tool"]
    assert tools == ["first", "second"]


def test_runaway_tool_times_out(tmp_path):
    import threading

    release = threading.Event()

    @tool(timeout=0.2)
    def hang() -> str:
        """Never returns in time."""
        release.wait(10)
        return "late"

    backend = ScriptedBackend([call("hang"), "gave up"])
    kernel = Kernel(backend, tools=[hang], trace=tmp_path)
    msgs = run(kernel, "x")
    release.set()
    tool_msg = next(m for m in msgs if m.role == "tool")
    assert tool_msg.meta["error"] and "timed out" in tool_msg.content
    assert msgs[-1].meta["exit"] == "answer"


def test_streaming_yields_deltas_that_add_up_to_the_answer(tmp_path):
    backend = ScriptedBackend(["Hello there, world."])
    kernel = Kernel(backend, trace=tmp_path)
    msgs = run(kernel, "hi", stream=True)
    deltas = [m.content for m in msgs if m.is_delta]
    assert len(deltas) > 1
    assert "".join(deltas) == "Hello there, world."
    # without stream=True no deltas
    backend.replies.append("again")
    assert not any(m.is_delta for m in run(kernel, "hi"))


def test_trace_is_jsonl_of_complete_messages(tmp_path):
    backend = ScriptedBackend([call("add", a=2, b=2), "4"])
    kernel = Kernel(backend, tools=[add], trace=tmp_path)
    msgs = [m for m in run(kernel, "x", stream=True) if not m.is_delta]
    lines = kernel.trace.path.read_text().splitlines()
    assert len(lines) == len(msgs)
    first = json.loads(lines[1])
    assert first["role"] == "assistant" and first["tool_calls"][0]["function"]["name"] == "add"
    replay = kernel.trace.read()
    assert [m.role for m in replay] == [m.role for m in msgs]
    assert replay[1].tool_calls[0].arguments == {"a": 2, "b": 2}


def test_conversation_continues_across_runs_and_reset(tmp_path):
    backend = ScriptedBackend(["one", "two"])
    kernel = Kernel(backend, config={"agent": {"system": "be brief"}}, trace=tmp_path)
    run(kernel, "a")
    run(kernel, "b")
    assert [m.content for m in backend.seen[1].messages] == ["be brief", "a", "one", "b"]
    kernel.reset()
    assert kernel.messages == []
    backend.replies.append("three")
    run(kernel, "c")
    assert [m.content for m in backend.seen[2].messages] == ["be brief", "c"]  # the system prompt stays


def test_complete_takes_openai_dicts_and_executes_nothing(tmp_path):
    calls = []

    def weather(city: str) -> str:
        calls.append(city)
        return "sunny"

    spec = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    backend = ScriptedBackend([call("get_weather", city="Paris")])
    kernel = Kernel(backend, trace=tmp_path)
    reply = kernel.complete([{"role": "user", "content": "weather in Paris?"}], [spec])
    assert reply.tool_calls[0].name == "get_weather"
    assert dict(reply.tool_calls[0].arguments) == {"city": "Paris"}
    assert backend.seen[0].tools == ("get_weather",)
    assert calls == [] and kernel.messages == []


def test_scripted_backend_rejects_impossible_turns(tmp_path):
    kernel = Kernel(ScriptedBackend([call("nope")]), tools=[add], trace=tmp_path)
    with pytest.raises(AssertionError):
        run(kernel, "x")
    kernel = Kernel(ScriptedBackend([]), trace=tmp_path)
    with pytest.raises(ScriptOver):
        run(kernel, "x")


def test_message_round_trip():
    m = Message("assistant", "", tool_calls=(call("add", a=1, b=2),), meta={"x": 1})
    again = Message.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.tool_calls[0].arguments == {"a": 1, "b": 2} and again.meta["x"] == 1
    with pytest.raises(ValueError):
        Message("robot", "x")


def test_refused_call_reaches_the_model_and_others_run(tmp_path):
    asked = []

    def approve(c, why):
        asked.append((c.name, why))
        return c.arguments.get("a") != 666

    backend = ScriptedBackend([[call("add", a=666, b=1), call("add", a=1, b=1)], "ok"])
    kernel = Kernel(backend, tools=[add], trace=tmp_path, approve=approve, config={"policy": {"add": "ask"}})
    msgs = run(kernel, "x")
    tools = [m for m in msgs if m.role == "tool"]
    assert [name for name, _ in asked] == ["add", "add"] and "asks before each call" in asked[0][1]
    assert tools[0].meta.get("refused") and "did not allow" in tools[0].content
    assert tools[1].content == "2"
    decisions = [m.meta for m in msgs if m.meta.get("event") == "policy"]
    assert [(d["decision"], d["rule"], d["asked"]) for d in decisions] == [("deny", "config", "user"), ("allow", "config", "user")]


def test_time_budget_ends_the_run(tmp_path):
    import time as _t

    @tool
    def slow() -> str:
        """Slow."""
        _t.sleep(0.3)
        return "done"

    backend = ScriptedBackend([call("slow"), call("slow"), "never"])
    kernel = Kernel(backend, tools=[slow], trace=tmp_path, config={"budget": {"seconds": 0.2}})
    msgs = run(kernel, "x")
    assert msgs[-1].meta["exit"] == "timeout"
