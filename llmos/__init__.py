"""llmos: a local LLM operating system. A GGUF model is the kernel, tools are its devices.

Imports stay light: llama-cpp-python loads only when a model does.
"""

from llmos.kernel import Kernel, Trace
from llmos.messages import Message, ToolCall
from llmos.toolbox import Tool, Toolbox, tool

__all__ = ["Kernel", "Message", "Tool", "ToolCall", "Toolbox", "Trace", "tool"]
__version__ = "0.1.0"
