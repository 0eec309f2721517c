"""The scheduler: process table, priority then round-robin turns, pause/resume/stop, budgets,
faults kept to one agent, and `llmos ps` (scripted backend: deterministic)."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from llmos import Kernel, tool
from llmos.scheduler import NoSuchAgent, Publisher, Scheduler, Stopped, running_tables
from llmos.memory.window import Memory
from llmos.testing import ScriptedBackend, call


def named(name):
    return {"agent": {"name": name}}


def wait_until(predicate, what, timeout=10.0):
    """Poll for a state another thread reaches; a bounded wait, not a timing assertion."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def queue_for_turns(sched, procs, order, turns=1):
    """Each process on its own thread asks for `turns` turns and records when it gets one."""

    def work(p):
        for _ in range(turns):
            with sched.turn(p):
                order.append(p.name)

    threads = [threading.Thread(target=work, args=(p,)) for p in procs]
    return threads


def test_priority_first_then_the_order_agents_became_ready():
    sched = Scheduler()
    holder = sched.spawn("holder")
    low1, high, low2 = sched.spawn("low1"), sched.spawn("high", priority=5), sched.spawn("low2")
    order = []
    with sched.turn(holder):
        for t, p in zip(queue_for_turns(sched, [low1, high, low2], order), [low1, high, low2]):
            t.start()
            wait_until(lambda: p.state == "ready", f"{p.name} ready")  # low1 queues before low2
    wait_until(lambda: len(order) == 3, "three turns")
    assert order == ["high", "low1", "low2"]
    assert [r["state"] for r in sched.ps()] == ["waiting"] * 4  # a turn ends in "waiting" until the kernel says more


def test_equal_priorities_take_turns_round_robin():
    sched = Scheduler()
    holder = sched.spawn("holder")
    a, b = sched.spawn("a"), sched.spawn("b")
    order = []
    with sched.turn(holder):
        threads = queue_for_turns(sched, [a, b], order, turns=3)
        threads[0].start()
        wait_until(lambda: a.state == "ready", "a ready")
        threads[1].start()
        wait_until(lambda: b.state == "ready", "b ready")
    for t in threads:
        t.join(10)
    # after each turn an agent queues behind the one already waiting
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert a.turns == b.turns == 3


def test_a_paused_agent_gets_no_turn_until_resumed():
    sched = Scheduler()
    holder, a, b = sched.spawn("holder"), sched.spawn("a", priority=9), sched.spawn("b")
    sched.pause("a")
    order = []
    with sched.turn(holder):
        threads = queue_for_turns(sched, [a, b], order)
        for t, p in zip(threads, [a, b]):
            t.start()
            wait_until(lambda: p.state == "ready", f"{p.name} ready")
        assert {r["name"]: r["state"] for r in sched.ps()}["a"] == "paused"
    wait_until(lambda: order == ["b"], "b ran while a is paused")
    time.sleep(0.3)
    assert order == ["b"]  # a, although of higher priority, is still held back
    sched.resume(a.pid)
    threads[0].join(10)
    assert order == ["b", "a"]


def test_stopping_a_waiting_agent_ends_its_wait():
    sched = Scheduler()
    holder, a = sched.spawn("holder"), sched.spawn("a")
    errors = []

    def work():
        try:
            with sched.turn(a):
                pass
        except Stopped as exc:
            errors.append(exc)

    with sched.turn(holder):
        t = threading.Thread(target=work)
        t.start()
        wait_until(lambda: a.state == "ready", "a ready")
        sched.stop("a")
        t.join(10)
    assert errors and a.state == "stopped"


def test_unknown_agent_names_the_known_ones():
    sched = Scheduler()
    sched.spawn("alpha")
    with pytest.raises(NoSuchAgent, match=r"no agent 'beta'; agents: \d+ \(alpha\)"):
        sched.pause("beta")


@tool
def slow(seconds: float = 0.5) -> str:
    """Wait, then report."""
    time.sleep(seconds)
    return "slept"


@tool
def explode() -> str:
    """Always fails."""
    raise RuntimeError("boom")


def test_kernel_moves_through_states_and_counts_use(tmp_path):
    sched = Scheduler()
    backend = ScriptedBackend([call("slow", seconds=0.5), "done."])
    k = Kernel(backend, tools=[slow], trace=tmp_path, scheduler=sched,
               config={"agent": {"name": "worker", "priority": 2}, "budget": {"steps": 4}})
    seen = set()
    proc = sched.start(k, "go", on_message=lambda m: seen.add(k.process.state), stream=True)
    wait_until(lambda: proc.state == "waiting", "tools running")
    assert sched.ps()[0]["state"] == "waiting"
    messages = proc.wait(10)
    assert messages[-1].meta["exit"] == "answer"
    row = sched.ps()[0]
    assert (row["name"], row["priority"], row["state"], row["steps"], row["note"]) == ("worker", 2, "done", 2, "answer")
    assert row["tokens"] > 0 and row["turns"] == 2 and row["budget"] == {"steps": 4}
    assert "running" in seen


def test_token_budget_ends_the_run(tmp_path):
    backend = ScriptedBackend([call("slow", seconds=0.0)] * 5 + ["never"])
    k = Kernel(backend, tools=[slow], trace=tmp_path, config={"budget": {"tokens": 1, "steps": 6}})
    messages = list(k.run("go"))
    assert messages[-1].meta["exit"] == "tokens"
    assert "token budget of 1 exhausted" in messages[-1].content
    assert k.process.note == "tokens" and k.process.steps == 1


def test_a_failing_agent_does_not_stop_the_others(tmp_path):
    sched = Scheduler()
    broken = Kernel(ScriptedBackend([]), trace=tmp_path, scheduler=sched, config=named("broken"))  # its script is empty: the backend raises
    faulty_tool = Kernel(ScriptedBackend([call("explode"), "it failed."]), tools=[explode], trace=tmp_path, scheduler=sched, config=named("faulty"))
    fine = Kernel(ScriptedBackend([call("slow", seconds=0.2), "fine."]), tools=[slow], trace=tmp_path, scheduler=sched, config=named("fine"))
    procs = [sched.start(k, "go") for k in (broken, faulty_tool, fine)]
    for p in procs:
        p.wait(10)
    states = {r["name"]: (r["state"], r["note"]) for r in sched.ps()}
    assert states["broken"][0] == "failed" and "script exhausted" in states["broken"][1]
    assert states["faulty"] == ("done", "answer")  # a raising tool is a tool message, not a crash
    assert any(m.role == "tool" and "boom" in m.content for m in procs[1].messages)
    assert states["fine"] == ("done", "answer") and procs[2].messages[-1].content == "fine."


def test_stopping_one_agent_leaves_the_other_whole(tmp_path):
    from llmos.testing import ListStore

    store = ListStore()
    sched = Scheduler()
    a = Kernel(ScriptedBackend([call("slow", seconds=1.0), "a done"]), tools=[slow], trace=tmp_path / "a.jsonl",
               scheduler=sched, config=named("a"), memory=Memory(store))
    b = Kernel(ScriptedBackend([call("slow", seconds=0.3), call("slow", seconds=0.3), "b done"]), tools=[slow],
               trace=tmp_path / "b.jsonl", scheduler=sched, config=named("b"), memory=Memory(store))
    pa, pb = sched.start(a, "task-of-a"), sched.start(b, "task-of-b")
    wait_until(lambda: pa.state == "waiting", "a in its tool")
    sched.stop("a")
    pa.wait(10)
    pb.wait(10)
    assert pa.state == "stopped"
    assert pb.state == "done" and pb.messages[-1].content == "b done"
    assert [m.role for m in b.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    # each agent's trace holds whole JSON lines of its own messages only
    for name in ("a", "b"):
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        assert all(json.loads(line) for line in lines)
    assert "task-of-b" in (tmp_path / "b.jsonl").read_text() and "task-of-b" not in (tmp_path / "a.jsonl").read_text()


def test_start_refuses_a_kernel_of_another_scheduler(tmp_path):
    k = Kernel(ScriptedBackend(["hi"]), trace=tmp_path)
    with pytest.raises(ValueError, match="another scheduler"):
        Scheduler().start(k, "hello")


def test_llmos_ps_lists_the_agents_of_a_running_process(tmp_path):
    env = {**os.environ, "LLMOS_HOME": str(tmp_path)}
    script = (
        "import time\n"
        "from llmos.scheduler import Publisher, Scheduler\n"
        "pub = Publisher('shell')\n"
        "s = pub.watch(Scheduler())\n"
        "a = s.spawn('writer', priority=3, max_steps=5)\n"
        "s.spawn('reader')\n"
        "s.pause('reader')\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        ps = subprocess.run([sys.executable, "-m", "llmos", "ps", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert ps.returncode == 0, ps.stderr
        tables = json.loads(ps.stdout)
        assert [t["pid"] for t in tables] == [proc.pid]
        rows = {r["name"]: r for r in tables[0]["agents"]}
        assert rows["writer"]["priority"] == 3 and rows["writer"]["budget"] == {"steps": 5}
        assert rows["reader"]["state"] == "paused"
        text = subprocess.run([sys.executable, "-m", "llmos", "ps"], env=env, capture_output=True, text=True, timeout=60).stdout
        assert "writer" in text and "paused" in text and f"process {proc.pid}" in text
    finally:
        proc.kill()
        proc.wait()
    # the dead process's table is dropped
    ps = subprocess.run([sys.executable, "-m", "llmos", "ps"], env=env, capture_output=True, text=True, timeout=60)
    assert ps.stdout.strip() == "no llmos process is running"
    assert not list((tmp_path / "run").glob("*.json"))


def test_publisher_removes_its_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    pub = Publisher("agent x.yaml")
    pub.watch(Scheduler()).spawn("x")
    assert [t["agents"][0]["name"] for t in running_tables()] == ["x"]
    pub.close()
    assert running_tables() == []


def test_a_hung_tool_stalls_only_its_agent(tmp_path):
    release = threading.Event()

    @tool(timeout=5.0)
    def hang() -> str:
        """Never returns in time."""
        release.wait(30)
        return "late"

    sched = Scheduler()
    stuck = Kernel(ScriptedBackend([call("hang"), "gave up"]), tools=[hang], trace=tmp_path, scheduler=sched, config=named("stuck"))
    busy = Kernel(ScriptedBackend([call("slow", seconds=s) for s in (0.0, 0.01, 0.02)] + ["busy done"]), tools=[slow], trace=tmp_path,
                  scheduler=sched, config=named("busy"))
    ps = sched.start(stuck, "go")
    wait_until(lambda: ps.state == "waiting", "stuck in its tool")
    pb = sched.start(busy, "go")
    pb.wait(10)
    assert pb.state == "done" and stuck.process.state == "waiting"  # four turns decoded meanwhile
    messages = ps.wait(30)  # the hung call is cut off at its limit and the agent carries on
    release.set()
    assert any(m.role == "tool" and "timed out" in m.content for m in messages) and ps.state == "done"


def test_ps_drops_tables_of_processes_that_died_or_were_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path))
    other = subprocess.Popen(["sleep", "30"])  # alive, but started after the table was written: a reused PID
    try:
        (tmp_path / "run").mkdir()
        for pid in (other.pid, 2**22 + 12345):
            table = {"pid": pid, "command": "shell", "agents": [], "start_ticks": 1}
            (tmp_path / "run" / f"{pid}.json").write_text(json.dumps(table))
        (tmp_path / "run" / "junk.json").write_text("{not json")
        assert running_tables() == []
        assert [f.name for f in (tmp_path / "run").iterdir()] == ["junk.json"]  # not ours to delete
    finally:
        other.kill()
        other.wait()


def test_a_model_of_two_slots_is_held_by_two_agents_and_the_third_waits_its_turn_by_priority():
    sched = Scheduler(slots=2)
    first, second = sched.spawn("first"), sched.spawn("second")
    low, high = sched.spawn("low"), sched.spawn("high", priority=3)
    order = []
    with sched.turn(first):
        with sched.turn(second):  # a second slot: it does not wait for the first
            assert [r["state"] for r in sched.ps()][:2] == ["running", "running"]
            threads = queue_for_turns(sched, [low, high], order)
            for t, p in zip(threads, [low, high]):
                t.start()
                wait_until(lambda: p.state == "ready", f"{p.name} ready")
            assert order == [] and low.state == high.state == "ready"  # both slots are held
        wait_until(lambda: len(order) >= 1, "a freed slot")
        assert order[0] == "high"  # the higher priority gets the freed slot, though low queued first
    wait_until(lambda: len(order) == 2, "both turns")
    assert order == ["high", "low"]
