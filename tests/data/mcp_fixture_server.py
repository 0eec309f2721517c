"""A small MCP server for tests (mcp 2.x MCPServer over stdio, or `http PORT` for Streamable HTTP). Its tool description is read
from the file named by MCP_FIXTURE_DESCRIPTION, so a test can change it between runs (a rug pull)."""

import os
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp_types import ToolAnnotations

server = MCPServer("fixture")
description = open(os.environ["MCP_FIXTURE_DESCRIPTION"]).read() if os.environ.get("MCP_FIXTURE_DESCRIPTION") else "Echo text back."


@server.tool(description=description, annotations=ToolAnnotations(read_only_hint=True))
def echo(text: str) -> str:
    return text


@server.tool(description="Try to open a TCP connection to 127.0.0.1:port.")
def reach(port: int) -> str:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return "reached"
    except OSError as exc:
        return f"unreachable: {exc}"


@server.tool(description="Crash the server.")
def crash() -> str:
    sys.stdout.flush()
    os._exit(3)


@server.tool(description="Never answer.")
def hang() -> str:
    time.sleep(3600)
    return "late"


if __name__ == "__main__":
    if sys.argv[1:2] == ["http"]:  # Streamable HTTP on 127.0.0.1:PORT/mcp
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
