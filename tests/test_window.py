"""The context window: pressure notices, paging out to a store, summaries, core memory (scripted)."""

import json

from llmos import Kernel
from llmos.memory.window import Budget, Memory, fallback_summary
from llmos.messages import Message
from llmos.testing import ListStore, ScriptedBackend, call


def chat(kernel, text):
    return list(kernel.run(text))


def events(msgs):
    return [m.meta.get("event") for m in msgs if m.role == "kernel" and m.meta.get("event")]


def test_pressure_then_page_out_with_model_summary(tmp_path):
    long = "word " * 60  # ~75 tokens per message by the scripted count
    reply = "Ada keeps the lighthouse and her cat is called Tom."  # every turn, the summary request too
    backend = ScriptedBackend([reply] * 12, n_ctx=520)
    store = ListStore()
    kernel = Kernel(backend, tools=[], trace=tmp_path, memory=Memory(store))
    seen = []
    for i in range(6):
        seen += chat(kernel, f"message {i}: my keeper is Ada " + long)
    assert events(seen).count("memory_pressure") >= 1 and "page_out" in events(seen)
    assert events(seen).index("memory_pressure") < events(seen).index("page_out")
    assert kernel.memory.summary == reply  # the model's summary was usable, so it was used
    assert store.items and all(i["kind"] == "message" for i in store.items)
    system = backend.seen[-1].messages[1].content
    assert backend.seen[-1].messages[1].role == "system"
    assert "Summary of earlier conversation" in system and reply in system
    assert any("message 0" in h.text for h in store.search("message 0: keeper"))  # paged out, still findable
    # the window fits again, and the paging is in the trace
    assert backend.count(kernel.memory.view(), []) < 0.9 * 520
    assert any(json.loads(l).get("meta", {}).get("event") == "page_out" for l in kernel.trace.path.read_text().splitlines())


def test_unusable_summary_falls_back_to_a_deterministic_one():
    w = Memory(store=ListStore(), budget=Budget(keep_recent=1))
    for i in range(6):
        w.add(Message("user", f"fact number {i} " + "x " * 100))
    notices = list(w.fit(lambda msgs: sum(len(m.content) for m in msgs) // 4, 300, lambda msgs: ""))
    assert notices[-1].meta["event"] == "page_out"
    assert w.summary.startswith("- user: fact number 0")
    assert fallback_summary("", []) == ""


def test_tool_results_are_paged_out_with_their_call():
    w = Memory(budget=Budget(keep_recent=1, target=0.1))
    w.add(Message("user", "q " * 40))
    w.add(Message("assistant", "", tool_calls=(call("t"),)))
    w.add(Message("tool", "r " * 40, meta={"name": "t"}))
    w.add(Message("user", "now"))
    list(w.fit(lambda msgs: sum(len(m.content) + 40 for m in msgs) // 4, 100))
    assert [m.role for m in w.messages] in (["user"], ["assistant", "tool", "user"])
    assert w.messages[0].role != "tool"


def test_core_memory_tool_edits_the_visible_region(tmp_path):
    backend = ScriptedBackend([call("core_memory", action="append", text="User's name is Ada"), "noted",
                               call("core_memory", action="replace", text="User's name is Ada Lovelace", old="Ada"), "ok", "hi"])
    kernel = Kernel(backend, tools=[], trace=tmp_path, memory=Memory(ListStore()))
    chat(kernel, "my name is Ada")
    chat(kernel, "full name Ada Lovelace")
    chat(kernel, "hello")
    assert kernel.memory.core == ["User's name is Ada Lovelace"]
    assert "- User's name is Ada Lovelace" in backend.seen[-1].messages[1].content
    assert {"core_memory", "memory_search", "memory_insert"} <= set(backend.seen[0].tools)


def test_core_memory_errors_are_readable():
    w = Memory()
    try:
        w.edit_core("replace", "x", old="missing")
    except ValueError as exc:
        assert "no core memory fact contains 'missing'" in str(exc)
    else:
        raise AssertionError("expected an error")


def test_recall_attaches_retrieved_pages_to_the_user_turn(tmp_path):
    store = ListStore()
    store.add(["The lamp error code E-4521 means the lamp failed."], source="manual.md")
    backend = ScriptedBackend(["ok", "ok"])
    kernel = Kernel(backend, tools=[], trace=tmp_path, memory=Memory(store, recall=3))
    chat(kernel, "what does E-4521 mean")
    sent = backend.seen[0].messages[-1]
    assert sent.role == "user" and "<retrieved_pages>" in sent.content and "manual.md" in sent.content
    # the user's own words stay apart from the retrieved pages, which make the window untrusted
    assert sent.meta["user_text"] == "what does E-4521 mean" and sent.meta["retrieved"] == 1
    assert sent.meta["retrieved_from"] == ["manual.md"] and not sent.meta.get("untrusted")
    assert kernel.memory.taint() == ["memory"]
    chat(kernel, "zzz unrelated")
    assert "<retrieved_pages>" not in backend.seen[1].messages[-1].content
