"""A remote model server as the backend: llama-cpp-python's own server (`python -m
llama_cpp.server`) serving the default GGUF on 127.0.0.1, and servers that are down or answer garbage."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from injection_suite import Canary
from llmos import build
from llmos.remote import ServerError

pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python's server extra")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(default_model_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "4096"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(120):
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise AssertionError("llama_cpp.server did not start")
    yield url
    proc.terminate()
    proc.wait(20)


def test_the_kernel_runs_on_a_remote_server(server, tmp_path):
    with build({"model": {"server": server}, "tools": ["calculator"]}, trace=tmp_path, artifacts=tmp_path) as kernel:
        assert kernel.backend.n_ctx == 4096 and server in kernel.backend.name
        msgs = [m for m in kernel.run("What is 17 * 23?") if not m.is_delta]
        assert any(m.role == "tool" and m.content == "391" for m in msgs)
        assert "391" in msgs[-1].content and msgs[-1].meta["exit"] == "answer"
        # the turn grammar goes through: a forced call parses and fits the schema
        reply = kernel.complete([{"role": "user", "content": "What is the weather in Paris?"}], [WEATHER], tool_choice="get_weather")
        assert reply.tool_calls[0].name == "get_weather" and isinstance(reply.tool_calls[0].arguments["city"], str)
        answer = kernel.complete([{"role": "user", "content": "Say hello."}], [WEATHER], tool_choice="none")
        assert answer.content and not answer.content.startswith("<")


def test_a_dead_server_is_one_readable_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(ServerError, match=rf"model server {url}: cannot connect"):
        build({"model": {"server": url}}, trace=tmp_path, artifacts=tmp_path)
    proc = subprocess.run([sys.executable, "-m", "llmos", "run", "--no-tools", "-o", f"model.server={url}", "hi"],
                          capture_output=True, text=True, env={**os.environ, "LLMOS_HOME": str(tmp_path)})
    assert proc.returncode == 2 and url in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_server_that_answers_garbage_is_one_readable_error(tmp_path):
    site = Canary({"/v1/models": "<html>not an API</html>"})
    try:
        with pytest.raises(ServerError, match="did not answer with JSON"):
            build({"model": {"server": site.url + "/v1"}}, trace=tmp_path, artifacts=tmp_path)
    finally:
        site.close()


def test_the_server_url_is_checked(tmp_path):
    from llmos.config import Config

    with pytest.raises(ValueError, match="not an http"):
        Config.model_validate({"model": {"server": "127.0.0.1:8000"}})
