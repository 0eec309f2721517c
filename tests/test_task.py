"""Task files: validation message by message, overrides, variables, and unattended runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmos.task import TaskError, load_task

LLMOS = [sys.executable, "-m", "llmos.cli"]
ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="task.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def problems(tmp_path, text, **kw):
    with pytest.raises(TaskError) as err:
        load_task(write(tmp_path, text), **kw)
    return err.value.problems


def test_minimal_task_has_defaults(tmp_path):
    task = load_task(write(tmp_path, "goal: hello\n"))
    assert task.tools.enabled == ["calculator"] and task.budget.steps == 8 and task.model.gpu_layers == "auto"


def test_yaml_syntax_error(tmp_path):
    (line,) = problems(tmp_path, "goal: [unclosed\n")
    assert "task.yaml" in line and "invalid YAML" in line and "line 2" in line


def test_unknown_key_suggests_the_closest(tmp_path):
    (line,) = problems(tmp_path, "goal: hi\nbudgett:\n  max_steps: 2\n")
    assert line.endswith("task.yaml:2: budgett: unknown key 'budgett'; did you mean 'budget'?")
    (line,) = problems(tmp_path, "goal: hi\nsampling:\n  temprature: 0\n")
    assert ":3: sampling.temprature: unknown key 'temprature'; did you mean 'temperature'?" in line


def test_wrong_types_name_line_and_field(tmp_path):
    lines = problems(tmp_path, "goal: hi\nsampling:\n  temperature: hot\nbudget:\n  steps: zero\n")
    assert ":3: sampling.temperature:" in lines[0] and ":5: budget.steps:" in lines[1]


def test_missing_model_file(tmp_path):
    (line,) = problems(tmp_path, "goal: hi\nmodel:\n  path: nothing-here.gguf\n")
    assert ":3: model.path:" in line and "no such file" in line


def test_unknown_tool_and_bad_domain(tmp_path):
    lines = problems(tmp_path, "goal: hi\ntools:\n  enabled: [calculater]\n  browser:\n    allow_domains: ['http://x.org/a']\n")
    assert "did you mean 'calculator'" in lines[0]
    assert "'http://x.org/a' is not a domain" in lines[1]


def test_every_problem_is_reported_at_once(tmp_path):
    lines = problems(tmp_path, "goal: ''\nsampling:\n  top_k: 0\nchecks:\n  - {}\nextra: 1\n")
    assert len(lines) == 4
    assert [l.split(":")[1] for l in lines] == sorted([l.split(":")[1] for l in lines], key=int)


def test_overrides_and_variables(tmp_path):
    path = write(tmp_path, "goal: 'Weather in {city}?'\nvars: {city: Oslo}\n")
    task = load_task(path, overrides=["budget.steps=2", "sampling.temperature=0.5"], variables={"city": "Paris"})
    assert task.budget.steps == 2 and task.sampling.temperature == 0.5 and task.prompt() == "Weather in Paris?"
    (line,) = problems(tmp_path, "goal: 'hi {who}'\n")
    assert "who" in line and "--var who=" in line
    with pytest.raises(TaskError, match="unknown key"):
        load_task(path, overrides=["budget.nonsense=1"])


def run_cli(*args, home, timeout=300):
    env = {**os.environ, "LLMOS_HOME": str(home)}
    return subprocess.run(LLMOS + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def test_validate_command_exit_codes(tmp_path, llmos_home):
    good = write(tmp_path, "goal: hi\n", "good.yaml")
    bad = write(tmp_path, "goal: hi\nbudget: {steps: -1}\n", "bad.yaml")
    assert run_cli("validate", str(good), home=llmos_home).returncode == 0
    proc = run_cli("validate", str(good), str(bad), home=llmos_home)
    assert proc.returncode == 2 and "bad.yaml:2: budget.steps" in proc.stderr


def test_agent_passes_and_writes_result(tmp_path, llmos_home):
    task = write(tmp_path, """
goal: "What is {a} * {b}?"
vars: {a: 12345, b: 6789}
sampling: {max_tokens: 96}
tools: {enabled: [calculator], tool_choice: calculator}
budget: {steps: 3}
artifacts: out
checks:
  - tool_called: calculator
""")
    proc = run_cli("agent", str(task), home=llmos_home)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "finished" and result["passed"] and result["steps"] >= 1
    assert result["tokens"]["generated"] > 0 and result["timings"]["total_s"] > 0
    trace = [json.loads(l) for l in (tmp_path / "out" / "trace.jsonl").read_text().splitlines()]
    assert trace[0]["role"] == "user" and trace[-1]["role"] == "kernel"


def test_agent_failed_check_exits_1(tmp_path, llmos_home):
    task = write(tmp_path, "goal: Say hello.\ntools: {enabled: []}\nsampling: {max_tokens: 16}\nartifacts: out\nchecks:\n  - file_exists: '*.png'\n")
    proc = run_cli("agent", str(task), home=llmos_home)
    assert proc.returncode == 1, proc.stderr
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert not result["passed"] and "no file matching" in result["checks"][0]["why"]


def test_agent_bad_input_exits_2_before_loading(tmp_path, llmos_home):
    task = write(tmp_path, "goal: hi\nmodel: {path: missing.gguf}\n")
    proc = run_cli("agent", str(task), home=llmos_home)
    assert proc.returncode == 2 and "model.path" in proc.stderr and "Traceback" not in proc.stderr


def test_interrupted_run_leaves_clean_trace_and_result(tmp_path, llmos_home):
    task = write(tmp_path, "goal: Write a very long story about the sea.\ntools: {enabled: []}\nsampling: {max_tokens: 4000}\nartifacts: out\n")
    env = {**os.environ, "LLMOS_HOME": str(llmos_home)}
    proc = subprocess.Popen(LLMOS + ["agent", str(task)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # wait until tokens stream, then kill (SIGTERM)
    first = proc.stdout.read(20)
    assert first
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["status"] == "interrupted" and not result["passed"]
    for line in (tmp_path / "out" / "trace.jsonl").read_text().splitlines():
        json.loads(line)  # every line is a whole message


def test_memory_section_validation(tmp_path):
    lines = problems(tmp_path, "goal: hi\nmemory:\n  enabled: true\n  documents: [nowhere/]\n  recall: 99\n")
    assert ":4: memory.documents.0: 'nowhere/' does not exist" in lines[0]
    assert ":5: memory.recall:" in lines[1]
    (line,) = problems(tmp_path, "goal: hi\ntools: {enabled: [], tool_choice: memory_search}\n")
    assert "tool_choice 'memory_search'" in line
    (tmp_path / "docs").mkdir()
    task = load_task(write(tmp_path, "goal: hi\ntools: {enabled: [], tool_choice: memory_search}\nmemory: {enabled: true, documents: [docs]}\n"))
    assert task.memory.enabled and task.memory.documents == ["docs"]


def test_file_roots_must_be_folders(tmp_path):
    (line,) = problems(tmp_path, "goal: hi\ntools:\n  enabled: [python]\n  file_roots: [nope]\n")
    assert ":4: tools.file_roots.0: 'nope' is not a folder" in line
    (tmp_path / "data").mkdir()
    assert load_task(write(tmp_path, "goal: hi\ntools: {enabled: [python], file_roots: [data]}\n")).tools.file_roots == ["data"]


def test_several_agents_stop_together_on_sigterm(tmp_path, llmos_home):
    a = write(tmp_path, "agent: {name: a}\ngoal: Write a very long story about the sea.\ntools: {enabled: []}\nsampling: {max_tokens: 4000}\nartifacts: out-a\n", "a.yaml")
    b = write(tmp_path, "agent: {name: b}\ngoal: Write a very long story about the sky.\ntools: {enabled: []}\nsampling: {max_tokens: 4000}\nartifacts: out-b\n", "b.yaml")
    env = {**os.environ, "LLMOS_HOME": str(llmos_home)}
    proc = subprocess.Popen(LLMOS + ["agent", str(a), str(b)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for _ in range(600):  # wait (bounded) until both agents have started writing their traces
        if (tmp_path / "out-a" / "trace.jsonl").exists() and (tmp_path / "out-b" / "trace.jsonl").exists():
            break
        if proc.poll() is not None:
            pytest.fail(f"llmos agent exited early: {proc.communicate()[1][-500:]}")
        time.sleep(0.2)
    else:
        pytest.fail("the agents never started")
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    for out in ("out-a", "out-b"):
        result = json.loads((tmp_path / out / "result.json").read_text())
        assert result["status"] == "interrupted"


def test_memory_budgets(tmp_path):
    (line,) = problems(tmp_path, "goal: hi\nmemory:\n  warn: 0.95\n  limit: 0.8\n")
    assert "warn (0.95) must not exceed limit (0.8)" in line
    task = load_task(write(tmp_path, "goal: hi\nmemory: {warn: 0.6, limit: 0.8}\n"))
    assert (task.memory.warn, task.memory.limit) == (0.6, 0.8)
