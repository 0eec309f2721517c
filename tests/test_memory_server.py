"""Memory shared through a real Chroma server (`chroma run` on 127.0.0.1, started here) by stores in different folders."""

import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from llmos.memory.embed import default_embedder
from llmos.memory.store import MemoryStore, StoreError
from llmos.task import TaskError, load_task

CHROMA = Path(sys.executable).with_name("chroma")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Chroma server on a free local port; its URL once it answers a heartbeat."""
    if not CHROMA.exists():
        pytest.skip(f"no chroma CLI at {CHROMA}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("chroma-log") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(CHROMA), "run", "--path", str(tmp_path_factory.mktemp("chroma-data")), "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        for _ in range(600):  # bounded wait for start-up (usually ~2 s; the CPU may be shared)
            if proc.poll() is not None:
                pytest.fail(f"chroma run exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                with opener.open(url + "/api/v2/heartbeat", timeout=1) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"chroma run did not answer on {url}:\n{log.read_text()[-2000:]}")
        yield url
    finally:
        proc.kill()
        proc.wait()


def test_two_machines_share_one_memory_through_the_server(server, tmp_path):
    ticket = str(uuid.uuid4())
    notes = [
        "The staging database is backed up every night at 02:00 to the cold storage bucket.",
        f"Support ticket {ticket}: the customer could not log in after the password reset.",
        "Our office plants are watered on Mondays and Thursdays.",
    ]
    with MemoryStore(tmp_path / "machine-a", default_embedder(), server=server) as a:
        added, _ = a.add(notes, collection="team-notes", source="a/notes.md", kind="fact")
        assert len(added) == 3
    # Another folder, as on another machine: its ledger is empty, everything comes from the server.
    with MemoryStore(tmp_path / "machine-b", default_embedder(), server=server) as b:
        assert b.count("team-notes") == 3 and "team-notes" in b.collections()
        by_meaning = b.search("when are backups of the database made?", k=1, collection="team-notes")
        assert by_meaning[0].text == notes[0]
        assert (by_meaning[0].source, by_meaning[0].position, by_meaning[0].kind) == ("a/notes.md", 0, "fact")
        by_id = b.search(f"what happened in {ticket}?", k=1, collection="team-notes", mode="keyword")
        assert by_id and by_id[0].text == notes[1]
        assert b.search(ticket.upper(), k=1, collection="team-notes")[0].text == notes[1]
        assert b.get(added[2]).text == notes[2]
        # B's own writes land in its ledger and on the server; both kinds of hits are fused.
        b.add(["The plants in the office need more light in winter."], collection="team-notes", source="b/todo.md")
        texts = [h.text for h in b.search("office plants", k=2, collection="team-notes")]
        assert set(texts) == {notes[2], "The plants in the office need more light in winter."}
        assert b.search("anything", collection="no-such-collection") == []
    with MemoryStore(tmp_path / "machine-a", default_embedder(), server=server) as a:
        assert a.count("team-notes") == 4
        # A's keyword index holds only A's writes, so B's chunk is found by meaning here.
        assert "b/todo.md" in [h.source for h in a.search("what needs more light in winter?", k=2, collection="team-notes")]


def test_local_writes_reach_a_server_configured_later(server, tmp_path):
    with MemoryStore(tmp_path / "mem", default_embedder()) as local:
        local.add(["The printer on the third floor jams when paper is damp."], collection="switched")
    with sqlite3.connect(tmp_path / "mem" / "ledger.sqlite3") as db:
        db.execute("DELETE FROM meta WHERE key='index'")  # as in a store made before server mode existed
    # The same folder now pointed at a server: chunks indexed only locally are sent there on open.
    with MemoryStore(tmp_path / "mem", default_embedder(), server=server):
        pass
    with MemoryStore(tmp_path / "other", default_embedder(), server=server) as other:
        assert other.search("why does the printer jam?", k=1, collection="switched")[0].text.startswith("The printer")


def test_server_down_is_one_readable_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(StoreError) as err:
        MemoryStore(tmp_path / "mem", default_embedder(), server=url)
    assert url in str(err.value) and "chroma run --path" in str(err.value)
    assert "Traceback" not in str(err.value)
    MemoryStore(tmp_path / "mem", default_embedder()).close()  # the failed open released the folder's lock


def test_silent_server_fails_instead_of_hanging(tmp_path):
    # A socket that accepts connections and never answers: a host that is up but not serving.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    outcome: list[BaseException] = []

    def open_store() -> None:
        try:
            MemoryStore(tmp_path / "mem", default_embedder(), server=url).close()
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever came out
            outcome.append(exc)

    worker = threading.Thread(target=open_store, daemon=True)
    worker.start()
    worker.join(120)  # a bound so a regression fails the test instead of hanging the suite
    listener.close()
    assert not worker.is_alive(), "opening a store against a silent server hung"
    assert len(outcome) == 1 and isinstance(outcome[0], StoreError) and url in str(outcome[0])


def test_server_stopping_mid_run_is_a_readable_error(tmp_path):
    if not CHROMA.exists():
        pytest.skip(f"no chroma CLI at {CHROMA}")
    port = free_port()
    proc = subprocess.Popen([str(CHROMA), "run", "--path", str(tmp_path / "db"), "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        store = None
        for _ in range(600):
            try:
                store = MemoryStore(tmp_path / "mem", default_embedder(), server=url)
                break
            except StoreError:
                time.sleep(0.1)
        assert store is not None, "chroma run did not start"
        store.add(["first note"], collection="notes")
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(StoreError, match="not reachable.*chroma run"):
        store.search("note", collection="notes")
    with pytest.raises(StoreError, match="saved in"):
        store.add(["second note"], collection="notes")
    assert store._db.execute("SELECT count(*) FROM chunks WHERE indexed=0").fetchone()[0] == 1  # kept for the next open
    store.close()


def test_task_file_memory_server(tmp_path):
    task = tmp_path / "task.yaml"
    task.write_text("goal: hi\nmemory:\n  enabled: true\n  server: http://127.0.0.1:8000\n")
    assert load_task(task).memory.server == "http://127.0.0.1:8000"
    for bad, why in [("127.0.0.1:8000", "is not an http:// or https:// URL"), ("http://127.0.0.1", "needs a host and a port"),
                     ("http://127.0.0.1:8000/api", "must be only scheme://host:port"), ("http://host:99999", "invalid port")]:
        task.write_text(f"goal: hi\nmemory:\n  enabled: true\n  server: '{bad}'\n")
        with pytest.raises(TaskError) as err:
            load_task(task)
        (line,) = err.value.problems
        assert line.startswith(f"{task}:4: memory.server: ") and why in line, line

