"""python: a stateful Python session per agent, inside a bubblewrap sandbox.

One long-lived child per session runs a small server (`_SERVER`, passed with `-c`) that reads
JSON requests on a private copy of stdin and answers on a pipe of its own, exec'ing each cell in
one persistent namespace. The cell's stdout/stderr are the child's fds 1 and 2, read by the
parent while the cell runs, so a flood is read and dropped (never a deadlock) and a timeout still
shows what was printed before it. The child runs Debian's `/usr/bin/python3` under `bwrap`:
every namespace unshared (no network, own pids), `/usr` read-only, a private `/tmp` tmpfs and one
writable folder, the workspace, mounted at `/workspace`; the user's home is simply not there.
The server sets rlimits on itself before the first cell (address space, CPU, file size, open
files, processes). Root is exempt from RLIMIT_NPROC, so when running as root each session gets a
pids cgroup of its own where the host offers one. A call that runs past its wall-clock limit gets
the whole sandbox killed (bwrap's pid namespace dies with its init) and the next call starts fresh.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable

from pydantic import Field

from llmos.config import PythonOptions  # noqa: F401 - the python tool's options live in the config tree
from llmos.toolbox import Tool, make_tool

if TYPE_CHECKING:
    from llmos.tools import ToolContext

BWRAP = shutil.which("bwrap") or "/usr/bin/bwrap"
INTERPRETER = "/usr/bin/python3"  # Debian's: the project venv lives under /root, which stays hidden
SANDBOX_PACKAGES = "/opt/llmos-packages"  # where llmos's own site-packages appear, read-only


@functools.lru_cache(maxsize=None)
def shared_packages(interpreter: str) -> Path | None:
    """The site-packages of the Python running llmos (numpy, matplotlib, sympy), if the sandbox's
    interpreter has the same major.minor version and so can import its compiled modules."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    try:
        out = subprocess.run([interpreter, "-E", "-s", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    same = out.stdout.strip() == "%d.%d" % sys.version_info[:2]
    return purelib if same and purelib.is_dir() else None
SANDBOX_WORKSPACE = "/workspace"
SANDBOX_UID = 1000  # uid seen inside; maps to the caller's own uid outside, so workspace files stay the caller's
MAX_CODE = 200_000  # characters per cell
MAX_REPLY = 1 << 20  # bytes of one JSON reply line; the server caps its texts far below this
FLOOD = 10  # a cell whose output passes this many times the cap is stopped, not drained
MAX_TRACKED_FILES = 10_000  # workspace entries compared per call
CODE_HELP = "Python 3 source; the last expression's value is shown, e.g. 'import math\\nmath.sqrt(2)'"
SANDBOXED_TOUCHES = "its workspace folder only (bubblewrap: no network, read-only system)"


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot start here, and unsandboxed Python was not allowed."""


# The server inside the sandbox. Kept to the stdlib and to one function so it reads in one sitting;
# its frames are filtered out of tracebacks by their file name, "<string>" (it runs with -c).
_SERVER = r'''
import ast, builtins, io, json, linecache, os, resource, signal, sys, time, traceback, types

def main():
    cfg = json.loads(sys.argv[1])
    sys.path.extend(cfg.get("path", []))  # read-only packages (numpy, matplotlib) of the llmos install
    cap = cfg["output_bytes"]
    FLOOD = cfg["flood"]
    me = os.getpid()
    if cfg.get("pdeathsig"):  # unsandboxed: no bwrap to kill us when the parent dies
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != cfg["parent"]:
            os._exit(1)
    requests = os.fdopen(os.dup(0), "rb")  # os.dup is close-on-exec: cells and their children never see it
    replies = os.dup(cfg["reply_fd"])
    os.close(cfg["reply_fd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # input() in a cell gets EOF instead of reading requests
    os.close(null)

    def setlimit(name, soft, hard=None):
        res = getattr(resource, name)
        cur_hard = resource.getrlimit(res)[1]
        hard = soft if hard is None else hard
        if cur_hard != resource.RLIM_INFINITY:
            hard = min(hard, cur_hard)
        resource.setrlimit(res, (min(soft, hard), hard))

    setlimit("RLIMIT_CORE", 0)
    setlimit("RLIMIT_AS", cfg["memory"])
    setlimit("RLIMIT_FSIZE", cfg["file"])
    setlimit("RLIMIT_NOFILE", 1024)
    setlimit("RLIMIT_NPROC", cfg["nproc"])
    setlimit("RLIMIT_CPU", cfg["cpu"], cfg["cpu_total"])

    class CPUTimeLimitExceeded(Exception):
        pass

    def on_xcpu(signum, frame):
        raise CPUTimeLimitExceeded(f"CPU time limit of {cfg['cpu']} s per call exceeded")

    class OutputFlood(BaseException):
        """Raised into a cell whose output runs far past the cap: it is stopped, not drained."""

    class Capped(io.RawIOBase):
        """fd 1 or 2 with a per-call budget: past it, writes are counted and dropped, not sent; past
        FLOOD times it, the cell is stopped (OutputFlood, which `except Exception` does not catch)."""
        def __init__(self, fd):
            self.fd, self.budget, self.dropped = fd, cap, 0
        def writable(self):
            return True
        def fileno(self):
            return self.fd
        def write(self, b):
            n = len(b)
            keep = max(0, min(n, self.budget))
            view = memoryview(b)[:keep]
            while view:
                view = view[os.write(self.fd, view):]
            self.budget -= keep
            self.dropped += n - keep
            if self.dropped > (FLOOD - 1) * cap:
                self.budget = 0  # the count stays over the line: every later write raises too
                raise OutputFlood(f"the cell printed more than {FLOOD} times the {cap}-byte output cap "
                                  "and was stopped; print less (a summary, or the first lines)")
            return n

    def stream(raw):
        return io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", errors="backslashreplace",
                                line_buffering=True)

    raws = [Capped(1), Capped(2)]
    streams = [stream(r) for r in raws]
    saved = [os.dup(1), os.dup(2)]  # a cell may close or redirect fds 1 and 2; the next one gets them back
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module  # pickle and friends find the cell's classes in __main__
    ns = module.__dict__
    sys.argv = [""]

    def clip(text):
        return text if len(text) <= cap else text[:cap] + f"\n[... {len(text) - cap} more characters not shown]"

    def error_text(exc):
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == "<string>":
            tb = tb.tb_next  # drop the server's own frames
        try:
            return clip("".join(traceback.format_exception(type(exc), exc, tb)).rstrip())
        except MemoryError:
            return type(exc).__name__

    def run(code, name):
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)  # source lines in tracebacks
        try:
            tree = ast.parse(code, name, "exec")
        except SyntaxError as exc:
            return {"error": clip("".join(traceback.format_exception_only(type(exc), exc)).rstrip())}
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        try:
            exec(compile(tree, name, "exec"), ns)
            if last is None:
                return {}
            value = eval(compile(ast.Expression(last.value), name, "eval"), ns)
            if value is None:
                return {}
            ns["_"] = value
            try:
                return {"value": clip(repr(value))}
            except BaseException as exc:
                return {"value": f"<repr failed: {type(exc).__name__}: {exc}>"}
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the session lives on
            return {"error": error_text(exc)}

    def reap_others():
        # Processes a cell started do not outlive it (a fork bomb would otherwise keep churning).
        if cfg["sandboxed"] and me == 2:  # our own pid namespace under bwrap's init: -1 means the sandbox
            for _ in range(3):
                try:
                    os.kill(-1, signal.SIGKILL)
                except ProcessLookupError:
                    break
        else:
            group = os.getpgid(0)
            for _ in range(20):
                found = False
                for entry in os.listdir("/proc"):
                    if entry.isdigit() and int(entry) != me:
                        try:
                            with open(f"/proc/{entry}/stat") as f:
                                fields = f.read().rsplit(")", 1)[1].split()
                        except OSError:
                            continue
                        if int(fields[2]) == group and fields[0] != "Z":
                            found = True
                            try:
                                os.kill(int(entry), signal.SIGKILL)
                            except ProcessLookupError:
                                pass
                if not found:
                    break
        for _ in range(100):  # killed children turn into zombies a moment later; collect them
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    time.sleep(0.001)
            except ChildProcessError:
                break

    def send(obj):
        data = memoryview((json.dumps(obj) + "\n").encode())
        while data:
            data = data[os.write(replies, data):]

    send({"ready": True, "python": sys.version.split()[0]})
    for n, line in enumerate(requests, 1):
        request = json.loads(line)
        for i, (fd, copy) in enumerate(zip((1, 2), saved)):
            os.dup2(copy, fd)
            if streams[i].closed:  # sys.stdout.close() in a cell closes our wrapper for good
                raws[i] = Capped(fd)
                streams[i] = stream(raws[i])
            raws[i].budget, raws[i].dropped = cap, 0
        sys.stdout, sys.stderr = streams
        if sys.stdin is None or sys.stdin.closed:  # exit() closes it
            sys.stdin = open(os.devnull)
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        setlimit("RLIMIT_CPU", int(used) + cfg["cpu"] + 1, cfg["cpu_total"])
        signal.signal(signal.SIGXCPU, on_xcpu)  # only while a cell runs: the server itself must not die of it
        reply = run(request["code"], f"<cell {n}>")
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        for s in streams:
            try:
                if not s.closed:
                    s.flush()
            except BaseException as exc:
                reply.setdefault("error", f"could not flush output: {exc}")
        if os.getpid() != me:
            os._exit(1 if "error" in reply else 0)  # a child forked by the cell must not become a second server
        reap_others()
        reply["dropped"] = [r.dropped for r in raws]
        try:
            send(reply)
        except MemoryError:
            send({"error": "MemoryError while sending the reply"})

main()
'''


def _spawn(*args: Any, **kwargs: Any) -> subprocess.Popen:
    """Popen from one long-lived thread: PR_SET_PDEATHSIG (the unsandboxed server sets it) fires when the
    spawning *thread* exits, and the Toolbox runs each call on a short-lived thread."""
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmos-python-spawn")
    return _spawner.submit(subprocess.Popen, *args, **kwargs).result()


_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


class _PidsCgroup:
    """A pids cgroup of one session's own; used as root, where RLIMIT_NPROC is not enforced."""

    _numbers = itertools.count(1)  # next() is atomic: sessions starting on two threads get distinct names

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, limit: int) -> "_PidsCgroup | None":
        """A fresh cgroup capped at `limit` tasks, or None where this host offers no writable one."""
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        candidates = []
        for line in lines:
            hid, controllers, own = line.split(":", 2)
            if "pids" in controllers.split(","):
                candidates.append(Path("/sys/fs/cgroup/pids") / own.lstrip("/"))
            elif hid == "0" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
                candidates.append(Path("/sys/fs/cgroup") / own.lstrip("/"))
        for base in candidates:
            cls._sweep(base)
            path = base / f"llmos-python-{os.getpid()}-{next(cls._numbers)}"
            try:
                path.mkdir()
            except OSError:
                continue
            try:
                (path / "pids.max").write_text(str(limit))
                return cls(path)
            except OSError:  # the pids controller is not enabled below this cgroup
                cls._remove(path)
        return None

    @staticmethod
    def _sweep(base: Path) -> None:
        """Remove cgroups left by llmos processes that were killed before they could clean up."""
        for stale in base.glob("llmos-python-*-*"):
            owner = stale.name.split("-")[2]
            if owner.isdigit() and not Path(f"/proc/{owner}").exists():
                try:
                    stale.rmdir()  # fails, harmlessly, while tasks remain in it
                except OSError:
                    continue

    def joiner(self) -> tuple[int, Callable[[], None]]:
        """An open fd and a preexec_fn that moves the child into this cgroup before it can fork anything."""
        fd = os.open(self.path / "cgroup.procs", os.O_WRONLY)  # opened here: the child must not allocate

        def join() -> None:
            os.write(fd, b"0")

        return fd, join

    def kill_all(self) -> None:
        for _ in range(50):
            try:
                pids = [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
            except OSError:
                return
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        self._remove(self.path)

    @staticmethod
    def _remove(path: Path) -> None:
        for _ in range(100):  # killed tasks leave the cgroup a moment after SIGKILL
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


def _user_tasks(uid: int) -> int:
    """Tasks (threads count) of one real uid: RLIMIT_NPROC outside a user namespace counts them all."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            total += int(fields.get("Threads", "1"))
    return total


def _terminate(proc: subprocess.Popen, cgroup: _PidsCgroup | None, fds: list[int]) -> None:
    """Kill a session's whole process tree and release what it held; safe to call twice."""
    if cgroup is not None:
        cgroup.kill_all()
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # bwrap leads its own group; its pid namespace dies with it
        except (ProcessLookupError, PermissionError):
            proc.kill()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass  # unkillable (D state); nothing more a user process can do
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass  # a broken pipe to a dead child has nothing left to flush
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass  # already closed
    if cgroup is not None:
        cgroup.remove()


def _snapshot(root: Path) -> tuple[dict[str, tuple[int, int, int]], bool]:
    """Relative path -> (mtime_ns, size, inode) for everything under root, symlinks not followed."""
    seen: dict[str, tuple[int, int, int]] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if len(seen) >= MAX_TRACKED_FILES:
                return seen, True
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
                continue
            seen[os.path.relpath(entry.path, root)] = (st.st_mtime_ns, st.st_size, st.st_ino)
    return seen, False


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass
class _Capture:
    """The first `cap` bytes of one stream, and how many bytes it had in all."""

    cap: int
    data: bytearray = field(default_factory=bytearray)
    total: int = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    def text(self, dropped: int = 0, unknown: bool = False) -> str:
        text = self.data.decode("utf-8", errors="replace")
        hidden = self.total + dropped - len(self.data)
        if hidden > 0:
            return text + f"\n[... {hidden} more bytes not shown]"
        return text + ("\n[... output truncated]" if unknown and len(self.data) >= self.cap else "")


@dataclass
class CellResult:
    """What one call produced; `text()` is what the model reads."""

    stdout: str = ""
    stderr: str = ""
    value: str | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)  # written or changed during the call, relative to the workspace
    removed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # timeouts, restarts, untracked files
    timed_out: bool = False

    def text(self) -> str:
        parts = []
        for label, body in (("stdout", self.stdout), ("stderr", self.stderr), ("error", self.error)):
            if body:
                parts.append(f"[{label}]\n{body.rstrip(chr(10))}")
        if self.value is not None:
            sep = "\n" if "\n" in self.value else " "
            parts.append(f"[value]{sep}{self.value}")
        if self.files or self.removed:
            more = len(self.files) - 50
            shown = ", ".join(self.files[:50]) + (f", ... ({more} more)" if more > 0 else "")
            line = f"[files] wrote {shown}" if self.files else "[files]"
            if self.removed:
                line += ("; " if self.files else " ") + "removed " + ", ".join(self.removed[:50])
            parts.append(line)
        parts.extend(f"[session] {note}" for note in self.notes)
        return "\n".join(parts) if parts else "(no output)"


class PythonSession:
    """One agent's persistent interpreter: started on first use, restarted after a kill, closed by `close()`."""

    def __init__(self, workspace: Path, options: PythonOptions | None = None, *, sandboxed: bool = True,
                 file_roots: tuple[Path, ...] = ()) -> None:
        self.workspace = Path(workspace)
        self.file_roots = tuple(Path(r) for r in file_roots)  # host folders readable at /files/<name>
        self.options = options or PythonOptions()
        self.sandboxed = sandboxed
        self.process_limit: str | None = None  # how the process cap is enforced: "rlimit", "cgroup" or None
        self._proc: subprocess.Popen | None = None
        self._reply_fd = -1
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Kill the session's processes (all of them) and forget its variables."""
        if self._finalizer is not None:
            self._finalizer()  # runs _terminate once; also registered for interpreter exit
        self._finalizer = None
        self._proc = None

    def _command(self, config: dict[str, Any]) -> tuple[list[str], dict[str, str], str]:
        server = [self.options.interpreter or INTERPRETER, "-E", "-s", "-B", "-c", _SERVER, json.dumps(config)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
               "MPLBACKEND": "Agg", "MPLCONFIGDIR": "/tmp"}
        packages = shared_packages(self.options.interpreter or INTERPRETER)
        if not self.sandboxed:
            return server, {**env, "HOME": str(self.workspace)}, str(self.workspace)
        args = [self._bwrap, "--unshare-all", "--unshare-user", "--disable-userns",
                "--die-with-parent", "--new-session",
                "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--hostname", "sandbox",
                "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):  # merged-/usr links, or real folders elsewhere
            host = Path("/") / name
            if host.is_symlink():
                args += ["--symlink", os.readlink(host), f"/{name}"]
            elif host.is_dir():
                args += ["--ro-bind", str(host), f"/{name}"]
        if packages is not None:
            args += ["--ro-bind", str(packages), SANDBOX_PACKAGES]
            config["path"] = [SANDBOX_PACKAGES]
            server[-1] = json.dumps(config)
        args += ["--proc", "/proc", "--dev", "/dev",
                 "--size", str(self.options.tmp_mb << 20), "--tmpfs", "/tmp",
                 "--bind", str(self.workspace), SANDBOX_WORKSPACE]
        for root in self.file_roots:  # read-only, after the workspace bind so they cannot be shadowed by it
            args += ["--ro-bind", str(root), f"/files/{root.name}"]
        args += ["--remount-ro", "/",
                 "--chdir", SANDBOX_WORKSPACE, "--clearenv"]
        for key, value in {**env, "HOME": SANDBOX_WORKSPACE, "TMPDIR": "/tmp"}.items():
            args += ["--setenv", key, value]
        return args + ["--"] + server, env, "/"

    def _refuse(self, why: str) -> SandboxUnavailable:
        return SandboxUnavailable(
            f"the python tool is disabled: it runs code only inside a bubblewrap sandbox, and {why}. "
            "Install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap), or set tools.python.unsandboxed: true "
            "to run code without a sandbox (explicit opt-in)."
        )

    @property
    def _bwrap(self) -> str:
        return self.options.bwrap or BWRAP  # read when used, so setting the module's BWRAP takes effect

    def _start(self) -> None:
        opts = self.options
        if self.sandboxed and not (os.path.isfile(self._bwrap) and os.access(self._bwrap, os.X_OK)):
            raise self._refuse(f"bwrap was not found at {self._bwrap!r}")
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.workspace = self.workspace.resolve()
        cgroup = _PidsCgroup.create(opts.processes + 4) if os.geteuid() == 0 else None  # +4: bwrap's own processes
        nproc = opts.processes
        if not self.sandboxed and cgroup is None and os.geteuid() != 0:
            nproc += _user_tasks(os.getuid())  # outside a user namespace the count is the user's whole
        self.process_limit = "cgroup" if cgroup else ("rlimit" if os.geteuid() != 0 else None)
        cpu = opts.cpu or int(opts.timeout) + 1
        reply_r, reply_w = os.pipe()
        config = {"reply_fd": reply_w, "output_bytes": opts.output_bytes, "flood": FLOOD, "memory": opts.memory_mb << 20,
                  "file": opts.file_mb << 20, "nproc": nproc, "cpu": cpu, "cpu_total": max(3600, cpu * 10),
                  "sandboxed": self.sandboxed, "pdeathsig": not self.sandboxed, "parent": os.getpid()}
        cmd, env, cwd = self._command(config)
        join_fd, preexec = cgroup.joiner() if cgroup else (-1, None)
        try:
            proc = _spawn(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          pass_fds=(reply_w,), cwd=cwd, env=env, start_new_session=True, preexec_fn=preexec)
        except OSError as exc:
            os.close(reply_r)
            if cgroup:
                cgroup.remove()
            if self.sandboxed:
                raise self._refuse(f"bwrap could not be run ({exc})") from None
            raise RuntimeError(f"could not start {opts.interpreter or INTERPRETER}: {exc}") from None
        finally:
            os.close(reply_w)
            if join_fd >= 0:
                os.close(join_fd)
        self._proc, self._reply_fd = proc, reply_r
        self._finalizer = weakref.finalize(self, _terminate, proc, cgroup, [reply_r])
        for fd in (proc.stdout.fileno(), proc.stderr.fileno(), reply_r):
            os.set_blocking(fd, False)
        reply, out, err = self._exchange(b"", time.monotonic() + opts.startup_timeout)
        if not isinstance(reply, dict) or not reply.get("ready"):
            self.close()
            detail = " ".join(err.text().split()) or (
                f"no reply in {opts.startup_timeout:g} s" if reply == "timeout" else f"server {reply}")
            if self.sandboxed:
                raise self._refuse(f"bwrap failed to start the sandbox ({detail})")
            raise RuntimeError(f"the unsandboxed python server failed to start: {detail}")

    # -- one call ----------------------------------------------------------------------------------

    def _exchange(self, request: bytes, deadline: float) -> tuple[dict[str, Any] | str, _Capture, _Capture]:
        """Send a request and read the cell's output and the reply: a dict, or "timeout", "exited",
        "flood" (output far past the cap) or "garbled"."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        cap = self.options.output_bytes
        out, err, reply = _Capture(cap), _Capture(cap), bytearray()
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        poller = select.poll()
        for fd in streams:
            poller.register(fd, select.POLLIN)
        poller.register(self._reply_fd, select.POLLIN)
        pending, stdin_fd = memoryview(request), proc.stdin.fileno()
        if pending:
            os.set_blocking(stdin_fd, False)
            poller.register(stdin_fd, select.POLLOUT)
        while b"\n" not in reply:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout", out, err
            for fd, event in poller.poll(remaining * 1000):
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending):]
                    except BlockingIOError:
                        continue
                    except OSError:  # the server is gone; its EOF on the reply pipe says so
                        pending = pending[:0]
                    if not pending:
                        poller.unregister(fd)
                    continue
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                except OSError:  # close() from another thread closed our end
                    return "exited", out, err
                if not chunk:
                    poller.unregister(fd)
                    if fd == self._reply_fd:  # the server died: collect its last words, then report
                        self._drain(streams)
                        return "exited", out, err
                elif fd == self._reply_fd:
                    reply += chunk
                    if len(reply) > MAX_REPLY:
                        return "garbled", out, err
                else:
                    streams[fd].add(chunk)
                    if out.total + err.total > FLOOD * cap:  # e.g. a child process writing to fd 1 itself
                        return "flood", out, err
        self._drain(streams)  # output written before the reply is already in the pipes
        try:
            parsed = json.loads(reply.split(b"\n", 1)[0])
        except ValueError:
            return "garbled", out, err
        return (parsed if isinstance(parsed, dict) else "garbled"), out, err

    @staticmethod
    def _drain(streams: dict[int, _Capture]) -> None:
        for fd, capture in streams.items():
            for _ in range(256):  # bounded: a background process may still be writing
                try:
                    chunk = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                capture.add(chunk)

    def run(self, code: str) -> CellResult:
        """Run one cell; timeouts and crashes are reported in the result, a missing sandbox raises."""
        if len(code) > MAX_CODE:
            raise ValueError(f"code is {len(code)} characters long; send at most {MAX_CODE} per call")
        if not self._lock.acquire(timeout=self.options.timeout):
            raise RuntimeError("another python call in this session is still running; try again when it ends")
        try:
            return self._run(code)
        finally:
            self._lock.release()

    def _run(self, code: str) -> CellResult:
        notes = []
        if self._proc is not None and not self.alive:
            self.close()
            notes.append("the previous session had ended; this call started a new one (variables were lost)")
        if self._proc is None:
            self._start()
        proc = self._proc  # close() from another thread may clear the attribute mid-call
        before, _ = _snapshot(self.workspace)
        timeout = self.options.timeout
        reply, out, err = self._exchange((json.dumps({"code": code}) + "\n").encode(), time.monotonic() + timeout)
        result = CellResult()
        dropped = [0, 0]
        if isinstance(reply, dict):
            result.value, result.error = _text_or_none(reply.get("value")), _text_or_none(reply.get("error"))
            if isinstance(reply.get("dropped"), list) and all(isinstance(n, int) for n in reply["dropped"][:2]):
                dropped = reply["dropped"][:2] + [0, 0][len(reply["dropped"][:2]):]
        else:
            if reply == "exited":
                try:
                    proc.wait(timeout=2)  # the reply pipe closes a moment before bwrap reports the exit
                except subprocess.TimeoutExpired:
                    pass
            status = proc.poll()
            self.close()
            if reply == "timeout":
                result.timed_out = True
                notes.append(f"timed out after {timeout:g} s; the session was restarted (variables were lost)")
            elif reply == "flood":
                notes.append(f"the output passed {FLOOD} times the {self.options.output_bytes}-byte cap; the cell was "
                             "stopped and the session restarted (variables were lost)")
            elif reply == "garbled":
                notes.append("the python process sent an unreadable reply; "
                             "the session was restarted (variables were lost)")
            else:
                notes.append(f"the python process {self._ending(status)}; "
                             "the session was restarted (variables were lost)")
        unknown = not isinstance(reply, dict)  # the server's count of dropped output died with it
        result.stdout, result.stderr = out.text(dropped[0], unknown), err.text(dropped[1], unknown)
        after, truncated = _snapshot(self.workspace)
        result.files = sorted(p for p, stat in after.items() if before.get(p) != stat)
        result.removed = sorted(p for p in before if p not in after)
        if truncated:
            notes.append(f"the workspace has more than {MAX_TRACKED_FILES} files; changes were not all tracked")
        result.notes = notes
        return result

    def _ending(self, status: int | None) -> str:
        if status is not None and self.sandboxed and status > 128:
            status = 128 - status  # bwrap reports its command's death by signal N as status 128 + N
        if status is not None and status < 0:
            try:
                return f"was killed by {signal.Signals(-status).name}"
            except ValueError:
                return f"was killed by signal {-status}"
        return f"exited with status {status}"

    def python(self, code: Annotated[str, Field(description=CODE_HELP)]) -> str:
        """Run Python code in this session and return what it printed, its value and the files it wrote."""
        return self.run(code).text()


def describe(options: PythonOptions, sandboxed: bool = True) -> str:
    """The paragraph the model reads about the tool."""
    where = ("a sandbox with no network, a read-only system and no pip; numpy and matplotlib import when "
             "llmos's own packages match the sandbox's Python" if sandboxed else "an UNSANDBOXED process on the host")
    return (
        f"Run Python 3 code in a persistent session ({where}): variables, imports and functions survive between "
        "calls, and the value of the last expression is shown as in a REPL, with stdout, stderr, errors and the "
        f"files written. The working directory is the workspace ({SANDBOX_WORKSPACE if sandboxed else 'a folder'}), "
        f"the only place to keep files. Each call may run {options.timeout:g} s and use "
        f"{options.memory_mb} MB of memory; past the time limit the session restarts and variables are lost. "
        "Processes started by a call are killed when it ends."
    )


def make(ctx: ToolContext) -> Tool:
    """The `python` tool for one agent: a session over `ctx.workspace` that starts on its first call."""
    options = ctx.python
    sandboxed = not options.unsandboxed
    session = PythonSession(ctx.workspace, options, sandboxed=sandboxed, file_roots=tuple(ctx.file_roots))
    touches = SANDBOXED_TOUCHES if sandboxed else (
        f"UNSANDBOXED (explicit opt-in): runs as your user with rlimits only, in {ctx.workspace}; "
        "it can read and write your files and reach the network"
    )
    # The Toolbox's own limit is a backstop: the session reports its timeout first, with the output so far.
    return make_tool(session.python, name="python", description=describe(options, sandboxed),
                     timeout=options.timeout + options.startup_timeout + 10, touches=touches, close=session.close,
                     examples=EXAMPLES, patterns=PATTERNS, check=_has_code, says=_says, reads=read,
                     # it runs code; what it prints can hold the text of the files it may read
                     effects=("executes",), untrusted=bool(ctx.file_roots))


EXAMPLES = (
    "Run this Python code: print(sum(range(10)))", "Use Python to compute the sum of the squares from 1 to 100.",
    "Execute this snippet and tell me the output: for i in range(3): print(i * i)",
    "Write and run a program that lists the prime numbers below 50.", "What does `sorted([5, 3, 9, 1])` return in Python?",
    "Run a script that counts the vowels in 'hello world'.", "In Python, what is len('llmos') * 7?",
    "Test this function for me: def f(x): return x * 2; print(f(21))",
)
PATTERNS = (r"```", r"\b(?:in|with|using|use|run|execute|write|python (?:code|script|program|snippet))\b[^.?!]{0,30}\bpython\b", r"\b(?:run|execute|test) (?:this|the|my|a) (?:code|script|snippet|program|function)\b",
            r"\bprint\(|\bdef \w+\(|\bimport \w+|\blambda\b")


def _says(arguments: Any, result: str) -> str:
    """An answer's opening for a cell that printed or returned one short thing."""
    shown = [line for line in result.splitlines() if line.strip() and not line.startswith("[files")]
    pieces = [line.split("]", 1)[-1].strip() if line.startswith("[") else line.strip() for line in shown]
    text = " ".join(p for p in pieces if p)
    if result.startswith(("[error]", "[stderr]")) or not text or len(text) > 120:
        return ""
    return f"The code gives {text}."


_IDLE = ("Module", "Expr", "Name", "Load", "BoolOp", "And", "Or", "Tuple", "Constant", "UnaryOp", "Not")


def _has_code(arguments: Any) -> bool:
    """A python call makes sense when its code compiles (Python's own parser, nothing runs) and
    does something: a bare name, number or "a and b" (words of a request that happen to parse)
    does not."""
    import ast
    import warnings

    code = str(arguments.get("code", ""))
    with warnings.catch_warnings():  # the model's code may warn at compile time; that is not ours to print
        warnings.simplefilter("ignore")
        compile(code, "<cell>", "exec")
        tree = ast.parse(code)
    return bool(code.strip()) and any(type(node).__name__ not in _IDLE for node in ast.walk(tree))


def read(request: str) -> dict[str, str] | None:
    """The code a request gives to run, read without the model: a fenced or `quoted` block, the
    text after the request's last colon, or the longest span of a one-line request that compiles
    and does something. None when the request gives no code (the model writes it)."""
    import re

    quoted = re.findall(r"```(?:python|py)?\s*\n?(.*?)```", request, re.S) + re.findall(r"`([^`\n]+)`", request)
    for code in quoted:
        if _runs(code, prose=False):
            return {"code": code.strip()}
    words = request.split()
    tails = [request.split(":", 1)[1], request.rsplit(":", 1)[1]] if ":" in request else []
    spans = [] if "\n" in request.strip() or len(words) > 60 else (
        " ".join(words[i:i + n]).rstrip(".?!") for n in range(len(words), 0, -1) for i in range(len(words) - n + 1))
    return next(({"code": code.strip()} for code in itertools.chain(tails, spans) if _runs(code, prose=True)), None)


def _runs(code: str, prose: bool) -> bool:
    """The code compiles and does something; prose=True (text taken from a sentence) also refuses
    what English happens to parse as: "what is len(x)" (an `is` between names), "vowels in 'abc'",
    "Python, what ..." (a tuple of them), "code: print(1)" (an annotation), "miles. How" (an
    attribute), and arithmetic alone, which is the calculator's."""
    import ast
    import re

    try:
        if not _has_code({"code": code}):
            return False
        tree = ast.parse(code.strip())
    except (SyntaxError, ValueError):
        return False
    if not prose:
        return True
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Tuple):
        return False
    if any(isinstance(node, ast.AnnAssign) for node in tree.body):  # "code: print(1)" is a label, not an annotation
        return False
    if re.search(r"[\w)'\"]\.\s+[A-Za-z]", code):  # "miles. How": two sentences, not an attribute
        return False
    program = (ast.Call, ast.Assign, ast.AugAssign, ast.For, ast.While, ast.If, ast.FunctionDef, ast.Import, ast.ImportFrom,
               ast.ListComp, ast.DictComp, ast.SetComp, ast.GeneratorExp, ast.Subscript, ast.Attribute, ast.Lambda)
    if not any(isinstance(node, program) for node in ast.walk(tree)):  # "17 * 23" is the calculator's
        return False
    return not any(isinstance(node, ast.Compare) and any(isinstance(op, (ast.Is, ast.IsNot, ast.In, ast.NotIn)) for op in node.ops)
                   and isinstance(node.left, ast.Name) for node in ast.walk(tree))