"""The long-term store ("disk"): a SQLite ledger with FTS5 keyword search plus a Chroma vector index.

Layout of a store folder:
  ledger.sqlite3  every chunk (text, source, position, kind, content hash) and an FTS5 index; the
                  source of truth, committed (WAL, synchronous=FULL) before `add` returns
  chroma/         Chroma PersistentClient; a derived index, re-synced from the ledger on open
                  (chunks whose vector never landed are re-embedded) and rebuilt by `rebuild()`
  lock            fcntl lock holding the writer's PID: Chroma is not safe for two processes
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

SCHEMA_VERSION = 1
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al.); damps the top ranks' dominance
KEYWORD_FLOOR = 0.25  # keyword hits scoring under this fraction of the best one are not fused
COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")  # what Chroma accepts
KINDS = ("message", "fact", "document")


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


def _fts_query(query: str) -> str:
    """Each whitespace-separated word as a quoted FTS5 phrase, OR-ed, so punctuation cannot break the syntax."""
    words = [w for w in query.split() if any(ch.isalnum() for ch in w)]
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


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

    def __init__(self, path: str | Path | None = None, embedder: Callable[[Sequence[str]], Any] | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
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
            name = getattr(self.embedder, "name", lambda: type(self.embedder).__name__)()
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

        try:
            self._client = chromadb.PersistentClient(
                path=str(self.path / "chroma"), settings=Settings(anonymized_telemetry=False, allow_reset=True)
            )
            for name in self.collections():
                self._collection(name).count()
        except Exception as exc:  # noqa: BLE001 - Chroma raises many types for a damaged folder; all mean the same
            self._drop_client()
            _forget_chroma_system(self.path / "chroma")
            raise StoreCorrupt(
                f"vector index {self.path / 'chroma'} is unreadable ({type(exc).__name__}: {exc}); "
                f"fix: MemoryStore.rebuild({str(self.path)!r}) re-embeds everything from the ledger"
            ) from None

    def _drop_client(self) -> None:
        if self._client is not None:
            close = getattr(self._client, "close", None)
            if close is not None:
                close()
        self._client = None
        self._collections.clear()

    def _collection(self, name: str) -> Any:
        if name not in self._collections:
            self._collections[name] = self._client.get_or_create_collection(
                name, embedding_function=None, metadata={"hnsw:space": "cosine"}
            )
        return self._collections[name]

    def _sync(self) -> None:
        """Make Chroma agree with the ledger after a crash: embed what is missing, drop what was deleted."""
        for name in self.collections():
            col = self._collection(name)
            ledger_ids = {r[0] for r in self._db.execute("SELECT id FROM chunks WHERE collection=?", (name,))}
            if col.count() != len(ledger_ids) or self._db.execute(
                "SELECT 1 FROM chunks WHERE collection=? AND indexed=0 LIMIT 1", (name,)
            ).fetchone():
                index_ids = set(col.get(include=[])["ids"])
                extra = list(index_ids - ledger_ids)
                if extra:
                    col.delete(ids=extra)
                missing = ledger_ids - index_ids
                if missing:
                    self._db.execute(
                        f"UPDATE chunks SET indexed=0 WHERE id IN ({','.join('?' * len(missing))})", tuple(missing)
                    )
                self._index_pending(name)

    def _index_pending(self, collection: str, batch: int = 256) -> None:
        while True:
            rows = self._db.execute(
                "SELECT id, text, source, position, kind FROM chunks WHERE collection=? AND indexed=0 LIMIT ?",
                (collection, batch),
            ).fetchall()
            if not rows:
                return
            ids = [r[0] for r in rows]
            vectors = self.embedder([r[1] for r in rows])
            self._collection(collection).upsert(
                ids=ids,
                embeddings=[list(map(float, v)) for v in vectors],
                metadatas=[{"source": r[2], "position": r[3], "kind": r[4]} for r in rows],
            )
            self._db.execute(f"UPDATE chunks SET indexed=1 WHERE id IN ({','.join('?' * len(ids))})", ids)

    @classmethod
    def rebuild(cls, path: str | Path | None = None, embedder: Callable[[Sequence[str]], Any] | None = None) -> "MemoryStore":
        """Delete the vector index and re-embed every chunk from the ledger; returns the open store."""
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
        return cls(folder, embedder)

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
        """Store texts (deduplicated by content hash); returns (ids of newly added, duplicates skipped)."""
        texts = list(texts)
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
            self._index_pending(collection)
        return added, len(texts) - len(added)

    @_serialized
    def delete(self, ids: Sequence[str], collection: str = "default") -> int:
        """Remove chunks by id; returns how many existed."""
        ids = list(ids)
        if not ids:
            return 0
        cur = self._db.execute(f"DELETE FROM chunks WHERE collection=? AND id IN ({','.join('?' * len(ids))})", (collection, *ids))
        if collection in self.collections() or collection in self._collections:
            self._collection(collection).delete(ids=ids)
        return cur.rowcount

    # ---- reading -------------------------------------------------------------------------------

    @_serialized
    def collections(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT collection FROM chunks ORDER BY collection")]

    @_serialized
    def count(self, collection: str = "default") -> int:
        return self._db.execute("SELECT count(*) FROM chunks WHERE collection=?", (collection,)).fetchone()[0]

    @_serialized
    def get(self, chunk_id: str) -> Hit | None:
        row = self._db.execute("SELECT id, text, source, position, kind, meta FROM chunks WHERE id=?", (chunk_id,)).fetchone()
        return None if row is None else Hit(row[0], row[1], row[2], row[3], row[4], 0.0, json.loads(row[5]))

    def _vector_ids(self, query: str, collection: str, n: int) -> list[str]:
        col = self._collection(collection)
        total = col.count()
        if not total:
            return []
        result = col.query(query_embeddings=[list(map(float, self.embedder([query])[0]))], n_results=min(n, total), include=[])
        return list(result["ids"][0])

    def _keyword_ids(self, query: str, collection: str, n: int) -> list[str]:
        match = _fts_query(query)
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
        if collection not in self.collections():
            return []
        depth = max(k * 10, 50)  # fuse from deeper lists so an item ranked low by one side can still surface
        rankings = []
        # Keyword first: on equal fused scores the insertion order decides, and a keyword hit that
        # survived KEYWORD_FLOOR is a rare exact match (an ID, a name), the case vectors get wrong.
        if mode in ("hybrid", "keyword"):
            rankings.append(self._keyword_ids(query, collection, depth))
        if mode in ("hybrid", "vector"):
            rankings.append(self._vector_ids(query, collection, depth))
        scores: dict[str, float] = {}
        for ranking in rankings:
            for rank, cid in enumerate(ranking):
                scores[cid] = scores.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
        hits = []
        for cid in sorted(scores, key=scores.__getitem__, reverse=True):
            hit = self.get(cid)  # the ledger decides: a vector whose chunk was deleted is ignored
            if hit is not None:
                hits.append(Hit(hit.id, hit.text, hit.source, hit.position, hit.kind, scores[cid], hit.meta))
            if len(hits) == k:
                break
        return hits

    def close(self) -> None:
        """Release the index, the ledger and the writer lock (idempotent)."""
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
