"""Browser tool speed on a local page; prints JSON.

    .venv/bin/python benchmarks/browser_tool_speed.py [--runs 10]

cold_start_s   the first `open` of a local page, Chromium launch included
warm_open_ms   median of `open` on the same page with the browser running (target < 200 ms),
               with min and max; each open is a real navigation plus reading the page's text
warm_find_ms   median of `find` on the open page (no navigation: the cost of one round trip)
close_s        closing the browser (all its processes gone)

The page is served from 127.0.0.1 by this script; nothing else is contacted.
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from llmos.tools import ToolContext
from llmos.tools.browser import DEBIAN_CHROMIUM, Browser

PAGE = ("<!doctype html><title>Bench</title><h1>Benchmark page</h1>"
        + "".join(f"<p>Paragraph {i}: the quick brown fox jumps over the lazy dog.</p>" for i in range(50))
        + "<a href='/'>again</a><form action='/'><input name=q><button>Go</button></form>").encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        return  # keep the JSON alone on stdout

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.send_header("Cache-Control", "no-store")  # every open is a real load
        self.end_headers()
        self.wfile.write(PAGE)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as tmp:
        browser = Browser(ToolContext.under(Path(tmp), browser={"allow_domains": ["127.0.0.1"]}))
        tool = browser.tool
        try:
            cold = timed(tool, action="open", url=url)
            warm = [timed(tool, action="open", url=url) * 1000 for _ in range(args.runs)]
            find = [timed(tool, action="find", text="Paragraph 42") * 1000 for _ in range(args.runs)]
        finally:
            close = timed(browser.close)
    server.shutdown()
    version = subprocess.run([DEBIAN_CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    median = statistics.median(warm)
    print(json.dumps({
        "chromium": version or None,
        "cold_start_s": round(cold, 3),
        "warm_open_ms": {"median": round(median, 1), "min": round(min(warm), 1), "max": round(max(warm), 1), "runs": args.runs},
        "warm_find_ms": {"median": round(statistics.median(find), 1)},
        "close_s": round(close, 3),
        "target_warm_open_ms": 200,
        "meets_target": median < 200,
    }, indent=2))


if __name__ == "__main__":
    main()
