"""The shell driven for real in a pseudo-terminal (pexpect): ask, stream, slash commands, Ctrl-C, Ctrl-D."""

import os
import sys
import time

import pexpect
import pytest

PROMPT = "llmos>"


def command(shell, line, pattern, tries=3):
    """Type a line and wait for `pattern`. On a loaded machine, keys typed in the instant the new
    prompt takes the terminal can be lost; pressing Enter again is what a person would do."""
    shell.sendline(line)
    for attempt in range(tries):
        try:
            shell.expect(pattern, timeout=20 if attempt < tries - 1 else 120)
            return
        except pexpect.TIMEOUT:
            if attempt == tries - 1:
                raise
            shell.sendline(line)


def spawn(home, max_tokens):
    env = {**os.environ, "LLMOS_HOME": str(home), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "llmos.cli", "repl", "-o", f"sampling.max_tokens={max_tokens}"], env=env,
                          encoding="utf-8", timeout=120)
    child.expect_exact(PROMPT)
    return child


@pytest.fixture
def start_shell(llmos_home):
    children = []

    def start(max_tokens):
        children.append(spawn(llmos_home, max_tokens))
        return children[-1]

    yield start
    for child in children:
        if child.isalive():
            child.terminate(force=True)


@pytest.fixture
def shell(start_shell):
    return start_shell(48)


@pytest.fixture
def long_shell(start_shell):
    return start_shell(4000)


def test_ask_and_see_a_streamed_answer_then_commands(shell, llmos_home):
    shell.sendline("Say hello.")
    shell.expect("done: ")
    shell.expect_exact(PROMPT)
    answer = shell.before
    shell.sendline("/trace")
    shell.expect(r"traces/\S+\.jsonl")
    shell.expect_exact(PROMPT)
    shell.sendline("/memory")
    shell.expect(r"context window: \d+ / \d+ tokens")
    shell.expect_exact(PROMPT)
    save = llmos_home / "session.jsonl"
    shell.sendline(f"/save {save}")
    shell.expect("saved 2 messages")
    shell.expect_exact(PROMPT)
    shell.sendline("/reset")
    shell.expect("conversation cleared")
    shell.expect_exact(PROMPT)
    shell.sendline(f"/load {save}")
    shell.expect("loaded 2 messages")
    shell.expect_exact(PROMPT)
    shell.sendline("/expand")
    shell.expect("no tool calls")
    shell.expect_exact(PROMPT)
    shell.sendline("/nonsense")
    shell.expect("unknown command")
    shell.expect_exact(PROMPT)
    shell.sendeof()
    shell.expect(pexpect.EOF)


def test_the_shell_answers_arithmetic_through_the_calculator(start_shell):
    shell = start_shell(96)
    shell.sendline("What is 19 * 21?")
    shell.expect(r"calculator\(expression=")  # the call, shown as one line
    shell.expect("399")
    shell.expect("done: ")
    shell.expect_exact(PROMPT)
    shell.sendline("/exit")
    shell.expect(pexpect.EOF)


def test_ctrl_c_stops_generation_but_not_the_shell(long_shell):
    shell = long_shell
    shell.sendline("Write a very long story about the sea.")
    shell.expect_exact("about the sea.")  # the echo while typing
    shell.expect_exact("about the sea.")  # the final render when Enter is taken
    shell.expect(r"\n[^\n]*\w+ \w+ \w+ \w+")  # then the answer's tokens, streaming
    shell.sendintr()
    shell.expect("stopped")
    shell.expect_exact(PROMPT)
    time.sleep(1)  # let the new prompt take the terminal before typing
    command(shell, "/help", "/exit")
    shell.expect_exact(PROMPT)
    shell.sendline("/exit")
    shell.expect(pexpect.EOF)


def test_policy_questions_are_asked_with_why_and_always(llmos_home, capsys):
    from llmos.config import load_settings
    from llmos.messages import ToolCall
    from llmos.repl import Shell

    shell = Shell(load_settings(["tools=[calculator]"], home=llmos_home))
    asked = []
    answers = iter(["n", "a"])
    shell.ask = lambda text: asked.append(text) or next(answers)
    try:
        assert not shell.approve(ToolCall("python", {"code": "1"}), "the code copies lines from untrusted content")
        assert "why it asks: the code copies lines" in capsys.readouterr().err
        assert shell.approve(ToolCall("python", {"code": "2"}), "x")  # "always"
        assert shell.approve(ToolCall("python", {"code": "3"}), "x")  # no question any more
        assert len(asked) == 2 and "python" in asked[0]
    finally:
        shell.ready()
        shell.close()


def test_background_agent_from_a_task_file_listed_by_ps(shell, llmos_home):
    import json
    import subprocess
    from pathlib import Path

    env = {**os.environ, "LLMOS_HOME": str(llmos_home)}
    for _ in range(60):  # the shell's agent appears once the model has loaded behind the prompt
        ps = subprocess.run([sys.executable, "-m", "llmos", "ps", "--json"], env=env, capture_output=True, text=True, timeout=60)
        tables = json.loads(ps.stdout)
        if tables and tables[0]["agents"]:
            break
        time.sleep(0.5)
    assert [t["command"] for t in tables] == ["shell"]
    assert [a["name"] for a in tables[0]["agents"]] == ["shell"]

    task = Path(__file__).parent.parent / "examples" / "calculator.yaml"
    command(shell, f"/run {task} 5", "started agent calculator \\(priority 5\\)")
    shell.expect_exact(PROMPT)
    seen = ""
    deadline = time.monotonic() + 240
    while "agent calculator " not in seen or "calculator" not in seen:
        assert time.monotonic() < deadline, seen[-2000:]
        time.sleep(1)
        shell.sendline("/ps")
        shell.expect_exact(PROMPT)
        seen += shell.before
        if "done" in seen and ("agent calculator passed" in seen or "agent calculator checks failed" in seen):
            break
    assert "calculator" in seen and " 5 " in seen  # its row: name and priority
    command(shell, "/stop nobody", "no agent 'nobody'; agents: 1 \\(shell\\), 2 \\(calculator\\)")
    shell.expect_exact(PROMPT)
    command(shell, "/pause calculator", "agent 2 \\(calculator\\): paused")
    shell.expect_exact(PROMPT)
    result = list((llmos_home / "runs").glob("calculator*/result.json"))
    assert result and json.loads(result[0].read_text())["tools_called"] == ["calculator"]
    shell.sendline("/exit")
    shell.expect(pexpect.EOF)
    assert not list((llmos_home / "run").glob("*.json"))  # the shell's table is gone with it


def test_mcp_add_offers_a_servers_tools(llmos_home, capsys):
    pytest.importorskip("mcp_server_time")
    from llmos.config import load_settings
    from llmos.repl import Shell

    shell = Shell(load_settings(["tools=[calculator]", "memory.enabled=false"], home=llmos_home))
    try:
        shell.command(f"/mcp add time {sys.executable} -m mcp_server_time --local-timezone UTC")
        assert "time_convert_time" in shell.kernel.tools and "MCP server time: time_get_current_time" in capsys.readouterr().out
        shell.command("/mcp add broken no-such-mcp-server")
        assert "command 'no-such-mcp-server' not found" in capsys.readouterr().err
        shell.command("/mcp")
        assert "usage: /mcp add" in capsys.readouterr().out
    finally:
        shell.close()
