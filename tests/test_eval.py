"""`llmos eval`: BFCL's AST rules on hand-made calls, suites loaded and checked, a scripted run
scored in-process, and the command itself on the real default model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmos.build import Resources
from llmos.config import load_settings
from llmos.evals import (EVAL_DEFAULTS, SuiteError, bfcl_tools, check_calls, evaluate, json_schema, load_suite,
                         percentile, validation_error)
from llmos.messages import ToolCall
from llmos.testing import ScriptedBackend, call

ROOT = Path(__file__).resolve().parent.parent
EVALS = ROOT / "examples" / "evals"

AREA = {
    "name": "geometry.area_circle",
    "description": "Area of a circle.",
    "parameters": {"type": "dict", "properties": {
        "radius": {"type": "float", "description": "The radius."},
        "units": {"type": "string", "description": "Units (default 'cm')."},
        "exact": {"type": "boolean", "description": "Keep pi symbolic."},
    }, "required": ["radius"]},
}
TRUTH = [{"geometry.area_circle": {"radius": [5.0], "units": ["cm", "centimeters", ""], "exact": ["", False]}}]


def ast(arguments, name="geometry_area_circle", function=AREA, truth=TRUTH):
    functions = bfcl_tools({"function": [function]})
    return check_calls(functions, [ToolCall(name, arguments)], truth)


def test_ast_accepts_an_int_for_a_float_and_omitted_optional_parameters():
    assert ast({"radius": 5}) is None
    assert ast({"radius": 5.0, "units": "cm", "exact": False}) is None


def test_ast_normalises_strings_as_bfcl_does():
    assert ast({"radius": 5, "units": "Centi-Meters"}) is None  # case, '-' and spaces do not count
    assert "units" in ast({"radius": 5, "units": "inches"})


def test_ast_rejects_wrong_values_types_extra_and_missing_parameters():
    assert "radius" in ast({"radius": 4.5})
    assert "expected float" in ast({"radius": "5"})
    assert "expected boolean" in ast({"radius": 5, "exact": 0})  # 0 is not False to BFCL
    assert ast({"radius": 5, "color": "red"}) == "unexpected parameter 'color'"
    assert ast({"units": "cm"}) == "missing required parameter 'radius'"


def test_ast_rejects_the_wrong_function_and_the_wrong_number_of_calls():
    assert "wrong function" in ast({"radius": 5}, name="other")
    functions = bfcl_tools({"function": [AREA]})
    assert check_calls(functions, [], TRUTH) == "no call"
    two = [ToolCall("geometry_area_circle", {"radius": 5})] * 2
    assert "2 call(s)" in check_calls(functions, two, TRUTH)


def test_ast_a_parameter_that_may_not_be_left_out():
    truth = [{"geometry.area_circle": {"radius": [5.0], "units": ["cm"]}}]
    assert ast({"radius": 5}, truth=truth) == "parameter 'units' left out but it may not be"


def test_ast_lists_and_dicts_element_wise():
    fn = {"name": "route", "description": "Plan a route.", "parameters": {"type": "dict", "properties": {
        "stops": {"type": "array", "items": {"type": "string"}, "description": "Stops in order."},
        "options": {"type": "dict", "properties": {"avoid": {"type": "string"}, "fast": {"type": "boolean"}}},
    }, "required": ["stops"]}}
    truth = [{"route": {"stops": [["New York, NY", "Boston"]], "options": [{"avoid": ["tolls"], "fast": ["", True]}, ""]}}]
    ok = lambda args: ast(args, name="route", function=fn, truth=truth)  # noqa: E731
    assert ok({"stops": ["new york ny", "BOSTON"]}) is None
    assert ok({"stops": ["Boston", "New York, NY"]}) is not None  # order matters
    assert ok({"stops": ["New York, NY", "Boston"], "options": {"avoid": "Tolls"}}) is None
    assert ok({"stops": ["New York, NY", "Boston"], "options": {"avoid": "ferries"}}) is not None
    assert ok({"stops": ["New York, NY", "Boston"], "options": {"avoid": "tolls", "scenic": True}}) is not None


def test_bfcl_docs_become_json_schema_with_openai_names():
    doc = {"name": "math.hypot", "description": "d", "parameters": {"type": "dict", "properties": {
        "x": {"type": "float"}, "point": {"type": "tuple", "items": {"type": "float"}}, "anything": {"type": "any"},
        "type": {"type": "string"}}, "required": ["x"]}}
    functions = bfcl_tools({"function": [doc]})
    fn = functions.tools[0]["function"]
    assert fn["name"] == "math_hypot" and functions.original == {"math_hypot": "math.hypot"}
    assert fn["parameters"] == {"type": "object", "properties": {
        "x": {"type": "number"}, "point": {"type": "array", "items": {"type": "number"}}, "anything": {},
        "type": {"type": "string"}}, "required": ["x"]}
    assert json_schema({"type": "dict", "properties": {"a": {"type": "dict", "properties": {}}}})["properties"]["a"]["type"] == "object"
    assert validation_error(fn["parameters"], {"x": 1, "anything": [1, {"b": None}]}) is None
    assert "'x' is a required property" in validation_error(fn["parameters"], {"point": [1.0, 2.0]})


def test_percentiles():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and percentile([1.0, 2.0], 0.95) == 1.95


def test_the_shipped_suites_load_and_are_big_enough():
    bfcl = load_suite(EVALS / "bfcl_simple.jsonl")
    routing = load_suite(EVALS / "routing.jsonl")
    assert 50 <= len(bfcl) <= 100 and {c.kind for c in bfcl} == {"bfcl"}
    needs = [c for c in routing if c.data["expect"] is not None]
    assert len(needs) >= 100 and len(routing) - len(needs) >= 30
    expected = {c.data["expect"] for c in needs}
    assert {"calculator", "plot", "python", "browser"} <= expected and len(expected - {"calculator", "plot", "python", "browser"}) >= 2
    assert all("answer_contains" in c.data or "answer_matches" in c.data for c in needs if c.id.startswith("calc-"))
    assert len(load_suite(EVALS / "routing.jsonl", limit=5)) == 5


@pytest.mark.parametrize("line, message", [
    ("not json", "2: not a JSON object"),
    ('{"prompt": "hi", "tools": ["calculater"], "expect": null}', "2: unknown tool 'calculater'; did you mean 'calculator'?"),
    ('{"prompt": "hi", "tools": ["calculator"], "expect": "plot"}', "2: 'expect' 'plot' is not one of the case's tools"),
    ('{"prompt": "hi", "tools": [], "expcet": null}', "2: unknown key 'expcet'; did you mean 'expect'?"),
    ('{"question": [[{"role": "user", "content": "x"}]], "function": [], "ground_truth": [{"f": {}}]}', "2: 'function'"),
    ('{"hello": 1}', "2: a case needs 'prompt' (routing) or 'ground_truth'"),
])
def test_a_bad_suite_line_names_the_file_and_line(tmp_path, line, message):
    suite = tmp_path / "bad.jsonl"
    suite.write_text('{"prompt": "hi", "tools": [], "expect": null}\n' + line + "\n")
    with pytest.raises(SuiteError) as exc:
        load_suite(suite)
    assert str(exc.value).startswith(f"{suite}:") and message in str(exc.value)
    with pytest.raises(SuiteError, match="no such suite file"):
        load_suite(tmp_path / "missing.jsonl")


def write_suite(path, cases):
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    return path


BFCL_CASE = {"id": "area", "question": [[{"role": "user", "content": "Area of a circle of radius 5 cm?"}]],
             "function": [AREA], "ground_truth": TRUTH}


def test_a_scripted_suite_is_run_and_scored_in_process(tmp_path):
    suite = write_suite(tmp_path / "mini.jsonl", [
        {"id": "mul", "prompt": "What is 17 * 23?", "tools": ["calculator"], "expect": "calculator", "answer_contains": "391"},
        {"id": "chat", "prompt": "hi!", "tools": ["calculator"], "expect": None},
        {"id": "wrong", "prompt": "good morning", "tools": ["calculator"], "expect": "calculator", "answer_contains": "42"},
        BFCL_CASE,
    ])
    settings = load_settings([], defaults=EVAL_DEFAULTS)
    backend = ScriptedBackend([
        "17 * 23 = 391.",  # the calculator reads "What is 17 * 23?" itself: no model turn for the call
        "Hello! How can I help?",
        "Good morning to you too.",
        call("geometry_area_circle", radius=5, units="cm"),  # auto
        # required: the wrong units, as often as the kernel asks (it may try candidates)
        *[call("geometry_area_circle", radius=5, units="inches")] * 4,
    ])
    resources = Resources()
    resources.backends[settings.model] = backend
    report = evaluate(load_suite(suite), settings, resources, folder=tmp_path / "run")
    assert len(backend.seen) >= 5 and report["model"] == "scripted"
    by_id = {(d["id"], d["mode"]): d for d in report["cases"]}
    assert by_id["mul", "auto"]["passed"] and by_id["mul", "auto"]["got"] == "calculator"
    assert by_id["mul", "auto"]["calls"] == [{"name": "calculator", "arguments": {"expression": "17 * 23"}}]
    assert Path(by_id["mul", "auto"]["trace"]).exists()
    assert by_id["chat", "auto"]["passed"] and by_id["chat", "auto"]["got"] is None
    wrong = by_id["wrong", "auto"]
    assert not wrong["passed"] and "no call" in wrong["reason"] and "answer lacks '42'" in wrong["reason"]
    assert by_id["area", "auto"]["passed"] and by_id["area", "auto"]["got"] == "geometry.area_circle"
    # The kernel may ground or re-sample the forced call; the verdict must be the AST check of what came.
    forced = by_id["area", "required"]
    calls = [ToolCall(c["name"].replace(".", "_"), c["arguments"]) for c in forced["calls"]]
    assert forced["got"] == "geometry.area_circle" and forced["passed"] == (check_calls(bfcl_tools(BFCL_CASE), calls, TRUTH) is None)
    routing, auto, required = (report["scores"][g] for g in ("routing", "bfcl:auto", "bfcl:required"))
    assert routing["cases"] == 3 and routing["selection"] == 0.6667 and routing["answer"] == 0.5
    assert routing["selection_no_tool"] == 1.0 and routing["per_tool"]["calculator"] == {"cases": 2, "selection": 0.5}
    assert routing["parse_rate"] == 1.0 and auto["ast"] == 1.0 and required["ast"] == float(forced["passed"])
    assert required["parse_rate"] == 1.0 and required["call_rate"] == 1.0
    assert set(routing["latency_s"]) == {"p50", "p95", "total"}
    for detail in report["cases"]:
        assert {"id", "expected", "got", "passed", "reason", "route", "seconds"} <= set(detail)


def test_a_case_that_raises_is_a_failed_case_not_the_end_of_the_suite(tmp_path):
    suite = write_suite(tmp_path / "mini.jsonl", [
        {"id": "boom", "prompt": "What is 2 + 2?", "tools": ["nosuchmodule:add"], "expect": "add"},
        {"id": "fine", "prompt": "hello", "tools": [], "expect": None},
    ])
    settings = load_settings([], defaults=EVAL_DEFAULTS)
    resources = Resources()
    resources.backends[settings.model] = ScriptedBackend(["Hello!"])
    report = evaluate(load_suite(suite), settings, resources)
    boom, fine = report["cases"]
    assert not boom["passed"] and boom["reason"].startswith("error: ConfigError") and "nosuchmodule" in boom["reason"]
    assert fine["passed"] and report["scores"]["routing"]["errors"] == 1 and "trace" not in fine


def llmos(*args, home):
    env = {**os.environ, "LLMOS_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "llmos.cli", *args], capture_output=True, text=True, timeout=600, env=env)


def test_llmos_eval_a_bad_suite_is_one_line_naming_file_and_line(tmp_path):
    suite = tmp_path / "bad.jsonl"
    suite.write_text('{"prompt": "hi", "tools": [], "expect": null}\n{"prompt": \n')
    proc = llmos("eval", str(suite), home=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"llmos: error: {suite}:2: not a JSON object")
    proc = llmos("eval", str(tmp_path / "nope.jsonl"), home=tmp_path)
    assert proc.returncode == 2 and "nope.jsonl: no such suite file" in proc.stderr


def test_llmos_eval_on_the_default_model_writes_a_report_and_a_plot(tmp_path):
    suite = write_suite(tmp_path / "three.jsonl", [
        {"id": "mul", "prompt": "What is 17 * 23?", "tools": ["calculator"], "expect": "calculator", "answer_contains": "391"},
        {"id": "chat", "prompt": "Write a haiku about the sea.", "tools": ["calculator", "plot"], "expect": None},
        BFCL_CASE,
    ])
    png, out = tmp_path / "scores.png", tmp_path / "report.json"
    proc = llmos("eval", str(suite), "--json", "--plot", str(png), "--out", str(out), "-o", "sampling.max_tokens=48",
                 "-o", "budget.steps=2", home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report
    assert "SmolLM2" in report["model"] and report["settings"]["modes"] == ["auto", "required"]
    assert set(report["scores"]) == {"routing", "bfcl:auto", "bfcl:required"}
    assert [(d["id"], d["mode"]) for d in report["cases"]] == [("mul", "auto"), ("chat", "auto"), ("area", "auto"), ("area", "required")]
    for group in report["scores"].values():
        assert {"cases", "selection", "parse_rate", "latency_s"} <= set(group)
        assert group["selection"] is None or 0 <= group["selection"] <= 1
    assert report["scores"]["routing"]["answer_cases"] == 1
    required = report["cases"][-1]
    assert required["got"] is not None and isinstance(required["ast"], bool)  # a forced turn always calls
    assert all(d["reason"] and not d["reason"].startswith("error:") for d in report["cases"]), report["cases"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class InterruptedBackend(ScriptedBackend):
    """Ctrl-C arrives during the second model turn."""

    def turn(self, *args, **kwargs):
        if len(self.seen) == 1:
            raise KeyboardInterrupt
        yield from super().turn(*args, **kwargs)


def test_an_interrupted_run_reports_the_cases_done(tmp_path):
    suite = write_suite(tmp_path / "mini.jsonl", [{"id": f"chat{i}", "prompt": "hello", "tools": [], "expect": None} for i in range(3)])
    settings = load_settings([], defaults=EVAL_DEFAULTS)
    resources = Resources()
    resources.backends[settings.model] = InterruptedBackend(["Hello!"] * 3)
    report = evaluate(load_suite(suite), settings, resources)
    assert report["interrupted"] and (report["cases_run"], report["cases_total"]) == (1, 3)
    assert [d["id"] for d in report["cases"]] == ["chat0"] and report["scores"]["routing"]["cases"] == 1
