"""The `llmos` command, run as a user runs it (subprocess), including bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LLMOS = [sys.executable, "-m", "llmos.cli"]


def llmos(*args, env_home=None, input=None, timeout=300):
    env = dict(os.environ)
    if env_home:
        env["LLMOS_HOME"] = str(env_home)
    return subprocess.run(LLMOS + list(args), capture_output=True, text=True, timeout=timeout, env=env, input=input)


def one_line_error(proc):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llmos: error: ") and "Traceback" not in proc.stderr
    return lines[0]


def test_help_lists_commands():
    proc = llmos("--help")
    assert proc.returncode == 0
    for cmd in ("run", "models", "tools"):
        assert cmd in proc.stdout


def test_import_llmos_is_light():
    code = "import sys, llmos; bad = [m for m in ('llama_cpp', 'sympy', 'numpy', 'chromadb') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_models_json_lists_default(llmos_home):
    proc = llmos("models", "--json", env_home=llmos_home)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    default = rows[0]
    assert default["origin"] == "default" and default["architecture"] == "llama"
    assert default["quantization"] == "Q4_1" and default["chat_template"] is True and default["context_length"] == 8192
    assert len(default["sha256"]) == 64 and int(default["sha256"], 16) >= 0


def test_models_plan_falls_back_to_cpu_with_a_reason(default_model_path, llmos_home):
    proc = llmos("models", "--plan", str(default_model_path), "--json", env_home=llmos_home)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["n_layers"] == 30 and plan["needed_bytes"] > 0
    assert plan["reason"]  # on a CPU-only build: "built without GPU support"; with a GPU: a layer count


def test_tools_json():
    proc = llmos("tools", "--json")
    assert proc.returncode == 0
    tools = json.loads(proc.stdout)
    calc = next(t for t in tools if t["name"] == "calculator")
    assert calc["parameters"]["required"] == ["expression"] and calc["touches"]


def test_run_end_to_end_json(llmos_home):
    proc = llmos("run", "What is 12345 * 6789?", "--tool-choice", "calculator", "--json", "-o", "sampling.max_tokens=96", env_home=llmos_home)
    assert proc.returncode == 0, proc.stderr
    msgs = [json.loads(l) for l in proc.stdout.splitlines()]
    call = msgs[1]["tool_calls"][0]["function"]
    assert call["name"] == "calculator" and isinstance(json.loads(call["arguments"])["expression"], str)
    assert msgs[-1]["role"] == "kernel" and msgs[-1]["meta"]["exit"] in ("answer", "max_steps")
    traces = list((llmos_home / "traces").glob("*.jsonl"))
    assert len(traces) == 1 and len(traces[0].read_text().splitlines()) == len(msgs)


def test_run_streams_text(llmos_home):
    proc = llmos("run", "Say hi.", "--no-tools", "-o", "sampling.max_tokens=24", env_home=llmos_home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "trace:" in proc.stderr


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda d: d / "missing.gguf", "no such file"),
        (lambda d: (d / "text.gguf").write_text("hello") and d / "text.gguf", "not a GGUF"),
        (lambda d: d, "folder"),
    ],
)
def test_bad_model_is_one_line_exit_2(tmp_path, make, expect, llmos_home):
    path = make(tmp_path)
    line = one_line_error(llmos("run", "hi", "--model", str(path), env_home=llmos_home))
    assert expect in line and str(path) in line


def test_truncated_model_is_one_line_exit_2(tmp_path, default_model_path, llmos_home):
    cut = tmp_path / "cut.gguf"
    with open(default_model_path, "rb") as src:
        cut.write_bytes(src.read(default_model_path.stat().st_size // 3))
    line = one_line_error(llmos("run", "hi", "--model", str(cut), env_home=llmos_home))
    assert "truncated" in line


def test_bad_override_and_unknown_tool(llmos_home):
    line = one_line_error(llmos("run", "hi", "-o", "sampling.temperature=hot", env_home=llmos_home))
    assert "sampling.temperature" in line
    line = one_line_error(llmos("run", "hi", "-o", "nonsense=1", env_home=llmos_home))
    assert "nonsense" in line
    line = one_line_error(llmos("run", "hi", "--tool", "calculater", env_home=llmos_home))
    assert "did you mean 'calculator'" in line


def test_broken_config_file(llmos_home):
    llmos_home.mkdir(parents=True, exist_ok=True)
    (llmos_home / "config.yaml").write_text("model: [unclosed\n")
    line = one_line_error(llmos("models", env_home=llmos_home))
    assert "config.yaml" in line and "invalid YAML" in line
