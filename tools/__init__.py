"""Built-in tools ("devices"): each module is importable alone and usable without the kernel.

A built-in is either a Tool (stateless, e.g. the calculator) or a factory `make(ctx) -> Tool` for
tools that hold state or touch the outside (a sandbox session, a browser, an artifacts folder).
Factories must not start anything heavy: browsers and sandboxes start on first call.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# name -> "module:attribute"; imported only when the tool is enabled, so `import llmos` stays light.
BUILTIN = {
    "calculator": "llmos.tools.calculator:calculator",
    "plot": "llmos.tools.plot:make",
    "python": "llmos.tools.python:make",
    "browser": "llmos.tools.browser:make",
}


@dataclass(frozen=True)
class ToolContext:
    """Where a run's tools may read and write, and what they may reach. `python` and `browser`
    take their options objects (llmos.config) or plain dicts of the same fields."""

    artifacts: Path  # files the tools produce for the user (plots, screenshots)
    workspace: Path  # the python sandbox's one writable folder
    file_roots: tuple[Path, ...] = ()  # host folders the python sandbox may read (at /files/<name>)
    python: Any = None  # PythonOptions: sandbox limits, and `unsandboxed` (explicit opt-in only)
    browser: Any = None  # BrowserOptions: `allow_domains` and limits

    def __post_init__(self) -> None:
        from llmos.config import BrowserOptions, PythonOptions

        roots = [self.file_roots] if isinstance(self.file_roots, (str, Path)) else self.file_roots
        object.__setattr__(self, "file_roots", tuple(Path(r) for r in roots))

        for name, kind in (("python", PythonOptions), ("browser", BrowserOptions)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                object.__setattr__(self, name, _options(name, kind, value or {}))

    @classmethod
    def under(cls, folder: Path, **kwargs: Any) -> "ToolContext":
        """A context whose artifacts and workspace are sub-folders of one run folder."""
        return cls(artifacts=Path(folder) / "artifacts", workspace=Path(folder) / "workspace", **kwargs)


def _options(name: str, kind: Any, data: Any) -> Any:
    import pydantic

    from llmos.toolbox import ToolError

    try:
        return kind.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ToolError(f"invalid {name} options ({problems}); known: {', '.join(kind.model_fields)}") from None


def load_builtin(name: str, ctx: ToolContext | None = None) -> Any:
    """The Tool of a built-in; unknown names get the list of known ones (and a close match)."""
    from llmos.toolbox import Tool, ToolError

    if name not in BUILTIN:
        import difflib

        close = difflib.get_close_matches(name, BUILTIN, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ToolError(f"no built-in tool named {name!r}{hint}; available: {', '.join(BUILTIN)}")
    module, attr = BUILTIN[name].split(":")
    obj = getattr(importlib.import_module(module), attr)
    if isinstance(obj, Tool):
        return obj
    if ctx is None:
        import tempfile

        ctx = ToolContext.under(Path(tempfile.mkdtemp(prefix="llmos-tools-")))
    return obj(ctx)
