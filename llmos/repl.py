"""The interactive shell: prompt_toolkit input, rich output, streaming, slash commands.

The prompt appears before the model is loaded (loading runs on a thread), so the shell is usable
at once; the first question waits for the load if it has not finished.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any, Callable

from llmos.config import Settings
from llmos.messages import Message, ToolCall
from rich.markup import escape

from llmos.render import MessagePrinter, err, out

COMMANDS = {
    "/help": "this list",
    "/tools": "the enabled tools",
    "/mcp": "/mcp add NAME COMMAND...: start an MCP server (stdio) and offer its tools as NAME_<tool>",
    "/model": "show the model; /model PATH switches to another GGUF",
    "/memory": "context window usage; /memory QUERY searches long-term memory",
    "/ps": "agents in this shell: id, priority, state, steps, tokens, budgets",
    "/run": "/run TASK.yaml [PRIORITY]: start a task file as a background agent on this model",
    "/pause": "/pause ID: give an agent no more model turns until /resume ID",
    "/resume": "/resume ID: let a paused agent decode again",
    "/stop": "/stop ID: stop an agent at its next safe point",
    "/trace": "where this session's JSONL trace is",
    "/expand": "show the last tool calls and results in full",
    "/save": "/save FILE: write the conversation as JSON lines",
    "/load": "/load FILE: replace the conversation with a saved one",
    "/reset": "forget the conversation",
    "/exit": "leave (Ctrl-D works too)",
}


class Shell:
    """One interactive session: a kernel, its tools, and the commands around it."""

    def __init__(self, settings: Settings) -> None:
        import time

        from llmos.build import Resources
        from llmos.scheduler import Publisher

        self.settings = settings
        self.run_dir = settings.runs_dir / ("shell-" + time.strftime("%Y%m%d-%H%M%S"))
        self.always: set[str] = set()
        self.kernel: Any = None
        self._error: BaseException | None = None
        self._noted = False
        # shared with background agents (/run); publishes the table for `llmos ps` in another terminal
        self.resources = Resources(Publisher("shell"), home=settings.home)
        self.notices: "queue.Queue[str]" = queue.Queue()  # background agents' endings, shown at the next prompt
        self.background: dict[str, threading.Thread] = {}
        self._loader = threading.Thread(target=self._load, daemon=True)
        self._loader.start()

    # -- model loading ----------------------------------------------------------------------
    def _load(self) -> None:
        """Build the shell's kernel behind the prompt. Long-term memory is left off, with the
        reason, when the store is busy (another shell holds it) or cannot be opened."""
        from llmos.build import build
        from llmos.memory.store import StoreError

        config = self.settings.model_copy(update={"agent": self.settings.agent.model_copy(update={"name": "shell"})})
        try:
            try:
                self.kernel = build(config, resources=self.resources, artifacts=self.run_dir,
                                    trace=self.settings.trace_dir, approve=self.approve)
            except StoreError as exc:
                err.print(f"[yellow]memory off: {exc}[/yellow]")
                config = config.model_copy(update={"memory": config.memory.model_copy(update={"enabled": False})})
                self.kernel = build(config, resources=self.resources, artifacts=self.run_dir,
                                    trace=self.settings.trace_dir, approve=self.approve)
        except BaseException as exc:  # noqa: BLE001 - reported at the next prompt, the shell stays up
            self._error = exc

    @property
    def scheduler(self) -> Any:
        return self.kernel.scheduler if self.kernel is not None else None

    @property
    def store(self) -> Any:
        return self.kernel.memory.store if self.kernel is not None else None

    def ready(self) -> bool:
        if self.kernel is None and self._loader.is_alive():
            with err.status("loading the model…"):
                self._loader.join()
        if self._error is not None:
            err.print(f"[red]llmos: error: {self._error}[/red]")
            self._error = None
            return False
        if self.kernel is not None and not self._noted:
            self._noted = True  # the model's notices (e.g. running on CPU), once
            for note in self.kernel.backend.notes:
                err.print(f"[dim]{note}[/dim]")
        return self.kernel is not None

    # -- approvals ----------------------------------------------------------------------------
    def approve(self, call: ToolCall, why: str) -> bool:
        """The policy's question (llmos/policy.py): a call that untrusted content may be driving.
        "always" lets this tool through for the rest of the session."""
        if call.name in self.always:
            return True
        args = json.dumps(dict(call.arguments))[:400]
        err.print(f"[yellow]policy: {escape(call.name)}({escape(args)})\n  why it asks: {escape(why)}[/yellow]")
        answer = self.ask(f"allow this call? [y]es / [n]o / [a]lways {call.name} this session: ").strip().lower()
        if answer.startswith("a"):
            self.always.add(call.name)
            return True
        return answer.startswith("y")

    ask: Callable[[str], str] = staticmethod(input)

    # -- one question ---------------------------------------------------------------------------
    def ask_model(self, text: str) -> None:
        import signal

        printer = MessagePrinter()

        def interrupt(signum: int, frame: Any) -> None:
            # The first Ctrl-C asks the kernel to stop at its next token or step (a safe point, not
            # inside a write to the terminal); a second one interrupts at once (e.g. a slow tool).
            if self.kernel is None or self.kernel.stop.is_set():
                raise KeyboardInterrupt
            self.kernel.stop.set()

        previous = signal.signal(signal.SIGINT, interrupt)
        try:
            if not self.ready():
                return
            for message in self.kernel.run(text, stream=True):
                printer(message)
                if message.role == "tool" and not message.is_delta:
                    self._show_files(message)
        except KeyboardInterrupt:
            out.print("\n[yellow]^C stopped[/yellow]")
        finally:
            signal.signal(signal.SIGINT, previous)
            if self.kernel is not None:
                self.kernel.stop.clear()

    def _show_files(self, message: Message) -> None:
        for word in message.content.split():
            p = Path(word.strip("'\",;"))
            if p.suffix in (".png", ".jpg", ".svg", ".pdf", ".csv") and p.is_absolute() and p.exists():
                out.print(f"[magenta]  file: {p}[/magenta]")

    # -- slash commands ---------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Run a slash command; False means leave the shell."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            for cmd, text in COMMANDS.items():
                out.print(f"[bold]{cmd:8}[/bold] {text}")
            out.print("Enter sends; Alt-Enter (or Esc then Enter) adds a line; Ctrl-C stops a reply; Ctrl-D leaves.")
        elif name == "/tools":
            from llmos.render import tools_table

            if self.ready():
                tools_table(list(self.kernel.tools))
        elif name == "/mcp":
            self._mcp(arg)
        elif name == "/trace":
            if self.ready():
                out.print(str(self.kernel.trace.path))
        elif name == "/reset":
            if self.ready():
                self.kernel.reset()
                out.print("conversation cleared")
        elif name == "/model":
            self._model(arg)
        elif name == "/memory":
            self._memory(arg)
        elif name == "/ps":
            from llmos.render import agents_table

            agents_table(self.scheduler.ps() if self.scheduler is not None else [])
            if self.kernel is None:
                out.print("(the model is still loading)")
        elif name in ("/pause", "/resume", "/stop"):
            self._control(name[1:], arg)
        elif name == "/run":
            self._start_task(arg)
        elif name == "/expand":
            self._expand()
        elif name == "/save":
            self._save(arg)
        elif name == "/load":
            self._load_file(arg)
        else:
            out.print(f"[red]unknown command {name}[/red]; /help lists them")
        return True

    def _mcp(self, arg: str) -> None:
        """`/mcp add NAME COMMAND...`: an MCP server's tools join this shell's (policy and trust as in tools.mcp)."""
        import shlex

        from llmos.config import McpServer
        from llmos.toolbox import ToolError
        from llmos.tools.mcp import connect

        words = shlex.split(arg)
        if len(words) < 3 or words[0] != "add":
            out.print("usage: /mcp add NAME COMMAND... (e.g. /mcp add time python -m mcp_server_time)")
            return
        if not self.ready():
            return
        try:
            spec = McpServer(name=words[1], command=words[2:])
            tools = connect(spec, self.settings.home, lambda server, why: self.approve(ToolCall(f"mcp:{server}", {}), why))
        except (ValueError, ToolError) as exc:
            err.print(f"[red]llmos: error: {' '.join(str(exc).split())}[/red]")
            return
        for t in tools:
            self.kernel.tools.add(t)  # closed with the kernel's tools
        out.print(f"MCP server {spec.name}: {', '.join(t.name for t in tools) or 'no tools'}")

    def _control(self, action: str, arg: str) -> None:
        from llmos.scheduler import NoSuchAgent

        if not arg:
            out.print(f"usage: /{action} ID (ids and names: /ps)")
            return
        if not self.ready():
            return
        try:
            proc = getattr(self.scheduler, action)(arg)
        except NoSuchAgent as exc:
            err.print(f"[red]llmos: error: {exc}[/red]")
            return
        out.print(f"agent {proc.pid} ({proc.name}): {dict(pause='paused', resume='resumed', stop='stopping')[action]}")

    def _start_task(self, arg: str) -> None:
        """Run a task file as a background agent on the shell's model and scheduler."""
        from llmos.agent import prepare, run_task
        from llmos.cli import _errors
        from llmos.task import TaskError, load_task

        words = arg.split()
        if not words or (len(words) == 2 and not words[1].lstrip("-").isdigit()) or len(words) > 2:
            out.print("usage: /run TASK.yaml [PRIORITY]")
            return
        path = Path(words[0]).expanduser()
        try:
            task = load_task(path)
            if len(words) == 2:
                task = task.model_copy(update={"agent": task.agent.model_copy(update={"priority": int(words[1])})})
        except TaskError as exc:
            err.print(f"[red]llmos: error: {exc}[/red]")
            return
        if not self.ready():
            return
        taken = {row["name"] for row in self.scheduler.ps()}
        name = base = task.agent.name or path.stem
        n = 1
        while name in taken:
            n += 1
            name = f"{base}-{n}"
        if task.model != self.settings.model:
            out.print(f"[yellow]{name}: runs on the shell's model (its task file asks for another model or loading)[/yellow]")
            task = task.model_copy(update={"model": self.settings.model})
        try:
            kernel, folder = prepare(task, path, self.resources, self.settings.runs_dir, name)
        except (*_errors(), OSError) as exc:
            err.print(f"[red]llmos: error: {exc}[/red]")
            return

        def work() -> None:
            try:
                result = run_task(task, path, kernel, folder)
                status = "passed" if result["passed"] else result["status"] if result["status"] != "finished" else "checks failed"
                self.notices.put(f"agent {name} {status}: {' '.join(result['answer'].split())[:120]!r} "
                                 f"— {Path(result['artifacts']) / 'result.json'}")
            except Exception as exc:  # noqa: BLE001 - reported at the next prompt; other agents carry on
                self.notices.put(f"agent {name} failed: {type(exc).__name__}: {exc}")

        thread = threading.Thread(target=work, name=f"agent-{name}", daemon=True)
        self.background[name] = thread
        thread.start()
        out.print(f"started agent {name} (priority {kernel.process.priority}); /ps shows it, /stop {name} ends it")

    def show_notices(self) -> None:
        while not self.notices.empty():
            out.print(f"[cyan]{self.notices.get()}[/cyan]")

    def _memory(self, query: str) -> None:
        if not self.ready():
            return
        backend, window = self.kernel.backend, self.kernel.memory
        if query:
            if self.store is None:
                out.print("no long-term memory in this shell")
                return
            for hit in self.store.search(query, k=5):
                out.print(f"[bold]{hit.source or hit.kind}[/bold] (part {hit.position}): {' '.join(hit.text.split())[:300]}")
            return
        used = backend.count(window.view(), list(self.kernel.tools))
        where = f"long-term store {self.store.path} ({self.store.count()} chunks)" if self.store is not None else "no long-term store"
        out.print(f"context window: {used} / {backend.n_ctx} tokens ({100 * used / backend.n_ctx:.1f}%), "
                  f"{len(window.messages)} messages, {window.paged_out} paged out, {len(window.core)} core facts; {where}")

    def _expand(self) -> None:
        """The last turn's tool calls and results, unabridged (the live view shows one line each)."""
        if self.kernel is None:
            return
        recent: list[Message] = []
        for m in reversed(self.kernel.messages):
            if m.role == "user":
                break
            if m.role == "tool" or m.tool_calls:
                recent.insert(0, m)
        if not recent:
            out.print("no tool calls since the last question")
        for m in recent:
            if m.tool_calls:
                for c in m.tool_calls:
                    out.print(f"[cyan]→ {c.name}[/cyan] {json.dumps(dict(c.arguments), indent=2)}", markup=True)
            else:
                out.print(f"[green]← {m.meta.get('name', 'tool')}[/green]", markup=True)
                out.print(m.content, markup=False)

    def _model(self, arg: str) -> None:
        if not self.ready():
            return
        if not arg:
            out.print(self.kernel.backend.name)
            return
        busy = [name for name, thread in self.background.items() if thread.is_alive()]
        if busy:
            err.print(f"[red]llmos: error: agents {', '.join(busy)} still run on this model; /stop them first[/red]")
            return
        from llmos.gguf import ModelFileError

        model = self.settings.model.model_copy(update={"path": arg})
        self.kernel.backend.forget(self.kernel.key)
        try:
            with err.status(f"loading {arg}…"):
                backend = self.resources.switch(self.settings.model, model)
        except ModelFileError as exc:
            err.print(f"[red]llmos: error: {exc}[/red]")
            return
        self.kernel.backend = backend
        self.settings = self.settings.model_copy(update={"model": model})
        out.print(f"switched to {backend.name}")

    def _save(self, arg: str) -> None:
        if not arg or not self.ready():
            out.print("usage: /save FILE")
            return
        from llmos.agent import write_atomic

        path = Path(arg).expanduser()
        lines = [m.to_dict() for m in self.kernel.messages]
        write_atomic(path, "".join(json.dumps(l, default=str) + "\n" for l in lines))
        out.print(f"saved {len(lines)} messages to {path}")

    def _load_file(self, arg: str) -> None:
        if not arg or not self.ready():
            out.print("usage: /load FILE")
            return
        path = Path(arg).expanduser()
        try:
            messages = [Message.from_dict(json.loads(l)) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            err.print(f"[red]llmos: error: {path}: not a saved session ({exc})[/red]")
            return
        self.kernel.messages = messages
        out.print(f"loaded {len(messages)} messages from {path}")

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop_all()
        for thread in self.background.values():
            thread.join(timeout=30)  # each writes its result.json on the way out
        self._loader.join()
        if self.kernel is not None:
            self.kernel.close()  # its tools and cached state
        self.resources.close()  # the model, the store, the `llmos ps` table


def run_shell(settings: Settings) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings

    import signal

    # Ctrl-C must stop a reply even when the shell was started with SIGINT ignored (as background
    # jobs of non-interactive shells are), since Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    settings.home.mkdir(parents=True, exist_ok=True)
    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    session: PromptSession = PromptSession(
        history=FileHistory(str(settings.home / "history")),
        completer=WordCompleter(list(COMMANDS), sentence=True),
        key_bindings=keys,
    )
    shell = Shell(settings)
    shell.ask = lambda text: session.prompt(text)
    out.print("[bold]llmos[/bold] — ask anything; /help for commands, Ctrl-D to leave.")
    try:
        while True:
            shell.show_notices()
            try:
                line = session.prompt("llmos> ", multiline=False)
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if not line.strip():
                continue
            if line.strip().startswith("/"):
                if not shell.command(line):
                    break
                continue
            shell.ask_model(line)
    finally:
        shell.close()
