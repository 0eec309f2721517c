"""Every example runs, and the README's library example is the one that runs."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_example_is_examples_quickstart():
    assert readme_python_blocks()[0] == (ROOT / "examples" / "quickstart.py").read_text()


def test_quickstart_runs_with_the_default_model(tmp_path):
    env = {"LLMOS_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("user ")
    assert lines[1].startswith("assistant [('multiply', {'a': ") and "'b': " in lines[1]
    assert lines[2].startswith("tool ") and lines[-1].startswith("kernel ")


def run_readme_block(marker, tmp_path, check=""):
    """A README block that uses the quickstart's @tool, run with it defined first."""
    blocks = readme_python_blocks()
    tool_part = blocks[0].split("kernel = build(")[0]  # the @tool definition, without loading the model
    block = next(b for b in blocks if marker in b)
    out = subprocess.run([sys.executable, "-c", tool_part + "\n" + block + "\n" + check], capture_output=True, text=True,
                         timeout=300, env={"LLMOS_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_readme_scripted_backend_block_runs(tmp_path):
    run_readme_block("ScriptedBackend", tmp_path)


def test_readme_scheduler_block_runs_two_agents_on_one_model(tmp_path):
    check = ("rows = sched.ps()\n"
             "assert [(r['name'], r['priority'], r['state']) for r in rows] == [('writer', 1, 'done'), ('checker', 0, 'done')], rows\n"
             "assert all(r['turns'] >= 1 and r['tokens'] > 0 for r in rows) and all(isinstance(a, str) for a in answers)\n"
             "print('ok')")
    assert run_readme_block("Resources()", tmp_path, check).strip().endswith("ok")


import functools
import http.server
import json
import os
import threading

import pytest

TASKS = ["calculator.yaml", "plot.yaml", "python.yaml", "browser.yaml", "rag.yaml"]


@pytest.fixture(scope="module")
def site():
    """examples/site served on 127.0.0.1 (the browser example's page)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ROOT / "examples" / "site"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def agent(args, home, timeout=600):
    env = {**os.environ, "LLMOS_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "llmos.cli", "agent", "--json", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_every_example_is_exercised():
    files = {p.name for p in (ROOT / "examples").iterdir() if p.is_file()}
    assert files == set(TASKS) | {"quickstart.py"}


@pytest.mark.parametrize("name", TASKS)
def test_task_example_passes_its_checks(name, site, tmp_path):
    args = [str(ROOT / "examples" / name), "-o", f"artifacts={tmp_path / 'out'}"]
    if name == "browser.yaml":
        args += ["--var", f"url={site}"]
    if name == "rag.yaml":
        args += ["-o", f"memory.store={tmp_path / 'memory'}"]  # not inside the repository
    proc = agent(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout)
    assert result["passed"] and result["status"] == "finished"
    assert (tmp_path / "out" / "result.json").exists() and (tmp_path / "out" / "trace.jsonl").exists()
    if name == "rag.yaml":
        assert result["ingested"]["files"] == 2 and result["ingested"]["chunks"] >= 2


def test_several_task_files_run_as_separate_agents(tmp_path):
    proc = agent([str(ROOT / "examples" / "calculator.yaml"), str(ROOT / "examples" / "plot.yaml")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [r["name"] for r in results] == ["calculator", "plot"]
    assert len({r["artifacts"] for r in results}) == 2 and all(r["passed"] for r in results)
