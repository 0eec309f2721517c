"""The config tree and the composition root: every field reaches the kernel, from a task file and
from -o; moved keys say where they went; every front door builds through llmos.build; every
ending of a run is a message; the last-resort eviction keeps what it drops."""

import json
import re
import sys
import threading
from pathlib import Path

import pydantic
import pytest
import yaml

from llmos import Kernel, tool
from llmos.agent import prepare, run_task
from llmos.backend import ContextFull
from llmos.build import Resources, build
from llmos.config import MOVED, Config, ConfigError, load_settings
from llmos.memory.window import Budget, Memory
from llmos.messages import Message
from llmos.task import TaskError, load_task
from llmos.testing import ListStore, ScriptedBackend, call

ROOT = Path(__file__).resolve().parent.parent


class Recorder(Resources):
    """Resources that hand out a scripted model and an in-memory store, recording what was asked."""

    def __init__(self):
        super().__init__()
        self.models, self.memories = [], []
        self.scripted = ScriptedBackend(["ok"] * 4)

    def backend(self, model):
        self.models.append(model)
        return self.scripted

    def store(self, memory, base):
        self.memories.append(memory)
        return ListStore() if memory.enabled else None


def _tool(kernel, name):
    return next(t for t in kernel.tools if t.name == name).fn.__self__


def _seen(kernel, rec):
    list(kernel.run("hello"))
    return rec.scripted.seen[-1]


def _ingested(kernel, rec, task, path, folder):
    return run_task(task, path, kernel, folder)["ingested"]["files"]


MEMORY_ON = {"memory": {"enabled": True}}
PYTHON = {"timeout": 9.5, "cpu": 3, "memory_mb": 512, "processes": 16, "file_mb": 8, "tmp_mb": 16, "output_bytes": 1024,
          "startup_timeout": 4.0, "bwrap": "/opt/bwrap", "interpreter": "/opt/python3", "unsandboxed": True}
BROWSER = {"allow_domains": ["docs.example.org"], "nav_timeout": 2.5, "action_timeout": 1.5, "launch_timeout": 9.0,
           "max_chars": 999, "max_links": 7, "executable": "/opt/chromium"}

# field -> (value, extra settings it needs, what the kernel (or its run) shows of it)
CASES = {
    "model.path": ("DEFAULT_MODEL", {}, lambda k, r, *a: r.models[-1].path),
    "model.n_ctx": (2048, {}, lambda k, r, *a: r.models[-1].n_ctx),
    "model.gpu_layers": (3, {}, lambda k, r, *a: r.models[-1].gpu_layers),
    "model.threads": (1, {}, lambda k, r, *a: r.models[-1].threads),
    "model.chat_template": ("{{ messages }}", {}, lambda k, r, *a: r.models[-1].chat_template),
    "model.kv_ram_mb": (64, {}, lambda k, r, *a: r.models[-1].kv_ram_mb),
    "model.parallel": (2, {}, lambda k, r, *a: r.models[-1].parallel),
    "model.kv_unified": (True, {}, lambda k, r, *a: r.models[-1].kv_unified),
    "model.server": ("http://127.0.0.1:8000/v1", {}, lambda k, r, *a: r.models[-1].server),
    "model.server_timeout": (9.0, {}, lambda k, r, *a: r.models[-1].server_timeout),
    **{f"sampling.{f}": (v, {}, (lambda f: lambda k, r, *a: getattr(_seen(k, r).sampling, f))(f))
       for f, v in {"temperature": 0.5, "top_p": 0.5, "top_k": 7, "seed": 3, "max_tokens": 33}.items()},
    "budget.steps": (5, {}, lambda k, r, *a: k.process.max_steps),
    "budget.tokens": (999, {}, lambda k, r, *a: k.process.max_tokens),
    "budget.seconds": (77.0, {}, lambda k, r, *a: k.process.max_seconds),
    "tools.enabled": (["plot"], {}, lambda k, r, *a: [t.name for t in k.tools]),
    "tools.tool_choice": ("none", {}, lambda k, r, *a: _seen(k, r).tool_choice),
    "tools.route": (False, {}, lambda k, r, *a: k.router is not None),
    "tools.file_roots": (["data"], {}, lambda k, r, task, path, folder: [p.name for p in _tool(k, "python").file_roots]),
    **{f"tools.python.{f}": (v, {}, (lambda f: lambda k, r, *a: getattr(_tool(k, "python").options, f))(f)) for f, v in PYTHON.items()},
    **{f"tools.browser.{f}": (v, {}, (lambda f: lambda k, r, *a: getattr(_tool(k, "browser").options, f))(f)) for f, v in BROWSER.items()},
    "tools.mcp": ([{"name": "time", "command": [sys.executable, "-m", "mcp_server_time"]}], {},
                  lambda k, r, task, *a: [{"name": s.name, "command": s.command} for s in task.tools.mcp]
                  if "time_convert_time" in k.tools else "no MCP tools in the kernel"),
    "memory.enabled": (True, {}, lambda k, r, *a: k.memory.store is not None and "memory_search" in k.tools),
    "memory.store": ("mem", MEMORY_ON, lambda k, r, *a: r.memories[-1].store),
    "memory.server": ("http://127.0.0.1:8000", MEMORY_ON, lambda k, r, *a: r.memories[-1].server),
    "memory.collection": ("notes", MEMORY_ON, lambda k, r, *a: k.memory.collection),
    "memory.documents": (["docs"], MEMORY_ON, lambda k, r, *a: _ingested(k, r, *a) and ["docs"]),
    "memory.recall": (2, MEMORY_ON, lambda k, r, *a: k.memory.recall),
    "memory.warn": (0.6, MEMORY_ON, lambda k, r, *a: k.memory.budget.warn),
    "memory.limit": (0.8, MEMORY_ON, lambda k, r, *a: k.memory.budget.limit),
    "agent.name": ("zed", {}, lambda k, r, *a: k.name),
    "agent.priority": (9, {}, lambda k, r, *a: k.process.priority),
    "agent.system": ("be terse", {}, lambda k, r, *a: _seen(k, r).messages[0].content),
    "policy.tools": ({"python": "deny"}, {}, lambda k, r, *a: k.policy.rules),
    "policy.unattended": ("allow", {}, lambda k, r, *a: k.policy.unattended),
}


def leaves(model, prefix=""):
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
            yield from leaves(ann, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_every_config_field_has_a_case():
    assert sorted(leaves(Config)) == sorted(CASES)


def nested(dotted, value):
    out = value
    for key in reversed(dotted.split(".")):
        out = {key: out}
    return out


@pytest.mark.parametrize("how", ["file", "-o"])
@pytest.mark.parametrize("field", sorted(CASES))
def test_field_reaches_the_kernel(field, how, tmp_path, default_model_path):
    value, extra, shown = CASES[field]
    value = str(default_model_path) if value == "DEFAULT_MODEL" else value
    (tmp_path / "data").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("The lamp error E-4521 means the lamp failed.")
    base = {"goal": "hi", "tools": {"enabled": ["calculator", "python", "browser"]}, **extra}
    if field.startswith("tools.") and field.split(".")[1] in ("enabled", "tool_choice"):
        base["tools"] = {"enabled": ["calculator"]}
    overrides = []
    if how == "file":
        data = base
        for key, part in nested(field, value).items():
            data = {**data, key: {**data.get(key, {}), **part} if isinstance(part, dict) else part}
    else:
        data = base
        overrides = [f"{field}={json.dumps(value)}"]  # JSON is YAML, as -o reads it
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(data))
    task = load_task(path, overrides=overrides)
    rec = Recorder()
    kernel, folder = prepare(task, path, rec, tmp_path / "runs")
    try:
        got = shown(kernel, rec, task, path, folder)
    finally:
        kernel.close()
    want = value
    if field == "tools.enabled":
        got, want = got, ["plot"]
    if field == "memory.enabled":
        want = True
    assert got == want


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_keys_name_their_new_place(old, tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({"goal": "hi", **nested(old, 1)}))
    with pytest.raises(TaskError) as err:
        load_task(path)
    assert any(f"'{old}' moved to '{MOVED[old]}'" in line for line in err.value.problems), err.value.problems
    with pytest.raises(ConfigError, match=re.escape(f"'{old}' moved to '{MOVED[old]}'")):
        load_settings([f"{old}=1"], home=tmp_path)


def test_moved_key_hint_points_at_its_line(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("goal: hi\nmodel:\n  temperature: 0\n")
    with pytest.raises(TaskError) as err:
        load_task(path)
    assert err.value.problems == [f"{path}:3: model.temperature: 'model.temperature' moved to 'sampling.temperature'"]


def test_tools_list_shorthand(tmp_path):
    path = tmp_path / "task.yaml"
    path.write_text("goal: hi\ntools: [calculator, plot]\n")
    assert load_task(path).tools.enabled == ["calculator", "plot"]
    assert load_task(path, overrides=["tools.tool_choice=plot"]).tools.tool_choice == "plot"
    path.write_text("goal: hi\n")
    assert load_task(path, overrides=["tools=[plot]"]).tools.enabled == ["plot"]
    assert load_settings(["tools=[python]"], home=tmp_path).tools.enabled == ["python"]
    path.write_text("goal: hi\ntools: [calculater]\n")
    with pytest.raises(TaskError, match="did you mean 'calculator'"):
        load_task(path)


def test_user_tools_by_module_and_name(tmp_path):
    (tmp_path / "mytools.py").write_text(
        "from llmos import tool\n\n@tool\ndef shout(text: str) -> str:\n    '''Upper-case the text.'''\n    return text.upper()\n")
    path = tmp_path / "task.yaml"
    path.write_text("goal: hi\ntools: [calculator, 'mytools:shout']\n")
    task = load_task(path)
    rec = Recorder()
    rec.scripted.replies[:] = [call("shout", text="hey"), "HEY"]
    task = task.model_copy(update={"tools": task.tools.model_copy(update={"tool_choice": "shout"})})
    kernel, folder = prepare(task, path, rec, tmp_path / "runs")
    msgs = list(kernel.run("shout hey"))
    assert [t.name for t in kernel.tools] == ["calculator", "shout"] and msgs[2].content == "HEY"
    path.write_text("goal: hi\ntools:\n  enabled: ['nomodule_here:shout']\n")
    with pytest.raises(TaskError, match=r"task.yaml:3: tools.enabled: 'nomodule_here:shout': cannot import"):
        load_task(path)


def test_readme_task_block_is_a_valid_task(tmp_path):
    block = re.search(r"```yaml\n(# every section.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    (tmp_path / "data").mkdir()
    (tmp_path / "docs").mkdir()
    path = tmp_path / "task.yaml"
    path.write_text(block)
    task = load_task(path)
    assert task.agent.name == "calculator" and task.tools.tool_choice == "calculator" and task.budget.steps == 3
    assert task.tools.python.timeout == 30 and task.tools.browser.allow_domains == ["127.0.0.1"]
    assert task.policy.tools == {"calculator": "allow"} and task.policy.unattended == "deny"


def test_front_doors_build_through_the_composition_root():
    for name in ("cli.py", "repl.py", "agent.py"):
        source = (ROOT / "llmos" / name).read_text()
        assert "Kernel(" not in source, f"llmos/{name} wires a kernel by hand"
    assert "build(" in (ROOT / "llmos" / "agent.py").read_text() and "build(" in (ROOT / "llmos" / "repl.py").read_text()
    assert "build(" in (ROOT / "llmos" / "cli.py").read_text()


def test_build_shares_and_closes_resources_once(tmp_path):
    class Counted(ScriptedBackend):
        closed = 0

        def close(self):
            Counted.closed += 1

    class Shared(Resources):
        def backend(self, model):
            return self.backends.setdefault(model, Counted(["a", "b"]))

    res = Shared()
    a = build({"agent": {"name": "a"}, "sampling": {"temperature": 0.3}}, resources=res, trace=tmp_path)
    b = build({"agent": {"name": "b"}}, resources=res, trace=tmp_path)
    assert a.backend is b.backend and a.scheduler is b.scheduler
    a.close()
    b.close()
    assert Counted.closed == 0  # kernels never close a shared model
    res.close()
    res.close()
    assert Counted.closed == 1


def test_build_refuses_an_unknown_tool_choice(tmp_path):
    res = Recorder()
    with pytest.raises(pydantic.ValidationError, match="tool_choice 'nope'"):
        build({"tools": {"tool_choice": "nope"}}, resources=res, trace=tmp_path)


@tool
def slow(seconds: float = 0.2) -> str:
    """Wait, then report."""
    threading.Event().wait(seconds)
    return "slept"


def test_a_stopped_run_ends_with_an_exit_message(tmp_path):
    kernel = Kernel(ScriptedBackend([call("slow", seconds=0.5), "never"]), tools=[slow], trace=tmp_path / "t.jsonl")
    msgs = []
    for m in kernel.run("go"):
        msgs.append(m)
        if m.role == "assistant":
            kernel.stop.set()  # stop while the tool is about to run
    assert msgs[-1].role == "kernel" and msgs[-1].meta["exit"] == "stopped"
    last = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[-1])
    assert last["meta"]["exit"] == "stopped" and kernel.process.state == "stopped"


def test_interrupted_and_abandoned_runs_leave_their_exit_in_the_trace(tmp_path):
    kernel = Kernel(ScriptedBackend(["a long answer"]), trace=tmp_path / "t.jsonl")
    run = kernel.run("go", stream=True)
    assert next(run).role == "user" and next(run).is_delta
    with pytest.raises(KeyboardInterrupt):
        run.throw(KeyboardInterrupt)  # Ctrl-C while the model decodes
    last = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[-1])
    assert last["meta"]["exit"] == "interrupted" and kernel.process.state == "stopped"
    kernel = Kernel(ScriptedBackend(["a long answer"]), trace=tmp_path / "u.jsonl")
    run = kernel.run("go", stream=True)
    next(run), next(run)
    run.close()  # the caller stopped reading
    last = json.loads((tmp_path / "u.jsonl").read_text().splitlines()[-1])
    assert last["meta"]["exit"] == "abandoned" and kernel.process.state == "stopped"
    kernel = Kernel(ScriptedBackend(["short"]), trace=tmp_path / "v.jsonl")
    run = kernel.run("go")
    assert [m.role for m in run] == ["user", "assistant", "kernel"]
    run.close()
    assert [json.loads(l).get("meta", {}).get("exit") for l in (tmp_path / "v.jsonl").read_text().splitlines()][-2:] == [None, "answer"]


def test_forced_answers_are_kernel_messages(tmp_path):
    kernel = Kernel(ScriptedBackend([call("slow", seconds=0), call("slow", seconds=0), "done"]), tools=[slow],
                    trace=tmp_path, config={"budget": {"steps": 4}})
    assert [m.meta.get("why") for m in kernel.run("go") if m.meta.get("event") == "force_answer"] == ["repeated_call"]
    backend = ScriptedBackend([call("slow", seconds=0), "done"])
    kernel = Kernel(backend, tools=[slow], trace=tmp_path, config={"budget": {"steps": 2}})
    assert [m.meta.get("why") for m in kernel.run("go") if m.meta.get("event") == "force_answer"] == ["last_step"]
    assert backend.seen[-1].tool_choice == "none"
    assert any(json.loads(l).get("meta", {}).get("why") == "last_step" for l in kernel.trace.path.read_text().splitlines())


class FullOnce(ScriptedBackend):
    """A model whose context is full on the first try of the turn after `at` turns."""

    def __init__(self, replies, at):
        super().__init__(replies)
        self.at, self.raised = at, False

    def turn(self, messages, tools, tool_choice="auto", agent="main", sampling=None, prefix=""):
        if len(self.seen) == self.at and not self.raised:
            self.raised = True
            raise ContextFull("prompt is 9999 tokens; the context window holds 100")
        return super().turn(messages, tools, tool_choice, agent, sampling, prefix)


def test_last_resort_eviction_stores_what_it_drops_and_keeps_calls_with_results(tmp_path):
    store = ListStore()
    backend = FullOnce([call("slow", seconds=0), "first answer", "second answer"], at=2)
    kernel = Kernel(backend, tools=[slow], memory=Memory(store), trace=tmp_path)
    list(kernel.run("my code is 4412"))
    msgs = list(kernel.run("again"))
    notice = next(m for m in msgs if m.meta.get("event") == "evict")
    assert notice.meta["stored"] and notice.meta["messages"] == 1
    assert any("4412" in i["text"] for i in store.items)  # the evicted user turn is on disk
    assert kernel.messages[0].role == "assistant" and kernel.messages[0].tool_calls  # the call...
    assert kernel.messages[1].role == "tool"  # ...still with its result
    assert "4412" in kernel.memory.summary
    memory = Memory(store, budget=Budget())
    memory.add(Message("assistant", "", tool_calls=(call("slow"),)))
    memory.add(Message("tool", "slept", meta={"name": "slow"}))
    memory.add(Message("user", "now"))
    assert memory.evict("full").meta["messages"] == 2 and [m.role for m in memory.messages] == ["user"]
    assert memory.evict("full") is None  # the current message is never evicted


def test_a_bare_string_is_not_a_list_of_characters(tmp_path):
    from llmos.toolbox import ToolError, Toolbox
    from llmos.tools import ToolContext

    store = ListStore()
    store.add("one text")
    assert [i["text"] for i in store.items] == ["one text"]
    with pytest.raises(ToolError, match="list of tools"):
        Toolbox("calculator")
    assert ToolContext.under(tmp_path, file_roots=str(tmp_path)).file_roots == (tmp_path,)
    kernel = Kernel(ScriptedBackend(["hi"]), trace=tmp_path)
    with pytest.raises(TypeError, match="list of messages"):
        kernel.complete("hello")
    assert load_settings("budget.steps=3", home=tmp_path).budget.steps == 3
