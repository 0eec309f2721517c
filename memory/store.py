"""The long-term store ("disk"): a SQLite ledger with FTS5 keyword search plus a Chroma vector index.

Layout of a store folder:
  ledger.sqlite3  every chunk (text, source, position, kind, content hash) and an FTS5 index; the
                  source of truth, committed (WAL, synchronous=FULL) before `add` returns
  chroma/         Chroma PersistentClient; a derived index, re-synced from the ledger on open
                  (chunks whose vector never landed are re-embedded) and rebuilt by `rebuild()`
  lock            fcntl lock holding the writer's PID: Chroma is not safe for two processes

With `server="http://host:port"` the vector index is a Chroma server (`chroma run`) instead of
chroma/, so several machines, each with its own folder, share one memory. The server's collection
then holds each chunk's text and metadata too: a hit another machine wrote comes back whole, and
identifier-like query words are matched verbatim there (`$contains`) since this ledger's keyword
index only knows local writes. The ledger stays the durable record of this machine's writes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

SCHEMA_VERSION = 1
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al.); damps the top ranks' dominance
KEYWORD_FLOOR = 0.25  # keyword hits scoring under this fraction of the best one are not fused
# bm25 scores every chunk a query matches: at 100k chunks a question OR-ing all its words matched
# nearly all of them and took ~170 ms. So words join the query rarest first until about this many
# chunks match (the rarest word always joins); common words carry little bm25 weight anyway.
# Measured on the recall set searched beside 100k other chunks: recall@5 as without the budget.
KEYWORD_POSTINGS = 3000
COMMON_SHARE = 0.5  # a word in more than this share of chunks has bm25 idf <= 0 (FTS5 clamps it to ~0)
COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")  # what Chroma accepts
KINDS = ("message", "fact", "document")
SERVER_TIMEOUT = 3.0  # seconds to connect to a Chroma server: a dead or unreachable one fails fast
SERVER_READ_TIMEOUT = 60.0  # seconds for one request's answer (a large upsert on a busy server)
LOCAL_INDEX = "local"  # meta 'index' value when the vector index is the chroma/ folder


class StoreError(RuntimeError):
    """A store that cannot be used as asked: locked, corrupt, or from another version."""


class StoreLocked(StoreError):
    """Another live process holds the store's writer lock."""


class StoreCorrupt(StoreError):
    """The vector index (or ledger) cannot be read; `rebuild()` re-embeds from the ledger."""


@dataclass(frozen=True)
class Hit:
    """One search result: the chunk, where it came from, and its fused score (higher is better)."""

    id: str
    text: str
    source: str
    position: int
    kind: str
    score: float
    meta: Mapping[str, Any] = field(default_factory=dict)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_path() -> Path:
    from llmos.config import home_dir

    return home_dir() / "memory"


def parse_server_url(url: str) -> tuple[str, int, bool]:
    """(host, port, ssl) of a Chroma server URL such as http://127.0.0.1:8000; ValueError says what is wrong."""
    from urllib.parse import urlsplit

    example = "e.g. http://127.0.0.1:8000"
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} is not an http:// or https:// URL ({example})")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r} has an invalid port ({example})") from None
    if not parts.hostname or port is None:
        raise ValueError(f"{url!r} needs a host and a port ({example})")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{url!r} must be only scheme://host:port ({example})")
    return parts.hostname, port, parts.scheme == "https"


def _identifiers(query: str) -> list[str]:
    """Query words that look like IDs or codes (4+ characters with a digit or '_'), to match verbatim."""
    words: list[str] = []
    for word in query.split():
        word = word.strip(".,;:!?()[]{}<>\"'`")
        if len(word) >= 4 and (any(ch.isdigit() for ch in word) or "_" in word) and word not in words:
            words.append(word)
    return words[:8]


def _tokens(word: str) -> list[str]:
    """The FTS5 unicode61 tokens of a word: runs of letters and digits, lowercased, accents dropped."""
    folded = unicodedata.normalize("NFKD", word.lower())
    return re.findall(r"[^\W_]+", "".join(ch for ch in folded if not unicodedata.combining(ch)))


def _phrase(word: str) -> str:
    """A word as a quoted FTS5 phrase, so punctuation in it cannot break the query syntax."""
    return '"' + word.replace('"', '""') + '"'


class _Lock:
    """An exclusive, non-blocking fcntl lock on `<folder>/lock` that records the holder's PID."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise StoreLocked(f"store {folder} is in use by PID {holder}; close that process or use another folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = -1


def _forget_chroma_system(folder: Path) -> None:
    """Chroma caches one System per folder per process; a half-opened one would poison every retry."""
    from chromadb.api.shared_system_client import SharedSystemClient

    system = SharedSystemClient._identifier_to_system.pop(str(folder), None)
    SharedSystemClient._identifier_to_refcount.pop(str(folder), None)
    if system is not None:
        try:
            system.stop()
        except Exception as exc:  # noqa: BLE001 - stopping a broken system may fail; it is discarded either way
            import logging

            logging.getLogger(__name__).debug("discarding broken Chroma system for %s: %s", folder, exc)


def _serialized(method: Callable[..., Any]) -> Callable[..., Any]:
    import functools

    @functools.wraps(method)
    def wrapper(self: "MemoryStore", *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            return method(self, *args, **kwargs)

    return wrapper


class MemoryStore:
    """Chunks of text with metadata in named collections; hybrid (vector + keyword) search."""

    def __init__(
        self,
        path: str | Path | None = None,
        embedder: Callable[[Sequence[str]], Any] | None = None,
        *,
        server: str | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.server = server.strip().rstrip("/") if server else None
        if self.server:
            try:
                parse_server_url(self.server)
            except ValueError as exc:
                raise StoreError(f"memory server {exc}") from None
        self.path.mkdir(parents=True, exist_ok=True)
        if embedder is None:
            from llmos.memory.embed import default_embedder

            embedder = default_embedder()
        self.embedder = embedder
        self._lock = _Lock(self.path)
        # Tool calls of one turn run on parallel threads; one ledger connection means one at a time.
        self._mutex = threading.RLock()
        self._client: Any = None
        self._collections: dict[str, Any] = {}
        self._df: dict[str, int] = {}  # term -> chunks holding it, looked up once per term (fts5vocab reads its doclist)
        self._df_rows = 0  # ledger size when _df was started; it is dropped after 10% growth or shrinkage
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # runs the keyword side of hybrid searches
        try:
            self._db = self._open_ledger()
            self._open_index()
            self._sync()
        except BaseException:
            self.close()
            raise

    # ---- opening -------------------------------------------------------------------------------

    def _open_ledger(self) -> sqlite3.Connection:
        file = self.path / "ledger.sqlite3"
        try:
            db = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss, not just kill -9
            db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS chunks (
                    rowid INTEGER PRIMARY KEY,
                    id TEXT NOT NULL UNIQUE,          -- collection-scoped: '<collection>:<hash[:32]>'
                    collection TEXT NOT NULL,
                    hash TEXT NOT NULL,
                    text TEXT NOT NULL,
                    source TEXT NOT NULL DEFAULT '',
                    position INTEGER NOT NULL DEFAULT 0,
                    kind TEXT NOT NULL DEFAULT 'document',
                    meta TEXT NOT NULL DEFAULT '{}',
                    created REAL NOT NULL,
                    indexed INTEGER NOT NULL DEFAULT 0, -- 1 once its vector is in Chroma
                    UNIQUE (collection, hash)
                );
                CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, content='chunks', content_rowid='rowid');
                CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vocab USING fts5vocab(chunks_fts, 'row');  -- term, doc (chunks holding it)
                CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
                    INSERT INTO chunks_fts(rowid, text) VALUES (new.rowid, new.text);
                END;
                CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
                    INSERT INTO chunks_fts(chunks_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
                END;
                """
            )
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError(f"store {self.path} has schema version {row[0]}, this llmos reads {SCHEMA_VERSION}; use a new folder")
            name = self._embedder_name()
            row = db.execute("SELECT value FROM meta WHERE key='embedder'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('embedder', ?)", (name,))
            elif row[0] != name:
                # Vectors from another model are meaningless to this one: the index must be rebuilt.
                db.execute("UPDATE chunks SET indexed=0")
                db.execute("UPDATE meta SET value=? WHERE key='embedder'", (name,))
                _forget_chroma_system(self.path / "chroma")
                shutil.rmtree(self.path / "chroma", ignore_errors=True)
            return db
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupt(
                f"store ledger {file} is unreadable ({exc}); restore it from a backup or move the folder aside and start fresh"
            ) from None

    def _open_index(self) -> None:
        import chromadb
        from chromadb.config import Settings

        if self.server:
            self._open_server()
            return
        try:
            self._client = chromadb.PersistentClient(
                path=str(self.path / "chroma"), settings=Settings(anonymized_telemetry=False, allow_reset=True)
            )
            for name in self._local_collections():
                self._collection(name).count()
        except Exception as exc:  # noqa: BLE001 - Chroma raises many types for a damaged folder; all mean the same
            self._drop_client()
            _forget_chroma_system(self.path / "chroma")
            raise StoreCorrupt(
                f"vector index {self.path / 'chroma'} is unreadable ({type(exc).__name__}: {exc}); "
                f"fix: MemoryStore.rebuild({str(self.path)!r}) re-embeds everything from the ledger"
            ) from None

    def _open_server(self) -> None:
        import chromadb
        import httpx
        from chromadb.config import Settings

        host, port, ssl = parse_server_url(self.server)
        self._probe()  # Chroma's own client waits forever on a silent host; ask with a deadline first
        with self._remote():
            self._client = chromadb.HttpClient(host=host, port=port, ssl=ssl, settings=Settings(anonymized_telemetry=False))
            # Chroma's HTTP session has no timeout and no setting for one; without this a server
            # that stops answering mid-run would hang the agent instead of raising StoreError.
            session = getattr(getattr(self._client, "_server", None), "_session", None)
            if isinstance(session, httpx.Client):
                session.timeout = httpx.Timeout(SERVER_READ_TIMEOUT, connect=SERVER_TIMEOUT)
            for name in self._local_collections():
                self._collection(name)

    def _unreachable(self, reason: object) -> str:
        _, port, _ = parse_server_url(self.server)
        return (
            f"Chroma server {self.server} is not reachable ({reason}); "
            f"fix: start it with `chroma run --path DIR --port {port}` on that host, or correct memory.server"
        )

    def _probe(self) -> None:
        import urllib.error
        import urllib.request

        # No proxy: the server is named by address, and a proxy would turn "down" into a proxy's error page.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.server + "/api/v2/heartbeat", timeout=SERVER_TIMEOUT) as reply:
                reply.read()
        except urllib.error.HTTPError as exc:
            raise StoreError(f"{self.server} answered HTTP {exc.code} to a heartbeat; is it a Chroma 1.x server (`chroma run`)?") from None
        except (urllib.error.URLError, OSError) as exc:
            raise StoreError(self._unreachable(getattr(exc, "reason", exc))) from None

    @contextlib.contextmanager
    def _remote(self) -> Iterator[None]:
        """Turn a failing call to the Chroma server into one StoreError naming the URL and the fix."""
        if not self.server:
            yield
            return
        import httpx
        from chromadb.errors import ChromaError

        try:
            yield
        except httpx.TransportError as exc:
            raise StoreError(self._unreachable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)) from None
        except ChromaError as exc:
            raise StoreError(f"Chroma server {self.server} refused the request: {exc}") from None

    def _drop_client(self) -> None:
        if self._client is not None:
            close = getattr(self._client, "close", None)
            if close is not None:
                close()
        self._client = None
        self._collections.clear()

    def _collection(self, name: str, create: bool = True) -> Any:
        """The Chroma collection `name`; with create=False, None where it does not exist yet."""
        if name not in self._collections:
            from chromadb.errors import NotFoundError

            embedder = self._embedder_name()
            with self._remote():
                try:
                    col = self._client.get_collection(name, embedding_function=None)
                except NotFoundError:
                    if not create:
                        return None
                    col = self._client.create_collection(
                        name, embedding_function=None, metadata={"hnsw:space": "cosine", "llmos_embedder": embedder}
                    )
            found = (col.metadata or {}).get("llmos_embedder", embedder)
            if self.server and found != embedder:
                # Vectors from another model are meaningless to this one, and the collection is shared.
                raise StoreError(
                    f"collection {name!r} on {self.server} holds vectors from embedder {found}, this store embeds with "
                    f"{embedder}; use the same embedder everywhere or another memory.collection"
                )
            self._collections[name] = col
        return self._collections[name]

    def _embedder_name(self) -> str:
        return getattr(self.embedder, "name", lambda: type(self.embedder).__name__)()

    def _local_collections(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT collection FROM chunks ORDER BY collection")]

    def _in_ledger(self, collection: str) -> bool:
        return self._db.execute("SELECT 1 FROM chunks WHERE collection=? LIMIT 1", (collection,)).fetchone() is not None

    def _sync(self) -> None:
        """Make the vector index agree with the ledger after a crash or a switch of index (folder <-> server)."""
        target = self.server or LOCAL_INDEX
        row = self._db.execute("SELECT value FROM meta WHERE key='index'").fetchone()
        # 'indexed' flags describe the previous index; stores from before server mode were local.
        switched = (row[0] if row else LOCAL_INDEX) != target
        for name in self._local_collections():
            col = self._collection(name)
            ledger_ids = {r[0] for r in self._db.execute("SELECT id FROM chunks WHERE collection=?", (name,))}
            if self.server:
                # The server holds other machines' chunks too: never delete what this ledger lacks.
                if switched:
                    present: set[str] = set()
                    ordered = sorted(ledger_ids)
                    with self._remote():
                        for start in range(0, len(ordered), 1000):
                            present.update(col.get(ids=ordered[start : start + 1000], include=[])["ids"])
                    self._mark_unindexed(ledger_ids - present)
            elif switched or col.count() != len(ledger_ids) or self._db.execute(
                "SELECT 1 FROM chunks WHERE collection=? AND indexed=0 LIMIT 1", (name,)
            ).fetchone():
                index_ids = set(col.get(include=[])["ids"])
                extra = list(index_ids - ledger_ids)
                if extra:
                    col.delete(ids=extra)
                self._mark_unindexed(ledger_ids - index_ids)
            self._index_pending(name)
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('index', ?)", (target,))

    def _mark_unindexed(self, ids: set[str]) -> None:
        ordered = sorted(ids)
        for start in range(0, len(ordered), 900):  # SQLite caps the variables of one statement
            part = ordered[start : start + 900]
            self._db.execute(f"UPDATE chunks SET indexed=0 WHERE id IN ({','.join('?' * len(part))})", part)

    def _index_pending(self, collection: str, batch: int = 256) -> None:
        while True:
            rows = self._db.execute(
                "SELECT id, text, source, position, kind, hash, meta FROM chunks WHERE collection=? AND indexed=0 LIMIT ?",
                (collection, batch),
            ).fetchall()
            if not rows:
                return
            ids = [r[0] for r in rows]
            vectors = self.embedder([r[1] for r in rows])
            extra: dict[str, Any] = {}
            metadatas: list[dict[str, Any]] = [{"source": r[2], "position": r[3], "kind": r[4]} for r in rows]
            if self.server:
                # Other machines read hits straight from the server: it needs the whole chunk.
                extra["documents"] = [r[1] for r in rows]
                metadatas = [{**m, "hash": r[5], "meta": r[6]} for m, r in zip(metadatas, rows)]
            with self._remote():
                self._collection(collection).upsert(
                    ids=ids, embeddings=[list(map(float, v)) for v in vectors], metadatas=metadatas, **extra
                )
            self._db.execute(f"UPDATE chunks SET indexed=1 WHERE id IN ({','.join('?' * len(ids))})", ids)

    @classmethod
    def rebuild(
        cls, path: str | Path | None = None, embedder: Callable[[Sequence[str]], Any] | None = None, *, server: str | None = None
    ) -> "MemoryStore":
        """Delete the local vector index and re-embed every chunk from the ledger (into `server` if given); returns the open store."""
        folder = Path(path) if path is not None else default_path()
        lock = _Lock(folder)  # refuse to wipe an index another process is using
        try:
            _forget_chroma_system(folder / "chroma")
            shutil.rmtree(folder / "chroma", ignore_errors=True)
            db = sqlite3.connect(folder / "ledger.sqlite3", isolation_level=None)
            try:
                db.execute("UPDATE chunks SET indexed=0")
            except sqlite3.DatabaseError as exc:
                raise StoreCorrupt(f"store ledger {folder / 'ledger.sqlite3'} is unreadable ({exc}); nothing to rebuild from") from None
            finally:
                db.close()
        finally:
            lock.release()
        return cls(folder, embedder, server=server)

    # ---- writing -------------------------------------------------------------------------------

    @_serialized
    def add(
        self,
        texts: Iterable[str],
        *,
        collection: str = "default",
        source: str = "",
        kind: str = "document",
        positions: Sequence[int] | None = None,
        metas: Sequence[Mapping[str, Any]] | None = None,
    ) -> tuple[list[str], int]:
        """Store texts (deduplicated by content hash); returns (ids of newly added, duplicates skipped).
        A bare string is one text."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not COLLECTION_RE.match(collection):
            raise ValueError(f"collection name {collection!r} is invalid: 3-63 letters, digits, '.', '_' or '-', alphanumeric at both ends")
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        now = time.time()
        added: list[str] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for i, text in enumerate(texts):
                h = content_hash(text)
                cid = f"{collection}:{h[:32]}"
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO chunks (id, collection, hash, text, source, position, kind, meta, created)"
                    " VALUES (?,?,?,?,?,?,?,?,?)",
                    (cid, collection, h, text, source, positions[i] if positions else i, kind,
                     json.dumps(dict(metas[i]) if metas else {}, default=str), now),
                )
                if cur.rowcount:
                    added.append(cid)
            self._db.execute("COMMIT")  # from here the write is durable; the vector index follows
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        if added:
            try:
                self._index_pending(collection)
            except StoreError as exc:
                raise StoreError(f"{exc} (the {len(added)} new chunks are saved in {self.path}; they are sent when the server answers again)") from None
        return added, len(texts) - len(added)

    @_serialized
    def delete(self, ids: Sequence[str], collection: str = "default") -> int:
        """Remove chunks by id (on a server, also those other machines wrote); returns how many existed."""
        ids = list(ids)
        if not ids:
            return 0
        cur = self._db.execute(f"DELETE FROM chunks WHERE collection=? AND id IN ({','.join('?' * len(ids))})", (collection, *ids))
        removed = cur.rowcount
        col = self._collection(collection, create=False)
        if col is not None:
            with self._remote():
                if self.server:
                    removed = max(removed, len(col.get(ids=ids, include=[])["ids"]))
                col.delete(ids=ids)
        return removed

    # ---- reading -------------------------------------------------------------------------------

    @_serialized
    def collections(self) -> list[str]:
        """Collection names this store can search (on a server, also those other machines created)."""
        names = set(self._local_collections())
        if self.server:
            with self._remote():
                names.update(c.name for c in self._client.list_collections())
        return sorted(names)

    @_serialized
    def count(self, collection: str = "default") -> int:
        """Chunks in a collection: this ledger's, or everything on the server in server mode."""
        if self.server:
            col = self._collection(collection, create=False)
            with self._remote():
                return col.count() if col is not None else 0
        return self._db.execute("SELECT count(*) FROM chunks WHERE collection=?", (collection,)).fetchone()[0]

    @_serialized
    def get(self, chunk_id: str) -> Hit | None:
        found = self._ledger_hits([chunk_id])
        if not found and self.server and ":" in chunk_id:
            col = self._collection(chunk_id.split(":", 1)[0], create=False)
            if col is not None:
                with self._remote():
                    result = col.get(ids=[chunk_id], include=["documents", "metadatas"])
                found = self._server_hits(result["ids"], result["documents"], result["metadatas"])
        return found.get(chunk_id)

    def _ledger_hits(self, ids: Sequence[str]) -> dict[str, Hit]:
        """Chunks by id from the ledger in one query; ids it lacks are simply absent."""
        if not ids:
            return {}
        rows = self._db.execute(
            f"SELECT id, text, source, position, kind, meta FROM chunks WHERE id IN ({','.join('?' * len(ids))})", tuple(ids)
        )
        return {r[0]: Hit(r[0], r[1], r[2], r[3], r[4], 0.0, json.loads(r[5])) for r in rows}

    @staticmethod
    def _server_hits(ids: Sequence[str], texts: Sequence[str] | None, metas: Sequence[Mapping[str, Any]] | None) -> dict[str, Hit]:
        """Hits built from a server's answer (texts and metadata travel with the vectors there)."""
        hits = {}
        for cid, text, meta in zip(ids, texts or [], metas or []):
            meta = meta or {}
            hits[cid] = Hit(cid, text or "", str(meta.get("source", "")), int(meta.get("position", 0)),
                            str(meta.get("kind", "document")), 0.0, json.loads(meta.get("meta") or "{}"))
        return hits

    def _vector_ids(self, query: str, col: Any, n: int, found: dict[str, Hit]) -> list[str]:
        embedding = [list(map(float, self.embedder([query])[0]))]
        if not self.server:
            return list(col.query(query_embeddings=embedding, n_results=n, include=[])["ids"][0])
        with self._remote():
            result = col.query(query_embeddings=embedding, n_results=n, include=["documents", "metadatas"])
        found.update(self._server_hits(result["ids"][0], result["documents"][0], result["metadatas"][0]))
        return list(result["ids"][0])

    def _exact_ids(self, query: str, col: Any, n: int, found: dict[str, Hit]) -> list[str]:
        """Server chunks containing the query's identifier-like words verbatim, most words matched first."""
        words = _identifiers(query)
        if not words or col is None:
            return []
        variants = list(dict.fromkeys(v for w in words for v in (w, w.lower(), w.upper())))  # $contains is case-sensitive
        where = {"$or": [{"$contains": v} for v in variants]} if len(variants) > 1 else {"$contains": variants[0]}
        with self._remote():
            result = col.get(where_document=where, limit=n, include=["documents", "metadatas"])
        hits = self._server_hits(result["ids"], result["documents"], result["metadatas"])
        found.update(hits)
        lowered = [w.lower() for w in words]
        matched = {cid: sum(w in hit.text.lower() for w in lowered) for cid, hit in hits.items()}
        return sorted(matched, key=matched.__getitem__, reverse=True)

    def _doc_frequency(self, word: str, rows: int) -> int:
        """Chunks (in all collections) holding the word, bounded by its rarest token; cached."""
        if abs(rows - self._df_rows) > 0.1 * self._df_rows or len(self._df) > 10_000:
            self._df, self._df_rows = {}, rows
        counts = []
        for token in _tokens(word):
            if token not in self._df:
                row = self._db.execute("SELECT doc FROM chunks_vocab WHERE term=?", (token,)).fetchone()
                self._df[token] = row[0] if row else 0
            counts.append(self._df[token])
        return min(counts, default=0)

    def _fts_match(self, query: str) -> str:
        """The query's words as OR-ed FTS5 phrases, rarest first, within the KEYWORD_POSTINGS budget."""
        words = list(dict.fromkeys(w for w in query.split() if any(ch.isalnum() for ch in w)))
        if not words:
            return ""
        rows = self._db.execute("SELECT max(rowid) FROM chunks").fetchone()[0] or 0
        df = {w: self._doc_frequency(w, rows) for w in words}
        words.sort(key=df.__getitem__)
        kept, matched = [words[0]], df[words[0]]
        for word in words[1:]:
            if df[word] > COMMON_SHARE * rows or matched + df[word] > KEYWORD_POSTINGS:
                break
            kept.append(word)
            matched += df[word]
        return " OR ".join(map(_phrase, kept))

    def _keyword_ids(self, query: str, collection: str, n: int) -> list[str]:
        match = self._fts_match(query)
        if not match:
            return []
        rows = self._db.execute(
            "SELECT c.id, -bm25(chunks_fts) AS score FROM chunks_fts f JOIN chunks c ON c.rowid = f.rowid"
            " WHERE chunks_fts MATCH ? AND c.collection = ? ORDER BY score DESC LIMIT ?",
            (match, collection, n),
        ).fetchall()
        if not rows:
            return []
        # Chunks that matched only words common to the whole collection score near zero; letting
        # them into the fusion would hand out rank credit for "the" and bury the one rare match.
        floor = rows[0][1] * KEYWORD_FLOOR
        return [r[0] for r in rows if r[1] >= floor]

    @_serialized
    def search(self, query: str, k: int = 5, collection: str = "default", mode: str = "hybrid") -> list[Hit]:
        """Top-k chunks for a query; mode is "hybrid" (RRF of vector and keyword), "vector" or "keyword"."""
        if mode not in ("hybrid", "vector", "keyword"):
            raise ValueError(f"search mode {mode!r} is not one of hybrid, vector, keyword")
        local = self._in_ledger(collection)
        col = self._collection(collection, create=False) if local or self.server else None
        if col is None and not local:
            return []
        depth = max(k * 10, 50)  # fuse from deeper lists so an item ranked low by one side can still surface
        found: dict[str, Hit] = {}  # vector hits whose text came with the server's answer
        exact_found: dict[str, Hit] = {}  # the same for verbatim matches, filled on the worker thread

        def keyword() -> list[str]:
            exact = self._exact_ids(query, col, depth, exact_found) if self.server else []
            seen = set(exact)
            return exact + [cid for cid in self._keyword_ids(query, collection, depth) if cid not in seen]

        # Keyword first: on equal fused scores the insertion order decides, and a keyword hit that
        # survived KEYWORD_FLOOR is a rare exact match (an ID, a name), the case vectors get wrong.
        if mode == "keyword" or col is None:
            rankings = [keyword()]
        elif mode == "vector":
            rankings = [self._vector_ids(query, col, depth, found)]
        else:
            # The keyword side runs on a worker while this thread embeds the query (the longest
            # step) and asks the vector index; sqlite, onnxruntime and Chroma release the GIL.
            pending = self._worker().submit(keyword)
            try:
                vector = self._vector_ids(query, col, depth, found)
            finally:
                concurrent.futures.wait([pending])  # the ledger connection is used below: let the worker finish
            rankings = [pending.result(), vector]
        found.update(exact_found)
        scores: dict[str, float] = {}
        for ranking in rankings:
            for rank, cid in enumerate(ranking):
                scores[cid] = scores.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
        ranked = sorted(scores, key=scores.__getitem__, reverse=True)
        hits: list[Hit] = []
        for start in range(0, len(ranked), 2 * k):
            # The ledger decides for local chunks (a vector whose chunk was deleted is ignored); the
            # server's answer carries the chunks other machines wrote. Fetched a few ranks at a time.
            batch = ranked[start : start + 2 * k]
            chunks = {**found, **self._ledger_hits([cid for cid in batch if cid not in found])}
            hits += [replace(chunks[cid], score=scores[cid]) for cid in batch if cid in chunks]
            if len(hits) >= k:
                break
        return hits[:k]

    def _worker(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-keyword")
        return self._pool

    def close(self) -> None:
        """Release the index, the ledger and the writer lock (idempotent)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._drop_client()
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None
        self._lock.release()

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
