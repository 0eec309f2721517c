"""The plot tool for real: matplotlib (Agg) writes real PNG files, only into the artifacts folder."""

import pydantic
import pytest

from llmos import ToolCall, Toolbox
from llmos.tools import ToolContext, load_builtin
from llmos.tools.plot import PlotError, render

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def plot(tmp_path):
    return load_builtin("plot", ToolContext.under(tmp_path))


def files(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["line", "scatter", "bar", "histogram"])
def test_each_kind_writes_a_png(plot, tmp_path, kind):
    out = plot(kind=kind, y=[1, 4, 9, 16, 25], title=f"Squares {kind}")
    path = tmp_path / "artifacts" / out.rsplit(" to ", 1)[1].split("/")[-1]
    assert path.exists() and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
    assert kind in out and "5 values" in out


def test_bar_with_category_names_and_x_positions(plot, tmp_path):
    plot(kind="bar", x=["a", "b", "c"], y=[3, 1, 2])
    plot(kind="line", x=[0.0, 0.5, 1.0], y=[1, 2, 3])
    assert len(files(tmp_path / "artifacts")) == 2


def test_bad_data_is_a_clear_error_and_writes_nothing(plot, tmp_path):
    with pytest.raises(PlotError, match="same length"):
        plot(kind="line", x=[1, 2], y=[1, 2, 3])
    with pytest.raises(PlotError, match="empty"):
        plot(kind="line", y=[])
    with pytest.raises(PlotError, match="numbers"):
        render(tmp_path / "artifacts", "line", ["a", "b"])
    with pytest.raises(PlotError, match="finite"):
        render(tmp_path / "artifacts", "line", [1.0, float("nan")])
    # through the toolbox: pydantic rejects non-numeric data before the tool runs
    msg = Toolbox([plot]).call(ToolCall("plot", {"kind": "line", "y": ["x", "y"]}))
    assert msg.meta["error"] and "invalid arguments" in msg.content
    assert files(tmp_path / "artifacts") == []


def test_title_cannot_escape_the_artifacts_folder(plot, tmp_path):
    plot(kind="line", y=[1, 2], title="../../../../etc/evil")
    written = files(tmp_path)
    assert len(written) == 1 and written[0].parent == tmp_path / "artifacts"


def test_schema_is_generated(plot):
    props = plot.parameters["properties"]
    assert props["kind"]["enum"] == ["line", "scatter", "bar", "histogram"]
    assert props["y"]["type"] == "array" and plot.parameters["required"] == ["kind", "y"]
