"""The model backend protocol: everything the kernel and the front doors ask of a model.

One implementation loads a GGUF in-process (`llmos.llama.LlamaBackend`); the scripted fake lives in
`llmos.testing`. A new backend (a remote OpenAI-compatible server, say) is written from this
Protocol alone: nothing outside it may be probed for.
"""

from __future__ import annotations

from typing import Iterator, Protocol, Sequence

from llmos.config import Sampling
from llmos.messages import Message
from llmos.toolbox import Tool


class ContextFull(RuntimeError):
    """The conversation no longer fits in the model's context window."""


class Backend(Protocol):
    """A model, shared by any number of agents; up to `slots` turns at a time.

    n_ctx: the context window in tokens; prompts and replies together must fit in it.

    name: one line for people naming the model, e.g. `SmolLM2-135M-Instruct (llama, 135M
    parameters, Q4_1) — /path/to/file.gguf` (what the shell's /model prints).

    notes: one-line notices a front door shows once the model is ready (e.g. why the GPU is not
    used); empty when there is nothing to say.

    slots: how many turns may run at once (turn() is thread-safe and waits when all are taken);
    the scheduler admits that many agents. A backend without it counts as 1.
    """

    n_ctx: int
    slots: int
    name: str
    notes: tuple[str, ...]

    def turn(self, messages: Sequence[Message], tools: Sequence[Tool], tool_choice: str = "auto",
             agent: str = "main", sampling: Sampling | None = None, prefix: str = "") -> Iterator[Message]:
        """Decode one assistant turn: yields `Message("assistant", piece, meta={"delta": True})` as
        text streams, then the complete assistant Message (text, or tool calls with parsed arguments;
        meta["stats"] counts at least prompt_tokens, evaluated_tokens and generated_tokens, and
        meta["raw"], if set, is the text as generated).
        tool_choice: "auto" | "required" | "none" | a tool name. agent: whose conversation this is,
        each agent keeps its own cached context. sampling: replaces the backend's default for this
        turn. prefix: with tool_choice "none", the answer begins with this text (already said; the
        model continues it). A tool's `constraint`, when set, is the schema its calls must satisfy
        (the prompt still shows its `parameters`). Raises ContextFull when the prompt does not fit
        in n_ctx, GrammarError when the tools give an unusable grammar (or tool_choice names no tool)."""
        ...

    def count(self, messages: Sequence[Message], tools: Sequence[Tool]) -> int:
        """Tokens the prompt for `messages` and `tools` takes (the window's budget is counted with this)."""
        ...

    def forget(self, agent: str) -> None:
        """Drop what is cached for `agent` (its conversation ended); unknown agents are ignored."""
        ...

    def close(self) -> None:
        """Release the model; safe to call more than once. The backend is unusable afterwards."""
        ...
