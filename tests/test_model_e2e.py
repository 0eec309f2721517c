"""The real default model (SmolLM2-135M, temperature 0) through the real llama.cpp.

Assertions are on structure (a valid call, the loop ended, a non-empty answer), not on the tiny
model's wisdom.
"""

import json

import pytest

from llmos import Kernel, Message, build, tool
from llmos.gguf import ModelFileError
from llmos.tools.calculator import calculator

SHORT = {"sampling": {"max_tokens": 96}}  # each agent samples by its own config


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather for a city."""
    return json.dumps({"city": city, "temperature": 21, "unit": unit})


@tool
def send_email(to: str, subject: str, body: str) -> str:
    """Send an email."""
    return "sent"


@pytest.fixture
def kernel(llama_backend, tmp_path):
    return Kernel(llama_backend, tools=[calculator], config=SHORT, trace=tmp_path)


def test_forced_calculator_call_runs_and_loop_ends_with_answer(kernel):
    msgs = list(kernel.run("What is 12345 * 6789?", tool_choice="calculator"))
    first = msgs[1]
    assert first.role == "assistant" and first.tool_calls
    call = first.tool_calls[0]
    assert call.name == "calculator" and isinstance(call.arguments["expression"], str)
    calculator.validate(call.arguments)  # arguments satisfy the tool's schema
    results = [m for m in msgs if m.role == "tool"]
    assert results and not results[0].meta.get("error"), results[0].content
    assert msgs[-1].role == "kernel" and msgs[-1].meta["exit"] in ("answer", "max_steps")
    final = [m for m in msgs if m.role == "assistant" and not m.tool_calls][-1]
    assert final.content.strip()


def test_every_required_call_parses_and_validates(llama_backend, tmp_path):
    tools = [calculator, get_weather, send_email]
    prompts = [
        "What is the weather in Paris?", "Compute 2**64.", "Email bob@example.com that the build passed.",
        "Is it raining in Tokyo?", "integrate x squared", "Tell me a joke.",
    ]
    kernel = Kernel(llama_backend, tools=tools, config=SHORT, trace=tmp_path)
    by_name = {t.name: t for t in tools}
    for prompt in prompts:
        reply = kernel.complete([{"role": "user", "content": prompt}], tools, tool_choice="required")
        assert reply.tool_calls, f"no call for {prompt!r}: {reply.meta.get('raw')!r}"
        for c in reply.tool_calls:
            by_name[c.name].validate(c.arguments)


def test_plain_answer_streams_tokens(llama_backend, tmp_path):
    kernel = Kernel(llama_backend, config=SHORT, trace=tmp_path)
    msgs = list(kernel.run("Say hello in one short sentence.", stream=True))
    deltas = [m.content for m in msgs if m.is_delta]
    answer = [m for m in msgs if m.role == "assistant" and not m.is_delta][-1]
    assert len(deltas) > 1
    assert "".join(deltas) == answer.meta["raw"] and answer.content
    assert msgs[-1].meta["exit"] == "answer"
    lines = [json.loads(l) for l in kernel.trace.path.read_text().splitlines()]
    assert [l["role"] for l in lines] == ["user", "assistant", "kernel"]  # no deltas in the trace


def test_complete_with_openai_tool_dicts(llama_backend, tmp_path):
    spec = {"type": "function", "function": {"name": "lookup_order", "description": "Find an order by id",
                                              "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}
    kernel = Kernel(llama_backend, config=SHORT, trace=tmp_path)
    reply = kernel.complete([{"role": "user", "content": "Where is my order A-1234?"}], [spec], tool_choice="required")
    assert isinstance(reply, Message) and reply.tool_calls[0].name == "lookup_order"
    assert isinstance(reply.tool_calls[0].arguments["order_id"], str)


def test_tool_loop_reuses_the_kv_cache_prefix(kernel, llama_backend):
    list(kernel.run("What is 2**20?", tool_choice="calculator"))
    stats = [m.meta["stats"] for m in kernel.messages if m.role == "assistant"]
    assert len(stats) >= 2
    second = stats[1]
    assert second["cached_tokens"] >= stats[0]["prompt_tokens"]  # the first turn's prompt was not re-read
    assert second["evaluated_tokens"] < second["prompt_tokens"] / 2


def test_bad_model_files_raise_before_llama_cpp(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_text("nope")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        build({"model": {"path": str(bad)}}, trace=tmp_path)
    with pytest.raises(ModelFileError, match="no such file"):
        build({"model": {"path": str(tmp_path / "missing.gguf")}}, trace=tmp_path)


def test_template_without_tool_role_gets_tool_results_as_user_turns():
    from llmos.llama import _message_dicts, _without_tool_role
    from llmos.messages import ToolCall

    msgs = [Message("user", "hi"), Message("assistant", "", tool_calls=(ToolCall("calc", {"x": 1}),)),
            Message("tool", "1", meta={"name": "calc"}), Message("tool", "2", meta={"name": "calc"})]
    dicts = _without_tool_role(_message_dicts(msgs, []))
    assert [d["role"] for d in dicts] == ["system", "user", "assistant", "user"]
    assert "<tool_response" in dicts[-1]["content"] and dicts[-1]["content"].count("tool_response name") == 2


def test_strict_template_falls_back():
    from llmos.config import ModelConfig, Sampling
    from llmos.llama import LlamaBackend

    strict = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
              "{{ raise_exception('unknown role') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
              "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    backend = LlamaBackend(ModelConfig(gpu_layers=0, chat_template=strict), Sampling(max_tokens=8))
    try:
        text = backend.render([Message("user", "hi"), Message("tool", "42", meta={"name": "calc"})], [])
        assert "<|im_start|>tool" not in text and "42" in text
        reply = list(backend.turn([Message("user", "hi"), Message("tool", "42", meta={"name": "calc"})], []))[-1]
        assert reply.role == "assistant"
    finally:
        backend.close()
