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


def test_readme_scripted_backend_block_runs(tmp_path):
    blocks = readme_python_blocks()
    tool_part = blocks[0].split("kernel = Kernel(")[0]  # the @tool definition, without loading the model
    code = tool_part + "\n" + blocks[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={"LLMOS_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
