"""A remote OpenAI-compatible model server as a Backend (llama.cpp's server, llama-cpp-python's
server, vLLM): `model.server: http://HOST:PORT/v1`.

The turn is the same as in-process: the tools block in the system prompt, calls as text, and
llmos's turn grammar sent in the request's `grammar` field (llama.cpp and llama-cpp-python take
it), with `cache_prompt` so the server reuses the conversation's prefix. A server that refuses
the field gets the tools in OpenAI's own format instead, and its native tool calls are used.
Arguments are validated by the kernel either way. A server that is down, slow or answers garbage
raises ServerError naming the URL; only connecting is retried (nothing was sent yet), with backoff.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterator, Sequence

from llmos.backend import ContextFull
from llmos.config import ModelConfig, Sampling
from llmos.grammar import CALL_OPEN, parse_calls, turn_grammar
from llmos.messages import Message, ToolCall
from llmos.toolbox import Tool

CONNECT_TRIES = 3
CHARS_PER_TOKEN = 3.5  # the window is counted without the server's tokenizer: a cautious estimate


def _after(prefix: str, text: str) -> str:
    """The model's text without what it repeats of the end of the prefix (a chat server cannot
    continue an answer begun for it, so the model often restates it: "= 391" then "391")."""
    words, text = prefix.split(), text.lstrip()
    for k in range(len(words), 0, -1):
        tail = " ".join(words[-k:])
        if text.startswith(tail):
            return text[len(tail):].lstrip(" .,:;")
    return text


class ServerError(RuntimeError):
    """The model server cannot be used: the message names its URL and what went wrong."""


class RemoteBackend:
    """A model on an OpenAI-compatible server (see the module docstring)."""

    def __init__(self, model: ModelConfig, sampling: Sampling | None = None) -> None:
        import httpx

        assert model.server is not None
        self.url = model.server.rstrip("/")
        self.sampling = sampling or Sampling()
        self.client = httpx.Client(timeout=httpx.Timeout(model.server_timeout, connect=5.0))
        self.notes: tuple[str, ...] = ()
        self.slots = model.parallel or 1  # requests sent to the server at once (it batches them)
        self._native = False  # the server refused `grammar`: use its own tool calls
        listed = self._request("GET", "/models").get("data") or [{}]
        self.model_id = str(listed[0].get("id") or "default")
        meta = listed[0].get("meta") or {}
        self.n_ctx = model.n_ctx or int(meta.get("n_ctx_train") or meta.get("n_ctx") or 4096)
        self.name = f"{self.model_id} on {self.url}"

    def _request(self, method: str, path: str, body: dict | None = None, stream: bool = False) -> Any:
        """One request; connection failures are retried with backoff, nothing else is."""
        import httpx

        for attempt in range(CONNECT_TRIES):
            try:
                if stream:
                    request = self.client.build_request(method, self.url + path, json=body)
                    response = self.client.send(request, stream=True)
                else:
                    response = self.client.request(method, self.url + path, json=body)
                break
            except httpx.ConnectError as exc:
                if attempt == CONNECT_TRIES - 1:
                    raise ServerError(f"model server {self.url}: cannot connect ({exc}); is it running?") from None
                time.sleep(0.5 * 2**attempt)
            except httpx.TimeoutException:
                raise ServerError(f"model server {self.url}: no answer within the time limit ({path})") from None
            except httpx.HTTPError as exc:
                raise ServerError(f"model server {self.url}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            text = response.read().decode("utf-8", "replace") if stream else response.text
            response.close()
            raise ServerError(f"model server {self.url}: HTTP {response.status_code} for {path}: {text[:300]}")
        if stream:
            return response
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"model server {self.url}: {path} did not answer with JSON ({response.text[:120]!r})") from None

    def count(self, messages: Sequence[Message], tools: Sequence[Tool]) -> int:
        from llmos.llama import _message_dicts

        return int(sum(len(d["content"]) + 8 for d in _message_dicts(messages, tools)) / CHARS_PER_TOKEN) + 1

    def _body(self, messages: Sequence[Message], tools: Sequence[Tool], tool_choice: str, opts: Sampling) -> dict:
        from llmos.llama import _message_dicts, _without_tool_role

        body: dict[str, Any] = {"model": self.model_id, "stream": True, "temperature": opts.temperature, "top_p": opts.top_p,
                                "seed": opts.seed, "max_tokens": opts.max_tokens, "cache_prompt": True}
        if self._native:
            body["messages"] = [m.to_dict() | {"content": m.content} for m in messages if m.role != "kernel"]
            for d, m in zip(body["messages"], [m for m in messages if m.role != "kernel"]):
                d.pop("meta", None)
                if m.role == "tool":
                    d["tool_call_id"] = m.meta.get("tool_call_id", "")
            if tools and tool_choice != "none":
                body["tools"] = [t.schema() for t in tools]
                body["tool_choice"] = tool_choice if tool_choice in ("auto", "required") else {"type": "function", "function": {"name": tool_choice}}
            return body
        body["messages"] = _without_tool_role(_message_dicts(messages, tools))  # the in-process prompt; results as user turns
        grammar = turn_grammar(tools, tool_choice)
        if grammar:
            body["grammar"] = grammar
        return body

    def turn(self, messages: Sequence[Message], tools: Sequence[Tool], tool_choice: str = "auto",
             agent: str = "main", sampling: Sampling | None = None, prefix: str = "") -> Iterator[Message]:
        opts = sampling or self.sampling
        if self.count(messages, tools) >= self.n_ctx:
            raise ContextFull(f"prompt is about {self.count(messages, tools)} tokens; the server's context holds {self.n_ctx}")
        try:
            response = self._request("POST", "/chat/completions", self._body(messages, tools, tool_choice, opts), stream=True)
        except ServerError as exc:
            if self._native or "grammar" not in str(exc).lower():
                raise
            self._native = True  # this server takes no grammar: its own tool calls from now on
            response = self._request("POST", "/chat/completions", self._body(messages, tools, tool_choice, opts), stream=True)
        t0, text, native, usage, finish = time.perf_counter(), "", {}, {}, None
        if prefix and tool_choice == "none":
            yield Message("assistant", prefix + " ", meta={"delta": True})
        try:
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise ServerError(f"model server {self.url}: a streamed chunk is not JSON ({data[:80]!r})") from None
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    finish = choice.get("finish_reason") or finish
                    if delta.get("content"):
                        text += delta["content"]
                        yield Message("assistant", delta["content"], meta={"delta": True})
                    for part in delta.get("tool_calls") or ():
                        slot = native.setdefault(part.get("index", 0), {"id": None, "name": "", "arguments": ""})
                        fn = part.get("function") or {}
                        slot["id"] = part.get("id") or slot["id"]
                        if fn.get("name") and not slot["name"]:
                            slot["name"] = fn["name"]  # some servers repeat the name in every delta
                        slot["arguments"] += fn.get("arguments") or ""
        except Exception as exc:
            import httpx

            if isinstance(exc, httpx.HTTPError):
                raise ServerError(f"model server {self.url}: the stream broke off ({type(exc).__name__})") from None
            raise
        finally:
            response.close()
        calls = parse_calls(text) if text.lstrip().startswith(CALL_OPEN) else ()
        if native:
            try:
                calls = tuple(ToolCall(s["name"], json.loads(s["arguments"] or "{}"), **({"id": s["id"]} if s["id"] else {}))
                              for _, s in sorted(native.items()))
            except ValueError:
                raise ServerError(f"model server {self.url}: a tool call's arguments are not JSON") from None
        prompt = int(usage.get("prompt_tokens") or self.count(messages, tools))
        generated = int(usage.get("completion_tokens") or max(1, len(text) // 4))
        stats = {"prompt_tokens": prompt, "evaluated_tokens": prompt, "generated_tokens": generated,
                 "cached_tokens": int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0),
                 "stop": "length" if finish == "length" else "stop", "decode_s": round(time.perf_counter() - t0, 4)}
        if calls:
            yield Message("assistant", "", tool_calls=calls, meta={"raw": text, "stats": stats})
        else:
            answer = (prefix + " " + _after(prefix, text)).strip() if prefix and tool_choice == "none" else text.strip()
            yield Message("assistant", answer, meta={"raw": answer, "stats": stats})

    def forget(self, agent: str) -> None:
        pass  # the server keeps its own slots; nothing is held here per agent

    def close(self) -> None:
        self.client.close()
