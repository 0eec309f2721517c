"""The python tool for real: a persistent session inside bubblewrap, and what it keeps out."""

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from llmos.messages import ToolCall
from llmos.toolbox import Toolbox
from llmos.tools import ToolContext
from llmos.tools.python import BWRAP, PythonOptions, PythonSession, SandboxUnavailable, make


def _bwrap_works() -> bool:
    """bwrap installed and allowed to create namespaces here (checked without the code under test)."""
    if not os.access(BWRAP, os.X_OK):
        return False
    probe = [BWRAP, "--unshare-all", "--unshare-user", "--ro-bind", "/", "/", "true"]
    return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0


needs_bwrap = pytest.mark.skipif(not _bwrap_works(), reason="bubblewrap (bwrap) is missing or cannot create namespaces")


def _stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(root: int = 0) -> list[int]:
    """Live (non-zombie) processes below `root` (this test process by default), found by scanning /proc."""
    root = root or os.getpid()
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(entry)) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def processes_with(marker: str) -> list[int]:
    """Live processes anywhere on the host whose command line contains `marker` (escapees included)."""
    hits = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and (fields := _stat_fields(entry)) and fields[0] != "Z":
            hits.append(int(entry))
    return hits


@pytest.fixture
def workspace(tmp_path):
    return tmp_path / "workspace"


@pytest.fixture
def session(workspace):
    s = PythonSession(workspace, PythonOptions(timeout=5))
    yield s
    s.close()


@pytest.fixture
def listening_port():
    """A TCP server on the host's 127.0.0.1: reachable from the host, not from the sandbox."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server.getsockname()[1]
    server.close()


CONNECT = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.close()\n'connected'"


@needs_bwrap
def test_state_survives_between_calls_and_the_last_expression_is_shown(session):
    assert session.run("x = 40\ndef inc(v):\n    return v + 1").text() == "(no output)"
    result = session.run("import math\ninc(x) + 1")
    assert result.value == "42" and result.error is None
    assert session.run("_ * 2").value == "84"  # `_` holds the last value, as in a REPL
    assert session.run("print('shown')").value is None  # print() returns None: no value line
    assert session.run("'a' * 3").text() == "[value] 'aaa'"


@needs_bwrap
def test_stdout_stderr_and_tracebacks_are_captured(session):
    result = session.run("import sys\nprint('out line')\nprint('err line', file=sys.stderr)\n1 / 0")
    assert result.stdout == "out line\n"
    assert result.stderr == "err line\n"
    assert "ZeroDivisionError: division by zero" in result.error
    assert '<cell' in result.error and "1 / 0" in result.error  # the cell's own source line is shown
    assert "<string>" not in result.error  # the server's frames are not
    text = result.text()
    assert text.index("[stdout]") < text.index("[stderr]") < text.index("[error]")
    assert "SyntaxError" in session.run("def broken(:").error
    assert session.run("import subprocess\nsubprocess.run(['echo', 'from a child'])\nNone").stdout == "from a child\n"
    session.run("import os, sys\nsys.stdout.close()\nos.close(2)")  # a cell that breaks its own streams...
    assert session.run("print('back')\nprint('again', file=sys.stderr)").text() == "[stdout]\nback\n[stderr]\nagain"


@needs_bwrap
def test_files_written_are_reported_and_exist_on_the_host(session, workspace):
    result = session.run(
        "import os\nos.makedirs('data', exist_ok=True)\n"
        "open('data/table.csv', 'w').write('a,b\\n1,2\\n')\nopen('notes.txt', 'w').write('hello')"
    )
    assert result.files == ["data/table.csv", "notes.txt"]
    assert "[files] wrote data/table.csv, notes.txt" in result.text()
    assert (workspace / "data" / "table.csv").read_text() == "a,b\n1,2\n"
    assert (workspace / "notes.txt").read_text() == "hello"
    assert session.run("open('notes.txt').read()").files == []  # reading changes nothing
    result = session.run("import os\nos.remove('notes.txt')\nopen('data/table.csv', 'a').write('3,4\\n')")
    assert result.files == ["data/table.csv"] and result.removed == ["notes.txt"]
    assert session.run("import os\nos.getcwd()").value == "'/workspace'"


@needs_bwrap
def test_the_tool_keeps_one_session_across_toolbox_threads(tmp_path):
    ctx = ToolContext.under(tmp_path, python={"timeout": 5})
    python = make(ctx)
    try:
        assert python.name == "python" and python.timeout > 5
        assert python.touches == "its workspace folder only (bubblewrap: no network, read-only system)"
        assert set(python.parameters["properties"]) == {"code"}
        box = Toolbox([python])  # every call runs on a fresh worker thread
        first = box.call(ToolCall("python", {"code": "counter = 1\nn = open('out.txt', 'w').write('x')"}))
        assert first.content == "[files] wrote out.txt" and not first.meta.get("error")
        second = box.call(ToolCall("python", {"code": "counter += 1\ncounter"}))
        assert second.content == "[value] 2"
        assert (ctx.workspace / "out.txt").exists()
    finally:
        python.fn.__self__.close()


@needs_bwrap
def test_network_is_unreachable_from_the_sandbox(session, listening_port):
    result = session.run(CONNECT.format(port=listening_port))
    assert result.value is None
    assert "ConnectionRefusedError" in result.error or "OSError" in result.error
    assert "gaierror" in session.run("import socket\nsocket.getaddrinfo('example.org', 80)").error


@needs_bwrap
def test_writes_outside_the_workspace_fail_and_tmp_is_private(session):
    for path in ("/usr/llmos-probe", "/etc/llmos-probe", "/llmos-probe", "/bin/llmos-probe"):
        result = session.run(f"open({path!r}, 'w').write('x')")
        assert "Read-only file system" in result.error or "No such file or directory" in result.error, path
        assert not Path(path).exists()
    name = f"llmos-probe-{uuid.uuid4().hex}"
    assert session.run(f"open('/tmp/{name}', 'w').write('private')\nopen('/tmp/{name}').read()").value == "'private'"
    assert not Path("/tmp", name).exists()  # the sandbox's /tmp is its own tmpfs


@needs_bwrap
def test_the_users_home_and_other_host_files_are_invisible(session, tmp_path):
    secret = tmp_path / "secret.txt"  # next to the workspace, not inside it
    secret.write_text("do not read")
    home = os.path.expanduser("~")
    result = session.run(f"import os\n[os.path.exists(p) for p in ({home!r}, '/root', {str(secret)!r}, {__file__!r})]")
    assert result.value == "[False, False, False, False]"
    assert "FileNotFoundError" in session.run("open('/root/.bashrc').read()").error
    env = session.run("import os\nos.environ.get('HOME'), sorted(os.environ)").value
    assert env.startswith("('/workspace', [") and "SECRET" not in env and "LLMOS_HOME" not in env


@needs_bwrap
def test_a_fork_bomb_hits_the_process_limit(workspace):
    s = PythonSession(workspace, PythonOptions(timeout=5, processes=32))
    try:
        assert s.run("1").value == "1"
        if s.process_limit is None:
            pytest.skip("running as root without a writable pids cgroup: the process count cannot be capped here")
        result = s.run("import os\nwhile True:\n    os.fork()")
        assert result.timed_out or "Resource temporarily unavailable" in result.error
        assert len(descendants()) < 40  # bwrap, its init, the server: the bomb is gone
        assert s.run("2 + 2").value == "4"  # the session (or its replacement) still works
    finally:
        s.close()
    assert descendants() == []


@needs_bwrap
def test_a_memory_bomb_raises_memory_error_and_the_session_lives_on(workspace):
    s = PythonSession(workspace, PythonOptions(timeout=10, memory_mb=256))
    try:
        assert "MemoryError" in s.run("block = bytearray(1 << 30)").error
        result = s.run("hog = []\nwhile True:\n    hog.append(bytearray(1 << 20))")
        assert "MemoryError" in result.error
        assert s.run("del hog\nkept = 7\nkept").value == "7"
    finally:
        s.close()


@needs_bwrap
def test_cpu_time_and_file_size_limits(workspace):
    s = PythonSession(workspace, PythonOptions(timeout=20, cpu=1, file_mb=1))
    try:
        result = s.run("spins = 0\nwhile True:\n    spins += 1")
        assert not result.timed_out and "CPU time limit of 1 s per call exceeded" in result.error
        assert s.run("spins > 0").value == "True"  # the session survives a CPU-limited cell
        assert "File too large" in s.run("open('big.bin', 'wb').write(b'0' * (2 << 20))").error
        assert (workspace / "big.bin").stat().st_size <= 1 << 20
    finally:
        s.close()


@needs_bwrap
def test_an_infinite_loop_is_killed_at_the_wall_clock_limit(workspace):
    s = PythonSession(workspace, PythonOptions(timeout=0.5))
    try:
        s.run("before = 1")
        result = s.run("print('started', flush=True)\nwhile True:\n    pass")
        assert result.timed_out
        assert "timed out after 0.5 s; the session was restarted (variables were lost)" in result.text()
        assert result.stdout == "started\n"  # what was printed before the kill is kept
        assert "NameError" in s.run("before").error  # a fresh session
    finally:
        s.close()
    assert descendants() == []


@needs_bwrap
def test_a_crashing_interpreter_is_reported_and_replaced(session):
    session.run("doomed = 1")
    assert "exited with status 3; the session was restarted" in session.run("import os\nos._exit(3)").text()
    assert "killed by SIGSEGV" in session.run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)").text()
    assert "NameError" in session.run("doomed").error and session.run("6 * 7").value == "42"


@needs_bwrap
def test_output_past_the_cap_is_cut_and_floods_stop_the_cell(workspace):
    s = PythonSession(workspace, PythonOptions(timeout=5, output_bytes=1000))
    try:
        result = s.run("for i in range(1000):\n    print(i)\n'done'")  # a few times the cap: cut, and the cell ends
        assert result.value == "'done'"
        assert len(result.stdout) < 1100 and "more bytes not shown" in result.stdout
        # a 1 GiB print is stopped early, even by code that catches exceptions, and says so
        result = s.run("import pathlib\ntry:\n    for _ in range(1 << 20):\n        print('x' * 1023)\nexcept Exception:\n    pass\n"
                       "pathlib.Path('finished').write_text('yes')\n'done'")
        assert result.value is None and "OutputFlood" in result.error and "was stopped" in result.error
        assert not (workspace / "finished").exists() and len(result.stdout) < 1100
        assert s.run("x = 2\nx * 21").value == "42"  # the session lives on
        # a child process writing to the pipe itself is stopped by the host side
        result = s.run("import subprocess\nsubprocess.run(['sh', '-c', 'yes | head -c 1000000000'])\n'after'")
        assert result.value is None and any("the cell was stopped" in n for n in result.notes) and len(result.stdout) < 1100
        assert s.run("1 + 1").value == "2"
        result = s.run("import time\nwhile True:\n    print('x' * 10)\n    time.sleep(0.05)")  # slow but endless: the wall clock
        assert result.timed_out and len(result.stdout) < 1100
    finally:
        s.close()


@needs_bwrap
def test_no_processes_remain_after_20_runaway_runs(workspace):
    marker = f"{uuid.uuid4().int % 10**6}.5"  # `sleep 123456.5`: findable anywhere on the host
    s = PythonSession(workspace, PythonOptions(timeout=0.2))
    try:
        for _ in range(20):
            result = s.run(f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nwhile True:\n    pass")
            assert result.timed_out
        assert s.run(f"import subprocess\nsubprocess.Popen(['sleep', '{marker}']).pid").value is not None
        assert s.run("1").value == "1"  # processes started by the previous call were killed when it ended
        assert processes_with(f"sleep {marker}") == []
    finally:
        s.close()
    assert descendants() == []
    assert processes_with(f"sleep {marker}") == []


@needs_bwrap
@pytest.mark.parametrize("ending", ["exit", "kill"])
def test_the_sandbox_dies_with_its_process(tmp_path, ending):
    workspace = tmp_path / f"ws-{uuid.uuid4().hex}"  # bwrap's command line names it: a marker to look for
    script = (
        "import os, signal, sys\n"
        "from llmos.tools.python import PythonSession\n"
        f"s = PythonSession({str(workspace)!r})\n"
        "assert s.run('1').value == '1'\n"
        "print('running', flush=True)\n"
        + ("os.kill(os.getpid(), signal.SIGKILL)\n" if ending == "kill" else "sys.exit(0)  # no close(): atexit cleans up\n")
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert "running" in done.stdout, done.stderr
    for _ in range(100):  # a SIGKILLed parent's sandbox is torn down by the kernel, a moment later
        if not processes_with(str(workspace)):
            break
        time.sleep(0.05)
    assert processes_with(str(workspace)) == []


def test_refuses_with_a_clear_message_when_bwrap_is_missing(tmp_path):
    ctx = ToolContext.under(tmp_path, python={"bwrap": str(tmp_path / "no-such-bwrap")})
    python = make(ctx)
    assert descendants() == []  # make() starts nothing
    with pytest.raises(SandboxUnavailable, match="bubblewrap") as info:
        python(code="1 + 1")
    assert "no-such-bwrap" in str(info.value) and "tools.python.unsandboxed: true" in str(info.value)
    message = Toolbox([python]).call(ToolCall("python", {"code": "1 + 1"}))
    assert message.meta["error"] and "sandbox" in message.content
    assert descendants() == []


def test_refuses_when_bwrap_fails_to_start(tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    s = PythonSession(tmp_path / "workspace", PythonOptions(bwrap=str(fake)))
    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        s.run("1")
    s.close()
    assert descendants() == []


def test_unsandboxed_opt_in_runs_the_same_server_and_says_so(tmp_path, listening_port):
    ctx = ToolContext.under(
        tmp_path, python={"unsandboxed": True, "bwrap": "/nonexistent/bwrap", "timeout": 1}
    )
    python = make(ctx)
    try:
        assert "UNSANDBOXED" in python.touches and "network" in python.touches
        assert python(code="x = 5\nimport os\nos.getcwd()") == f"[value] {str(ctx.workspace.resolve())!r}"
        assert python(code="x * 2") == "[value] 10"
        assert python(code=CONNECT.format(port=listening_port)) == "[value] 'connected'"  # no network isolation
        assert "timed out after 1 s" in python(code="while True:\n    pass")
    finally:
        python.fn.__self__.close()
    assert descendants() == []


def test_figures_made_inside_the_sandbox_land_in_the_workspace(tmp_path):
    """matplotlib from llmos's own install is importable read-only; a saved figure is a real PNG."""
    from llmos.tools import ToolContext
    from llmos.tools.python import make, shared_packages, INTERPRETER

    if shared_packages(INTERPRETER) is None:
        pytest.skip("the sandbox's Python differs from the one running llmos; its compiled packages cannot be shared")
    ctx = ToolContext.under(tmp_path)
    tool = make(ctx)
    try:
        out = tool(code="import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.savefig('fig.png')\n'saved'")
    finally:
        tool.close()
    assert "saved" in out and "fig.png" in out
    png = ctx.workspace / "fig.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_bwrap
def test_file_roots_are_readable_but_not_writable(tmp_path):
    from llmos.tools import ToolContext
    from llmos.tools.python import make

    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("secret plan")
    ctx = ToolContext(artifacts=tmp_path / "a", workspace=tmp_path / "ws", file_roots=(data,))
    tool = make(ctx)
    try:
        assert "secret plan" in tool(code="open('/files/data/notes.txt').read()")
        out = tool(code="open('/files/data/new.txt', 'w').write('x')")
        assert "Read-only file system" in out or "Permission denied" in out
    finally:
        tool.close()
    assert not (data / "new.txt").exists()
