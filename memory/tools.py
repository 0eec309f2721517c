"""The model's handle on long-term memory: `memory_search` and `memory_insert` over one MemoryStore."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Callable

from pydantic import Field

from llmos.memory.window import format_hits
from llmos.toolbox import Tool, make_tool

if TYPE_CHECKING:
    from llmos.memory.store import MemoryStore


def make(store: "MemoryStore", collection: str = "default", k: int = 5,
         taint: Callable[[], list[str]] = lambda: []) -> list[Tool]:
    """The two memory tools bound to `store`; search results are marked untrusted (outside content).
    taint: where the untrusted text in the agent's window came from; a fact saved while there is
    any is stored marked untrusted, with those sources, so it comes back as data."""

    def memory_search(query: Annotated[str, Field(description="words, a question, or an exact ID to look for")]) -> str:
        """Search long-term memory (stored documents, facts and past messages); returns passages with their source."""
        hits = store.search(query, k=k, collection=collection)
        if not hits:
            return "no matching memories"
        return format_hits(hits)

    def memory_insert(fact: Annotated[str, Field(description="one self-contained fact to remember")]) -> str:
        """Save a fact to long-term memory so it can be found later with memory_search."""
        sources = taint()
        meta = {"provenance": "model", "untrusted": bool(sources), **({"derived_from": ", ".join(sources)} if sources else {})}
        added, _ = store.add([fact], collection=collection, source="memory_insert", kind="fact", metas=[meta])
        if not added:
            return "already remembered"
        return "saved (marked untrusted: it was written while text from outside was in view)" if sources else "saved"

    touches = f"the memory store at {store.path}"
    return [
        make_tool(memory_search, untrusted=True, touches=touches, effects=(), origin=lambda _: "memory", examples=(
            "What did I tell you earlier about my locker code?", "Search your memory for the meeting notes.",
            "Look up what my documents say about the warranty.", "Do you remember my sister's name?",
            "Find the passage about the lighthouse in my notes.")),
        make_tool(memory_insert, touches=touches, effects=("persists",), examples=(
            "Remember that my flight leaves at 9:40 on Friday.", "Please save this fact: the wifi password is tulip42.",
            "Note for later: Anna's birthday is on March 3rd.")),
    ]
