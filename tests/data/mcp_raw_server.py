"""A misbehaving MCP server for tests, speaking JSON-RPC over stdio by hand (no SDK, so it can send
what the SDK would never send). MCP_RAW_MODE picks the fault:

  results   tools `ok` (answers well), `garbled` (a result whose content is not a list),
            `noise` (a line that is not JSON, then nothing) and `wrong_id` (an answer to no request)
  schema    one tool whose input schema points at nothing ($ref), which no grammar can take
"""

import json
import os
import sys

MODE = os.environ.get("MCP_RAW_MODE", "results")
TEXT = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
TOOLS = {
    "results": [{"name": n, "description": f"The {n} tool.", "inputSchema": TEXT} for n in ("ok", "garbled", "noise", "wrong_id")],
    "schema": [{"name": "broken", "description": "A tool with a broken schema.",
                "inputSchema": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}}],
}[MODE]


def send(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    request = json.loads(line)
    method, rid = request.get("method"), request.get("id")
    if rid is None:
        continue  # a notification
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": rid, "result": {
            "protocolVersion": request["params"]["protocolVersion"], "capabilities": {"tools": {}},
            "serverInfo": {"name": "raw", "version": "0"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": rid, "result": {"tools": TOOLS}})
    elif method == "tools/call":
        name, args = request["params"]["name"], request["params"].get("arguments") or {}
        if name == "ok":
            send({"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": f"ok: {args.get('text')}"}]}})
        elif name == "garbled":
            send({"jsonrpc": "2.0", "id": rid, "result": {"content": "not a list", "isError": "maybe"}})
        elif name == "noise":
            sys.stdout.write("this is not JSON-RPC\n")
            sys.stdout.flush()
        elif name == "wrong_id":
            send({"jsonrpc": "2.0", "id": 987654, "result": {"content": []}})
    else:
        send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": f"no method {method}"}})
