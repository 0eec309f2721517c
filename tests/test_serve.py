"""`llmos serve` driven by a real client no one here wrote: the official `openai` package (and
httpx for what the SDK will not send), against the default GGUF on a free 127.0.0.1 port."""

import json
import os
import re
import subprocess
import sys
import threading

import httpx
import pytest
from pydantic import BaseModel

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}


def start(home, *args):
    env = {**os.environ, "LLMOS_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "llmos", "serve", "--port", "0", *args], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in proc.stderr:
        m = re.search(r"on (http://\S+)/v1", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
            return proc, m.group(1)
    proc.wait(5)
    raise AssertionError(f"llmos serve did not start (exit {proc.returncode})")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = start(tmp_path_factory.mktemp("home"))
    yield url
    proc.terminate()
    proc.wait(20)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_a_plain_answer(client):
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct.Q4_1"]
    r = client.chat.completions.create(model="llmos", messages=[{"role": "user", "content": "Say hello."}], max_tokens=24, seed=1)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0 and r.usage.prompt_tokens_details.cached_tokens >= 0


def test_tool_choice_in_all_four_forms(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = client.chat.completions.create(model="llmos", messages=ask, tools=[WEATHER], tool_choice="required")
    call = forced.choices[0].message.tool_calls[0]
    assert forced.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] == "Paris"
    named = client.chat.completions.create(model="llmos", messages=ask, tools=[WEATHER],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    auto = client.chat.completions.create(model="llmos", messages=ask, tools=[WEATHER])  # the kernel decides
    assert auto.choices[0].message.tool_calls and auto.choices[0].message.tool_calls[0].function.name == "get_weather"
    none = client.chat.completions.create(model="llmos", messages=ask, tools=[WEATHER], tool_choice="none", max_tokens=20)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_a_streamed_tool_call_through_the_sdk_stream_helper(client):
    with client.chat.completions.stream(model="llmos", messages=[{"role": "user", "content": "Weather in Oslo?"}], tools=[WEATHER],
                                        tool_choice="required", stream_options={"include_usage": True}) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Oslo"
    assert final.choices[0].finish_reason == "tool_calls" and final.usage is not None
    assert any(e.type == "tool_calls.function.arguments.done" for e in events)


def test_raw_stream_format_matches_openai(server):
    body = {"model": "llmos", "messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": [WEATHER],
            "tool_choice": "required", "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    deltas = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]]
    deltas = [d[0] for d in deltas if d]
    assert deltas[0]["index"] == 0 and deltas[0]["id"] and deltas[0]["type"] == "function"
    assert deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in deltas[1:])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


def test_streamed_text_and_stop_strings(client):
    ask = [{"role": "user", "content": "Name some colours of the rainbow."}]
    full = client.chat.completions.create(model="llmos", messages=ask, max_tokens=40).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="llmos", messages=ask, stream=True, max_tokens=40) if c.choices)
    assert streamed == full and len(full) > 10  # temperature 0: the same answer, token by token
    stop = full[len(full) // 2: len(full) // 2 + 3]
    for stream in (False, True):
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="llmos", messages=ask, stream=True, max_tokens=40, stop=stop) if c.choices)
        else:
            cut = client.chat.completions.create(model="llmos", messages=ask, max_tokens=40, stop=[stop])
            text = cut.choices[0].message.content
            assert cut.choices[0].finish_reason == "stop"
        assert text == full[: full.index(stop)]


class Person(BaseModel):
    name: str
    age: int


def test_structured_output_with_parse_and_json_object(client):
    parsed = client.chat.completions.parse(model="llmos", messages=[{"role": "user", "content": "Ada Lovelace was 36."}],
                                           response_format=Person)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    r = client.chat.completions.create(model="llmos", messages=[{"role": "user", "content": "Describe a cat as JSON."}],
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_bad_requests_get_400_with_a_message_and_tolerance(client, server):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="llmos", messages=[])
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="llmos", messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="llmos", messages=[{"role": "user", "content": "hi"}], tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    r = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    # a tool message without tool_call_id and an unknown field are accepted
    ok = client.chat.completions.create(model="llmos", max_tokens=16, extra_body={"frobnicate": True}, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18 C and sunny"}])
    assert ok.choices[0].message.content


def test_concurrent_conversations_do_not_leak(client):
    results = {}

    def ask(i):
        r = client.chat.completions.create(model="llmos", max_tokens=8, messages=[
            {"role": "system", "content": f"You are agent {i}."}, {"role": "user", "content": f"Repeat the number {i}."}])
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3] and all(results.values())


def test_embeddings(client):
    data = client.embeddings.create(model="llmos", input=["a lamp", "a light"]).data
    assert len(data) == 2 and len(data[0].embedding) == 384


def test_host_and_origin_are_checked(server):
    assert httpx.get(server + "/v1/models", headers={"Host": "evil.example:8080"}).status_code == 403  # DNS rebinding
    assert httpx.get(server + "/v1/models", headers={"Origin": "http://evil.example"}).status_code == 403
    r = httpx.get(server + "/v1/models")
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_api_key_and_non_local_hosts(tmp_path):
    proc, url = start(tmp_path, "--api-key", "s3cret")
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(20)
    bad = subprocess.run([sys.executable, "-m", "llmos", "serve", "--host", "0.0.0.0"], capture_output=True, text=True,
                         env={**os.environ, "LLMOS_HOME": str(tmp_path)})
    assert bad.returncode == 2 and "--api-key" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_agents_start_stream_and_are_controlled_from_llmos_ps(server, tmp_path):
    task = tmp_path / "mul.yaml"
    task.write_text("goal: What is 12 * 34?\ntools: [calculator]\nchecks:\n  - answer_contains: '408'\n")
    started = httpx.post(server + "/v1/agents", json={"task": str(task), "name": "mul"}, timeout=60).json()
    assert started["name"] == "mul"
    with httpx.stream("GET", f"{server}/v1/agents/{started['id']}/events", timeout=120) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    messages = [json.loads(line) for line in lines[:-1]]
    assert messages[0]["role"] == "user" and messages[-1]["meta"]["exit"] == "answer" and "408" in messages[-1]["content"]
    env = {**os.environ, "LLMOS_HOME": str(tmp_path)}
    ps = subprocess.run([sys.executable, "-m", "llmos", "ps", "--server", server, "--json"], capture_output=True, text=True, env=env)
    assert ps.returncode == 0 and any(row["name"] == "mul" and row["state"] == "done" for row in json.loads(ps.stdout))
    # a prompt with llmos tools, paused before it can finish, then resumed
    slow = httpx.post(server + "/v1/agents", json={"prompt": "Write a long story about a lighthouse.", "name": "story",
                                                   "overrides": ["sampling.max_tokens=400", "budget.steps=1"]}, timeout=60).json()
    paused = subprocess.run([sys.executable, "-m", "llmos", "ps", "--server", server, "--pause", "story", "--json"],
                            capture_output=True, text=True, env=env)
    assert paused.returncode == 0 and json.loads(paused.stdout)[0]["id"] == slow["id"]
    stopped = httpx.post(f"{server}/v1/agents/story/stop", timeout=10).json()
    assert stopped["name"] == "story"
    httpx.post(f"{server}/v1/agents/story/resume", timeout=10)
    with httpx.stream("GET", f"{server}/v1/agents/story/events", timeout=120) as r:
        last = [line for line in r.iter_lines() if line.startswith("data: {")][-1]
    assert json.loads(last[6:])["meta"]["exit"] == "stopped"
    missing = subprocess.run([sys.executable, "-m", "llmos", "ps", "--server", server, "--stop", "nobody"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "no agent 'nobody'" in missing.stderr
    assert httpx.post(server + "/v1/agents", json={"task": str(tmp_path / "missing.yaml")}).status_code == 400


def test_langchain_chat_openai_merges_streamed_tool_calls(server):
    """LangChain's ChatOpenAI merges streamed tool-call chunks by index: the name must arrive once."""
    lc = pytest.importorskip("langchain_openai")
    model = lc.ChatOpenAI(base_url=server + "/v1", api_key="unused", model="llmos", max_retries=0, timeout=120)
    bound = model.bind_tools([WEATHER], tool_choice="get_weather")
    merged = None
    for chunk in bound.stream("What is the weather in Lisbon?"):
        merged = chunk if merged is None else merged + chunk
    calls = merged.tool_calls
    assert len(calls) == 1 and calls[0]["name"] == "get_weather" and isinstance(calls[0]["args"].get("city"), str)
    answer = model.invoke("Say hello in three words.")
    assert answer.content


def test_unknown_model_invalid_tool_schemas_and_a_prompt_longer_than_the_context_are_4xx(client, server):
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist") as found:
        client.chat.completions.create(model="gpt-4o", messages=hi, max_tokens=4)
    assert found.value.body["code"] == "model_not_found"
    served = client.models.list().data[0].id
    assert client.chat.completions.create(model=served, messages=hi, max_tokens=4).choices[0].message.content
    for params, where in [({"type": "object", "properties": {"x": {"type": "frobnicate"}}}, "properties/x/type"),
                          ({"type": "object", "properties": "x"}, "properties"), ("x", "type object"),
                          ({"type": "object", "properties": {"x": {"$ref": "#/$defs/gone"}}}, "points at nothing")]:
        bad = {"type": "function", "function": {"name": "f", "parameters": params}}
        with pytest.raises(openai.BadRequestError, match=where):
            client.chat.completions.create(model="llmos", messages=hi, tools=[bad], max_tokens=4)
    long = [{"role": "user", "content": "lamp " * 20000}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="context window holds") as full:
            r = client.chat.completions.create(model="llmos", messages=long, max_tokens=4, stream=stream)
            list(r) if stream else None
        assert full.value.body["code"] == "context_length_exceeded"
    assert client.chat.completions.create(model="llmos", messages=hi, max_tokens=4).choices  # still serving


def test_a_client_that_disconnects_mid_stream_stops_its_agent(server):
    import time

    ask = {"model": "llmos", "stream": True, "max_tokens": 2000,
           "messages": [{"role": "user", "content": "Write a very long story about a sea voyage."}]}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", server + "/v1/chat/completions", json=ask) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n >= 8:
                    break  # leave in the middle of the answer
    deadline = time.monotonic() + 30  # a bounded wait for the turn to notice, not a timing assertion
    while any(row["state"] == "running" for row in httpx.get(server + "/v1/agents").json()["data"]):
        assert time.monotonic() < deadline, "the abandoned turn kept running"
        time.sleep(0.1)
