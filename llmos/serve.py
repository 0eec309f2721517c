"""`llmos serve`: the kernel behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

Routes: GET /v1/models, POST /v1/chat/completions (a JSON reply, or server-sent events with
`stream: true`), POST /v1/embeddings (the offline MiniLM embedder), and agents: POST /v1/agents
(a task file, or a prompt with llmos tools, run unattended), GET /v1/agents (the process table),
GET /v1/agents/{id} (its row and messages), GET /v1/agents/{id}/events (its messages as
server-sent events until it ends), POST /v1/agents/{id}/pause | resume | stop. A request is planned by a
kernel (`Kernel.complete`: routed in auto mode, a chosen call checked; nothing is executed: the
client runs its tools), which is an agent in the shared scheduler. The requests of one
conversation (the same first messages) reuse one kernel, so its prefix stays in the KV cache.
`response_format` (json_object, json_schema) is enforced by the grammar, as a call of a tool
whose parameters are the schema. Streamed tool calls follow OpenAI's format: the first delta of
call i carries its index, id, type, name and empty arguments; later ones the index and pieces.

Safety: binds 127.0.0.1 by default and any other host needs an API key; every request's Host
(against DNS rebinding) and Origin are checked; there is no CORS.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Union

import pydantic
from pydantic import Field

from llmos.backend import ContextFull
from llmos.messages import Message, ToolCall

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
MAX_CONVERSATIONS = 16  # kernels kept for conversations, least recently used dropped first
RESPONSE_TOOL = "json_response"  # the tool a response_format becomes


ALIASES = ("llmos", "default")  # model names a request may use besides the served model's own


class ApiError(Exception):
    """A request the API refuses: HTTP status, OpenAI-style message, and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ChatRequest(pydantic.BaseModel):
    """The fields of a chat completion request llmos honours; others are ignored."""

    model_config = pydantic.ConfigDict(extra="ignore")

    model: Optional[str] = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: bool = True
    response_format: Optional[dict[str, Any]] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None


def _text(content: Any, where: str) -> str:
    """Message content as text: a string, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                parts.append(str(part.get("text", "")))
            else:
                raise ApiError(400, f"{where}: only text content parts are supported", where)
        return "".join(parts)
    raise ApiError(400, f"{where}: content must be a string or a list of text parts", where)


def messages_of(raw: list[dict[str, Any]]) -> list[Message]:
    """OpenAI-style messages as Messages ("developer" counts as system; tool messages need no id)."""
    out = []
    for i, m in enumerate(raw):
        role = {"developer": "system", "function": "tool"}.get(str(m.get("role")), str(m.get("role")))
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{i}].role: {m.get('role')!r} is not system, developer, user, assistant or tool", f"messages[{i}].role")
        try:
            calls = tuple(ToolCall.from_dict(c) for c in m.get("tool_calls") or ())
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ApiError(400, f"messages[{i}].tool_calls: each needs a function with a name and JSON arguments",
                           f"messages[{i}].tool_calls") from None
        meta = {k: m[k] for k in ("tool_call_id", "name") if m.get(k)}
        if role == "user":
            meta["source"] = "user"
        out.append(Message(role, _text(m.get("content"), f"messages[{i}].content"), calls, meta))
    return out


def tool_choice_of(choice: Any, names: list[str]) -> str:
    if choice is None:
        return "auto" if names else "none"
    if isinstance(choice, str) and choice in ("auto", "none", "required"):
        if choice == "required" and not names:
            raise ApiError(400, "tool_choice 'required' needs tools", "tool_choice")
        return choice if names else "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        if name in names:
            return str(name)
        raise ApiError(400, f"tool_choice names {name!r}, which is not one of the tools ({', '.join(names) or 'none'})", "tool_choice")
    raise ApiError(400, "tool_choice must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")


def response_tool(fmt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The tool a JSON response_format becomes (its arguments are the reply), or None for text."""
    kind = (fmt or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict) or schema.get("type", "object") != "object":
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema of type object", "response_format")
    else:
        raise ApiError(400, f"response_format.type {kind!r} must be text, json_object or json_schema", "response_format")
    return {"type": "function", "function": {"name": RESPONSE_TOOL, "description": "Write the reply as JSON.", "parameters": schema}}


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s and s in text]
    return (text[: min(hits)], True) if hits else (text, False)


class AgentRequest(pydantic.BaseModel):
    """Start an agent: a task file (on the server's disk) or a prompt with built-in or module:function tools."""

    model_config = pydantic.ConfigDict(extra="forbid")

    task: Optional[str] = None
    prompt: Optional[str] = None
    tools: list[str] = []
    name: Optional[str] = None
    priority: int = Field(0, ge=-100, le=100)
    vars: dict[str, str] = {}
    overrides: list[str] = []  # -o key=value for the task or prompt


class Service:
    """What the routes use: the loaded model (through Resources), a kernel per conversation, the
    agents started through the API, the embedder."""

    def __init__(self, settings: Any, resources: Any) -> None:
        self.settings, self.resources = settings, resources
        self.config = settings.model_copy(update={"tools": settings.tools.model_copy(update={"enabled": []}),
                                                  "memory": settings.memory.model_copy(update={"enabled": False})})
        self.backend = resources.backend(self.config.model)
        self.model_id = Path(getattr(self.backend, "path", "llmos")).stem or "llmos"
        self.model_names = {self.model_id, *ALIASES}
        self.kernels: OrderedDict[str, tuple[Any, threading.Lock]] = OrderedDict()
        self.scheduler = resources.scheduler(self.backend)
        self._lock = threading.Lock()
        self._embedder: Any = None

    def kernel(self, messages: list[Message]) -> tuple[Any, threading.Lock]:
        """The kernel of this conversation: keyed by its first system and user messages."""
        from llmos.build import build

        head = [m for m in messages if m.role == "system"][:1] + [m for m in messages if m.role == "user"][:1]
        key = hashlib.sha256(json.dumps([m.content for m in head]).encode()).hexdigest()[:16]
        with self._lock:
            if key in self.kernels:
                self.kernels.move_to_end(key)
                return self.kernels[key]
            config = self.config.model_copy(update={"agent": self.config.agent.model_copy(update={"name": f"api-{key[:6]}"})})
            entry = (build(config, resources=self.resources, trace=self.settings.trace_dir / "serve"), threading.Lock())
            self.kernels[key] = entry
            while len(self.kernels) > MAX_CONVERSATIONS:
                _, (old, _) = self.kernels.popitem(last=False)
                old.close()
            return entry

    def start_agent(self, req: AgentRequest) -> Any:
        """Build and start an agent on the shared model; returns its Process."""
        from llmos.agent import prepare, run_task
        from llmos.build import build
        from llmos.config import ConfigError, apply_overrides, merge
        from llmos.task import TaskError, load_task

        if (req.task is None) == (req.prompt is None):
            raise ApiError(400, "give either task (a task file) or prompt", "task")
        try:
            if req.task is not None:
                path = Path(req.task).expanduser().resolve()
                task = load_task(path, req.overrides, req.vars)
                if req.priority:
                    task = task.model_copy(update={"agent": task.agent.model_copy(update={"priority": req.priority})})
                kernel, folder = prepare(task, path, self.resources, self.settings.runs_dir, req.name)
                proc = kernel.process
                proc.messages = []
                proc.ended.clear()

                def work() -> None:
                    try:
                        run_task(task, path, kernel, folder, on_message=lambda m: None if m.is_delta else proc.messages.append(m))
                    finally:
                        proc.ended.set()

                threading.Thread(target=work, name=f"agent-{proc.pid}", daemon=True).start()
                return proc
            data = merge(self.config.model_dump(mode="json"), {"tools": {"enabled": req.tools},
                                                                "agent": {"name": req.name, "priority": req.priority}})
            kernel = build(type(self.config).model_validate(apply_overrides(data, req.overrides)), resources=self.resources,
                           trace=self.settings.trace_dir)
            return self.scheduler.start(kernel, req.prompt)
        except (TaskError, ConfigError, pydantic.ValidationError, ValueError) as exc:
            raise ApiError(400, " ".join(str(exc).split())[:500]) from None

    def agent(self, key: str) -> Any:
        from llmos.scheduler import NoSuchAgent

        try:
            return self.scheduler.get(key)
        except NoSuchAgent as exc:
            raise ApiError(404, str(exc)) from None

    def embed(self, texts: list[str]) -> list[list[float]]:
        if self._embedder is None:
            from llmos.memory.embed import MiniLMEmbedder

            self._embedder = MiniLMEmbedder()
        return [list(map(float, v)) for v in self._embedder(texts)]

    def close(self) -> None:
        for kernel, _ in self.kernels.values():
            kernel.close()
        self.kernels.clear()


def plan(service: Service, req: ChatRequest) -> Iterator[Message]:
    """The reply to a request as the kernel plans it: deltas, then the complete message."""
    from llmos.grammar import GrammarError, turn_grammar
    from llmos.toolbox import ToolError, as_tool

    if req.model is not None and req.model not in service.model_names:
        raise ApiError(404, f"model {req.model!r} does not exist here; this server serves {service.model_id!r} "
                            f"(also called {' or '.join(repr(n) for n in ALIASES)}; GET /v1/models lists it)", "model", "model_not_found")
    if req.n != 1:
        raise ApiError(400, "n must be 1: llmos returns one choice per request", "n")
    messages = messages_of(req.messages)
    try:
        tools = [as_tool(t) for t in req.tools or ()]
        fmt = response_tool(req.response_format)
        json_tool = as_tool(fmt) if fmt is not None else None
        for checked in (tools, [json_tool] if json_tool is not None else []):
            if checked:
                turn_grammar(checked, "required")  # a schema no grammar can take is refused now, whatever the kernel decides
    except ToolError as exc:
        raise ApiError(400, f"tools: {exc}", "tools") from None
    except GrammarError as exc:
        raise ApiError(400, f"{'tools' if req.tools else 'response_format'}: {exc}", "tools" if req.tools else "response_format") from None
    choice = tool_choice_of(req.tool_choice, [t.name for t in tools])
    base = service.config.sampling
    limit = req.max_completion_tokens or req.max_tokens
    sampling = base.model_copy(update={k: v for k, v in {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed,
                                                          "max_tokens": limit}.items() if v is not None})
    kernel, lock = service.kernel(messages)
    with lock:
        try:
            reply = None
            if tools and choice != "none":
                for reply in kernel.plan(messages, tools, tool_choice=choice, sampling=sampling):
                    if reply.is_delta and json_tool is None:
                        yield reply
                if reply is not None and (reply.tool_calls or json_tool is None):
                    yield reply
                    return
            if json_tool is not None:
                for reply in kernel.plan(messages, [json_tool], tool_choice=RESPONSE_TOOL, sampling=sampling):
                    pass
                args = dict(reply.tool_calls[0].arguments) if reply is not None and reply.tool_calls else {}
                text = json.dumps(args)
                yield Message("assistant", text, meta={"delta": True})
                yield Message("assistant", text, meta=dict(reply.meta) if reply is not None else {})
                return
            yield from kernel.plan(messages, tools, tool_choice="none", sampling=sampling)
        except ContextFull as exc:
            raise ApiError(400, f"{exc}: shorten the conversation, or start the server with a larger -o model.n_ctx",
                           "messages", "context_length_exceeded") from None
        except ValueError as exc:  # e.g. a schema that cannot become a grammar
            raise ApiError(400, str(exc)) from None


def _usage(meta: Any) -> dict[str, Any]:
    stats = (meta or {}).get("stats") or {}
    prompt, done = int(stats.get("prompt_tokens", 0)), int(stats.get("generated_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": int(stats.get("cached_tokens", 0))}}


def _finish(reply: Message, stopped: bool) -> str:
    if reply.tool_calls:
        return "tool_calls"
    return "length" if not stopped and ((reply.meta.get("stats") or {}).get("stop") == "length") else "stop"


def completion(service: Service, req: ChatRequest) -> dict[str, Any]:
    """A non-streamed chat completion."""
    reply = None
    for reply in plan(service, req):
        pass
    assert reply is not None
    calls = reply.tool_calls if req.parallel_tool_calls else reply.tool_calls[:1]
    content, stopped = _cut_at_stop(reply.content, [req.stop] if isinstance(req.stop, str) else req.stop or [])
    message: dict[str, Any] = {"role": "assistant", "content": None if calls else content}
    if calls:
        message["tool_calls"] = [c.to_dict() for c in calls]
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion", "created": int(time.time()),
            "model": service.model_id, "system_fingerprint": "llmos",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(reply, stopped)}],
            "usage": _usage(reply.meta)}


def chunks(service: Service, req: ChatRequest) -> Iterator[dict[str, Any]]:
    """A streamed chat completion as chunk objects (the route frames them as server-sent events)."""
    stops = [req.stop] if isinstance(req.stop, str) else [s for s in req.stop or [] if s]
    head = {"id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion.chunk", "created": int(time.time()),
            "model": service.model_id, "system_fingerprint": "llmos"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    held, sent, stopped, reply = "", "", False, None  # held: the answer so far; sent: what went out
    for reply in plan(service, req):
        if not reply.is_delta:
            break
        held = (held + reply.content).lstrip()
        if stopped or "<tool_call>".startswith(held[:11]):
            continue  # a call goes out as tool_calls at the end; nothing after a stop string goes out
        text, stopped = _cut_at_stop(held, stops)
        safe = text if stopped else text[: len(text) - max((len(s) - 1 for s in stops), default=0)]  # a stop may be starting
        if len(safe) > len(sent):
            yield chunk({"content": safe[len(sent):]})
            sent = safe
    assert reply is not None
    calls = reply.tool_calls if req.parallel_tool_calls else reply.tool_calls[:1]
    if calls:
        for i, c in enumerate(calls):
            yield chunk({"tool_calls": [{"index": i, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}]})
            args = json.dumps(dict(c.arguments))
            for piece in (args[j:j + 16] for j in range(0, len(args), 16)):
                yield chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
    else:
        final, cut = _cut_at_stop(reply.content, stops)  # the complete answer (a repeat may have been cut from it)
        stopped = stopped or cut
        if final.startswith(sent) and len(final) > len(sent):
            yield chunk({"content": final[len(sent):]})
    yield chunk({}, _finish(reply, stopped))
    if (req.stream_options or {}).get("include_usage"):
        yield {**head, "choices": [], "usage": _usage(reply.meta)}


def sse(head: list[dict[str, Any]], stream: Iterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Chunks as server-sent events. A thread of its own drives the stream and hands the events to
    the event loop (what has piled up goes out in one write); when the client goes away (the
    response is cancelled), it stops at the next chunk and closes the stream, so the turn ends and
    its model slot is given back."""
    import asyncio

    gone = threading.Event()

    def produce(put: Callable[[str | None], None]) -> None:
        try:
            for c in head:
                put(f"data: {json.dumps(c)}\n\n")
            for c in stream:
                if gone.is_set():
                    return
                put(f"data: {json.dumps(c)}\n\n")
            put("data: [DONE]\n\n")
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in it, as OpenAI does
            put(f"data: {json.dumps(ApiError(500, f'{type(exc).__name__}: {exc}').body())}\n\n")
        finally:
            stream.close()
            put(None)

    async def events() -> AsyncIterator[str]:
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()  # type: ignore[var-annotated]

        def put(item: str | None) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (the server is stopping)
                gone.set()

        threading.Thread(target=produce, args=(put,), name="llmos-sse", daemon=True).start()
        try:
            while True:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                text = "".join(i for i in items if i is not None)
                if text:
                    yield text
                if items[-1] is None:
                    return
        finally:
            gone.set()

    return events()


def app(service: Service, api_key: str | None = None, hosts: tuple[str, ...] = LOCAL_HOSTS) -> Any:
    """The ASGI application over a Service."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    api = FastAPI(title="llmos", docs_url=None, redoc_url=None, openapi_url=None)

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @api.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]").lower()
        if host not in hosts:
            return error(ApiError(403, f"Host {host!r} is not served here (DNS rebinding?); use one of: {', '.join(hosts)}"))
        origin = request.headers.get("origin")
        if origin is not None:
            from urllib.parse import urlsplit

            if (urlsplit(origin).hostname or "").lower() not in hosts:
                return error(ApiError(403, f"Origin {origin!r} may not call this server (no cross-origin requests)"))
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"))
        return await call_next(request)

    @api.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc)

    @api.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(ApiError(400, f"{where or 'body'}: {first.get('msg')}", where or None))

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(ApiError(exc.status_code, str(exc.detail)))

    @api.get("/v1/models")
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0, "owned_by": "llmos"}]}

    @api.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> Any:
        if not req.stream:
            return completion(service, req)
        stream = chunks(service, req)
        first = next(stream)  # problems with the request surface here, as a 400, before the stream starts
        try:
            second = next(stream)
        except StopIteration:
            second = None

        head = [first, second] if second is not None else [first]
        return StreamingResponse(sse(head, stream), media_type="text/event-stream")

    @api.post("/v1/embeddings")
    def embeddings(body: dict[str, Any]) -> dict[str, Any]:
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "input must be a string or a list of strings", "input")
        vectors = service.embed(texts)
        return {"object": "list", "model": "all-MiniLM-L6-v2",
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": sum(len(t.split()) for t in texts), "total_tokens": sum(len(t.split()) for t in texts)}}

    @api.post("/v1/agents")
    def start_agent(req: AgentRequest) -> dict[str, Any]:
        return service.start_agent(req).row()

    @api.get("/v1/agents")
    def agents() -> dict[str, Any]:
        return {"object": "list", "data": service.scheduler.ps()}

    @api.get("/v1/agents/{key}")
    def agent(key: str) -> dict[str, Any]:
        proc = service.agent(key)
        return {**proc.row(), "messages": [m.to_dict() for m in list(proc.messages)]}

    @api.get("/v1/agents/{key}/events")
    def events(key: str) -> Any:
        proc = service.agent(key)

        def stream() -> Iterator[str]:
            sent = 0
            while True:
                ended = proc.ended.is_set()
                for m in list(proc.messages)[sent:]:
                    sent += 1
                    yield f"data: {json.dumps(m.to_dict(), default=str)}\n\n"
                if ended:
                    break
                proc.ended.wait(0.1)
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    @api.post("/v1/agents/{key}/{action}")
    def control(key: str, action: str) -> dict[str, Any]:
        if action not in ("pause", "resume", "stop"):
            raise ApiError(404, f"no action {action!r}: use pause, resume or stop")
        service.agent(key)
        return getattr(service.scheduler, action)(key).row()

    return api
