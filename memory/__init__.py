"""The memory hierarchy: the context window ("RAM", window.py) and the store ("disk", store.py).

store.py   Chroma (vectors) + SQLite FTS5 (keywords, the durable ledger), hybrid search, one writer
embed.py   the offline all-MiniLM-L6-v2 ONNX embedder, pinned by file hash
ingest.py  text, Markdown, HTML and PDF files into chunks in the store
window.py  Memory: the token-budgeted window (core memory, summary, recall), paging out to the store, memory tools
tools.py   memory_search / memory_insert for the model
Heavy imports (chromadb, onnxruntime) happen only when a store or embedder is created.
"""
