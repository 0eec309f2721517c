"""The kernel loop: conversation in, answer or tool calls out, tools run, repeat within a budget."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Iterator, Mapping, Sequence

from llmos.backend import Backend, ContextFull
from llmos.config import Config
from llmos.decide import Router, read_call, second_pass, says
from llmos.memory.window import Memory
from llmos.messages import Message, ToolCall, Trace
from llmos.policy import Policy, Window
from llmos.scheduler import Scheduler, Stopped
from llmos.toolbox import Toolbox, as_tool

SOURCE = {"assistant": "model", "user": "user"}  # provenance of a message that does not say (kernel, system: their role)
DONE = {"answer": "done", "max_steps": "done", "timeout": "done", "tokens": "done",
        "stopped": "stopped", "interrupted": "stopped", "abandoned": "stopped"}  # exit -> process state


class Kernel:
    """A model with tools and memory. `run` yields Messages; `complete` plans one turn, runs nothing.
    Most callers get one from `llmos.build`. backend: the model, never closed here (its maker
    does). tools: @tool functions, typed functions or OpenAI tool dicts. memory: window and store.
    config: a Config or a dict of one (sampling, budget, tool_choice, agent). scheduler: shared by
    kernels on one backend. approve: `approve(call, why) -> bool`, asked when the policy (config
    `policy`, llmos/policy.py) wants a person to decide; without it such calls are decided by
    `policy.unattended`. trace: a .jsonl file or a folder. router: decides in auto mode whether a
    turn needs a tool, and which (llmos.decide)."""

    def __init__(self, backend: Backend, tools: Iterable[Any] = (), *, memory: Memory | None = None,
                 config: Config | Mapping[str, Any] | None = None, scheduler: Scheduler | None = None,
                 approve: Callable[[ToolCall, str], bool] | None = None, trace: str | Path | Trace | None = None,
                 router: Router | None = None) -> None:
        self.backend = backend
        self.config = config if isinstance(config, Config) else Config.model_validate(config or {})
        self.memory = memory if memory is not None else Memory()
        if self.memory.system is None:
            self.memory.system = self.config.agent.system
        self.tools = Toolbox([*tools, *self.memory.tools()])
        self.approve, self.router = approve, router
        self.policy = Policy(self.config.policy.tools, self.config.policy.unattended)
        self.trace = trace if isinstance(trace, Trace) else Trace.at(trace)
        self.name = self.config.agent.name or self.trace.path.stem
        self.key = f"{self.name}#{uuid.uuid4().hex[:8]}"  # backends keep one cached context per key
        self.scheduler = scheduler or Scheduler(slots=getattr(backend, "slots", 1))
        budget = self.config.budget
        self.process = self.scheduler.spawn(self.name, priority=self.config.agent.priority, max_steps=budget.steps,
                                            max_tokens=budget.tokens, max_seconds=budget.seconds)
        self.owned: list[Any] = []  # closed with this kernel: what build() made for it alone

    @property
    def stop(self) -> Any:
        """Set (from any thread) to end the run at its next safe point, with exit "stopped"."""
        return self.process.stop

    @property
    def messages(self) -> list[Message]:
        """The conversation in the window (the system prompt and memory regions excluded)."""
        return self.memory.messages

    @messages.setter
    def messages(self, messages: list[Message]) -> None:
        self.memory.messages = list(messages)

    def reset(self) -> None:
        """Forget the conversation (the system prompt and core memory stay)."""
        self.memory.reset()

    def run(self, prompt: str, *, stream: bool = False, tool_choice: str | None = None) -> Iterator[Message]:
        """Run until the model answers. tool_choice (default: the config's) applies to the first
        turn: auto | required | none | a tool name. With stream=True, tokens arrive as assistant
        Messages with meta {"delta": True} before each complete message. Every run ends with a
        kernel message with meta {"exit": answer | max_steps | timeout | tokens | stopped}."""
        try:
            yield from self._run(prompt, stream, tool_choice or self.config.tools.tool_choice)
        except (KeyboardInterrupt, GeneratorExit) as exc:  # Ctrl-C, or the caller stopped reading
            if self.process.state not in ("done", "stopped"):  # the ending goes into the trace too
                why = "interrupted" if isinstance(exc, KeyboardInterrupt) else "abandoned"
                self._end(why, f"run {why}", None)
            raise
        except BaseException as exc:
            self.scheduler.set_state(self.process, "failed", f"{type(exc).__name__}: {exc}")
            raise

    def _run(self, prompt: str, stream: bool, choice: str) -> Iterator[Message]:
        yield self._add(self.memory.user_turn(prompt))
        budget, seen, used, step, prefix, decided, read, routed = self.config.budget, set(), 0, 0, "", False, None, None
        if choice == "auto" and self.router is not None and len(self.tools):
            decision = self.router.decide(prompt, list(self.tools))  # the kernel decides: a tool, or an answer
            yield self._add(decision.message())
            choice, decided, routed = decision.tool or "none", decision.tool is not None, decision.tool
        if decided and budget.steps > 1:  # a call the request states plainly needs no model turn
            read = read_call(self.tools.get(choice), prompt)
        deadline = time.monotonic() + budget.seconds if budget.seconds else None
        try:
            for step in range(1, budget.steps + 1):
                if deadline is not None and time.monotonic() > deadline:
                    yield self._end("timeout", f"time budget of {budget.seconds:g} s exhausted", step - 1)
                    return
                if budget.tokens is not None and used >= budget.tokens:
                    yield self._end("tokens", f"token budget of {budget.tokens} exhausted ({used} used)", step - 1)
                    return
                if step == budget.steps and len(self.tools) and choice != "none":
                    choice = "none"  # the last step must answer, so every run ends on an answer
                    yield self._add(Message("kernel", "last step: the model must answer", meta={"event": "force_answer", "why": "last_step"}))
                if read is not None:
                    yield self._add(read[1])
                    reply, read = read[0], None
                else:
                    reply = yield from self._turn(choice, stream, prefix)
                if reply.tool_calls and choice in self.tools and not reply.meta.get("read"):  # a call the kernel or the user chose: is it sound?
                    reply, notice = second_pass(reply, list(self.tools), prompt, lambda ts, name: self._reply(self.memory.view(), ts, name), decided)
                    if notice is not None:
                        yield self._add(notice)
                        used += notice.meta["extra_tokens"]
                spent = sum((reply.meta.get("stats") or {}).get(k, 0) for k in ("evaluated_tokens", "generated_tokens"))
                self.scheduler.count(self.process, steps=1, tokens=spent)
                used += spent
                yield self._add(reply)
                if not reply.tool_calls:
                    if str(reply.meta.get("raw", "")).startswith("<tool_call>") and step < budget.steps:
                        yield self._add(Message("kernel", "tool call cut off at the token limit; asking for an answer", meta={"event": "cutoff"}))
                        choice = "none"
                        continue
                    yield self._end("max_steps" if step == budget.steps and step > 1 else "answer", reply.content, step)
                    return
                if self.stop.is_set():
                    raise Stopped(self.name)
                results = yield from self._call(reply.tool_calls, routed)
                if decided:  # the kernel chose this call: the answer follows, stating the result as the tool says it
                    choice, prefix = "none", says(self.tools.get(reply.tool_calls[0].name), reply.tool_calls[0], results[0]) if len(results) == 1 else ""
                    continue
                keys = {json.dumps([c.name, dict(c.arguments)], sort_keys=True, default=str) for c in reply.tool_calls}
                choice = "none" if keys <= seen else "auto"
                if keys <= seen:  # the same calls again: stop looping, answer
                    yield self._add(Message("kernel", "repeated call: the model must answer", meta={"event": "force_answer", "why": "repeated_call"}))
                seen |= keys
        except Stopped:
            yield self._end("stopped", f"agent {self.name} stopped", step)
            return
        yield self._end("max_steps", "step budget exhausted", budget.steps)

    def _call(self, calls: Sequence[ToolCall], routed: str | None) -> Generator[Message, None, list[Message]]:
        """Run a turn's calls, each decided by the policy first (its decisions go into the trace;
        a denied call's result tells the model why); returns the results in call order."""
        window, refused = Window.of(self.memory.view()), {}
        for call in calls:
            verdict = self.policy.check(call, self.tools.get(call.name), window, routed)
            if verdict is None:
                continue
            verdict = self.policy.resolve(verdict, call, self.approve)
            yield self._add(verdict.message(call))
            if verdict.decision == "deny":
                refused[call.id] = f"the policy did not allow this call to {call.name!r}: {verdict.why}"
        self.scheduler.set_state(self.process, "waiting")
        results = self.tools.call_all(calls, refused)
        for result in results:
            yield self._add(result)
        return results

    def _turn(self, choice: str, stream: bool, prefix: str = "") -> Generator[Message, None, Message]:
        """One model turn, after fitting the window into the context; yields memory notices and
        (when streaming) tokens, returns the reply. A window that still does not fit evicts."""
        count = lambda msgs: self.backend.count(msgs, list(self.tools))  # noqa: E731
        for notice in self.memory.fit(count, self.backend.n_ctx, self._summary):
            yield self._add(notice)
        while True:
            try:
                with self.scheduler.turn(self.process):
                    for msg in self.backend.turn(self.memory.view(), list(self.tools), choice, self.key, self.config.sampling, prefix):
                        if self.stop.is_set():
                            raise Stopped(self.name)
                        if not msg.is_delta:
                            return msg
                        if stream:
                            yield msg
                raise RuntimeError("backend ended a turn without a message")
            except ContextFull as exc:
                notice = self.memory.evict(str(exc))
                if notice is None:
                    raise
                yield self._add(notice)

    def _add(self, message: Message) -> Message:
        if not message.is_delta and "source" not in message.meta:  # provenance on every message
            message = Message(message.role, message.content, message.tool_calls,
                              {**message.meta, "source": SOURCE.get(message.role, message.role)})
        if not message.is_delta:
            self.memory.add(message)
            self.trace.write(message)
        return message

    def _end(self, exit: str, text: str, steps: int | None) -> Message:
        """The last message of every run, in the trace and the process table."""
        self.scheduler.set_state(self.process, DONE[exit], exit)
        return self._add(Message("kernel", text, meta={"exit": exit, "steps": steps}))

    def _summary(self, messages: list[Message]) -> str:
        """The model's reply to the memory's summary request ("" when it does not fit)."""
        try:
            return self._reply(messages, list(self.tools), "none").content
        except ContextFull:
            return ""

    def _reply(self, messages: Sequence[Message], tools: list[Any], choice: str, sampling: Any = None) -> Message:
        for msg in self._stream(messages, tools, choice, sampling):
            if not msg.is_delta:
                return msg
        raise RuntimeError("backend ended a turn without a message")

    def _stream(self, messages: Sequence[Message], tools: list[Any], choice: str, sampling: Any = None) -> Iterator[Message]:
        with self.scheduler.turn(self.process):
            yield from self.backend.turn(messages, tools, choice, self.key, sampling or self.config.sampling)

    def complete(self, messages: Sequence[Mapping[str, Any] | Message], tools: Iterable[Any] = (), *,
                 tool_choice: str = "auto", sampling: Any = None) -> Message:
        """The model's next message for OpenAI-style messages and tools; nothing is executed. It is
        decided as in `run` (routed in auto mode, a chosen call checked); meta says how.
        sampling: a `Sampling` for this turn (default: the config's)."""
        *_, reply = self.plan(messages, tools, tool_choice=tool_choice, sampling=sampling)
        return reply

    def plan(self, messages: Sequence[Mapping[str, Any] | Message], tools: Iterable[Any] = (), *,
             tool_choice: str = "auto", sampling: Any = None) -> Iterator[Message]:
        """`complete`, streamed: the turn's tokens as delta messages, then the complete message."""
        if isinstance(messages, (str, Mapping)):
            raise TypeError("messages must be a list of messages, e.g. [{'role': 'user', 'content': '...'}]")
        msgs, tools = [m if isinstance(m, Message) else Message.from_dict(m) for m in messages], [as_tool(t) for t in tools]
        request, meta = next((m.content for m in reversed(msgs) if m.role == "user"), ""), {}
        if tool_choice == "auto" and self.router is not None and tools:
            meta["route"] = (decision := self.router.decide(request, tools)).message().meta
            tool_choice = decision.tool or "none"
        reply = None
        for reply in self._stream(msgs, tools, tool_choice, sampling):
            if reply.is_delta:
                yield reply
        assert reply is not None and not reply.is_delta, "backend ended a turn without a message"
        if reply.tool_calls:
            reply, notice = second_pass(reply, tools, request, lambda ts, name: self._reply(msgs, ts, name, sampling))
            meta.update({"system2": notice.meta} if notice is not None else {})
        yield Message(reply.role, reply.content, reply.tool_calls, {**reply.meta, **meta})

    def close(self) -> None:
        """Release this agent's tools and its cached state in the backend, and what build() made
        for this kernel alone. A shared backend is closed by its owner, not here."""
        self.backend.forget(self.key)
        for close in [t.close for t in self.tools if t.close is not None] + [thing.close for thing in self.owned]:
            close()
        self.owned.clear()

    def __enter__(self) -> "Kernel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
