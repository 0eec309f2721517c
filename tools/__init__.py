"""Built-in tools ("devices"): each module is importable alone and usable without the kernel."""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:attribute"; imported only when the tool is enabled, so `import llmos` stays light.
BUILTIN = {
    "calculator": "llmos.tools.calculator:calculator",
}


def load_builtin(name: str) -> Any:
    """The Tool object of a built-in tool; unknown names get the list of known ones."""
    from llmos.toolbox import ToolError

    if name not in BUILTIN:
        import difflib

        close = difflib.get_close_matches(name, BUILTIN, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ToolError(f"no built-in tool named {name!r}{hint}; available: {', '.join(BUILTIN)}")
    module, attr = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)
