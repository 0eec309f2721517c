"""plot: line, scatter, bar and histogram charts from data the model passes, saved as PNG.

matplotlib runs with the Agg backend only (no window, no display). File names are made here from
a counter and a slug of the title, never from a path the model gives, so nothing is written
outside the artifacts folder.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from llmos.toolbox import Tool, make_tool

MAX_POINTS = 100_000
_LOCK = threading.Lock()  # pyplot's state machine is global; one figure at a time


class PlotError(ValueError):
    """Data that cannot be plotted; the message says what to fix."""


def _numbers(name: str, values: list) -> list[float]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise PlotError(f"{name}[{i}] is {v!r}; {name} must hold numbers")
        if not math.isfinite(v):
            raise PlotError(f"{name}[{i}] is {v}; only finite numbers can be plotted")
        out.append(float(v))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "plot"


def render(
    folder: Path,
    kind: str,
    y: list,
    x: Optional[list] = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    bins: int = 10,
    counter: "itertools.count[int] | None" = None,
) -> Path:
    """Draw one chart into `folder` and return the PNG's path; raises PlotError on bad data."""
    if not y:
        raise PlotError("y is empty; pass at least one number")
    if len(y) > MAX_POINTS or (x is not None and len(x) > MAX_POINTS):
        raise PlotError(f"too many points (at most {MAX_POINTS:,})")
    ys = _numbers("y", y)
    labels: list[str] | None = None
    xs: list[float] | None = None
    if x is not None and kind != "histogram":
        if len(x) != len(y):
            raise PlotError(f"x has {len(x)} values but y has {len(y)}; they must be the same length")
        if kind == "bar" and any(isinstance(v, str) for v in x):
            labels = [str(v) for v in x]
        else:
            xs = _numbers("x", x)
    if not 1 <= bins <= 1000:
        raise PlotError("bins must be between 1 and 1000")

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    n = next(counter) if counter is not None else len(list(folder.glob("*.png"))) + 1
    path = folder / f"{n:03d}-{kind}-{_slug(title)}.png"
    with _LOCK:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        try:
            positions = xs if xs is not None else list(range(len(ys)))
            if kind == "line":
                ax.plot(positions, ys, marker="o" if len(ys) <= 50 else None)
            elif kind == "scatter":
                ax.scatter(positions, ys)
            elif kind == "bar":
                ax.bar(labels if labels is not None else positions, ys)
            elif kind == "histogram":
                ax.hist(ys, bins=bins)
            else:
                raise PlotError(f"unknown kind {kind!r}; use line, scatter, bar or histogram")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel if kind != "histogram" else (ylabel or "count"))
            ax.grid(True, alpha=0.3)
            fig.tight_layout()
            # write to a temporary file in the same folder, then rename: no half-written PNGs
            fd, tmp = tempfile.mkstemp(suffix=".png.part", dir=folder)
            os.close(fd)
            try:
                fig.savefig(tmp, format="png")
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        finally:
            plt.close(fig)
    return path


def make(ctx) -> Tool:
    """The plot tool for one run: charts go to `ctx.artifacts`."""
    folder = Path(ctx.artifacts)
    counter = itertools.count(len(list(folder.glob("*.png"))) + 1 if folder.exists() else 1)

    def plot(
        kind: Annotated[Literal["line", "scatter", "bar", "histogram"], Field(description="Chart type")],
        y: Annotated[list[float], Field(description="The values (for a histogram: the samples)")],
        x: Annotated[Optional[list[Union[float, str]]], Field(description="Positions for y, or category names for a bar chart")] = None,
        title: str = "",
        xlabel: str = "",
        ylabel: str = "",
        bins: Annotated[int, Field(description="Histogram bins")] = 10,
    ) -> str:
        """Draw a line, scatter, bar or histogram chart from numbers and save it as a PNG file; returns its path."""
        path = render(folder, kind, y, x, title, xlabel, ylabel, bins, counter)
        what = f"{kind} chart of {len(y)} values" + (f" titled {title!r}" if title else "")
        return f"saved {what} to {path}"

    return make_tool(plot, timeout=60.0, touches=f"writes PNG files into {folder}", examples=EXAMPLES, patterns=PATTERNS,
                     effects="read-only",  # it writes only new files in its own artifacts folder
                     says="The chart is ready ({result}).")


EXAMPLES = (
    "Plot 1, 4, 9, 16, 25 as a line chart.", "Draw a bar chart of these sales: 12, 30, 18, 25.",
    "Make a scatter plot of x = 1, 2, 3, 4 against y = 2, 4, 5, 8.", "Chart the temperatures 14, 17, 12, 19, 21.",
    "Show a histogram of 3, 5, 5, 6, 7, 7, 7, 9.", "Graph my weekly steps: 8000, 9500, 7000, 12000.",
    "Visualize the values 0.5, 1.5, 1.2, 2.8 as a line.", "Can you plot the squares of 1 to 6?",
)
PATTERNS = (r"\b(?:plot|chart|graph|histogram|visuali[sz]e|draw)\w*\b[^.?!]*\d",)  # the word, then data
