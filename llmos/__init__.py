"""llmos: a local LLM operating system. A GGUF model is the kernel, tools are its devices.

`build(config, tools=...)` makes a ready Kernel (the composition root, llmos/build.py).
Imports stay light: llama-cpp-python loads only when a model does.
"""

from llmos.build import Resources, build
from llmos.kernel import Kernel
from llmos.messages import Message, ToolCall, Trace
from llmos.toolbox import Tool, Toolbox, tool

__all__ = ["Kernel", "Message", "Resources", "Tool", "ToolCall", "Toolbox", "Trace", "build", "tool"]
__version__ = "0.1.0"
