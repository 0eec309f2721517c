"""Read a GGUF file's header (metadata and tensor table) without loading weights.

llama.cpp can crash the process on a truncated or corrupt file, so every model is checked here
first: the magic, the version, every length against the file size, and the tensor data extent.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelFileError(ValueError):
    """A model path that cannot be used; the message names the file and the reason."""


# ggml tensor types: name, elements per block, bytes per block.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# llama.cpp's general.file_type values (LLAMA_FTYPE_MOSTLY_*).
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_MAX_ARRAY_KEEP = 64  # long arrays (the vocabulary) are skipped, only their length is kept


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # bytes, relative to the start of the data section

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int | None:
        info = GGML_TYPES.get(self.type_id)
        if info is None:
            return None
        _, block, size = info
        return self.n_elements // block * size


@dataclass(frozen=True)
class GGUFInfo:
    """What llmos needs to know about a model file before (or instead of) loading it."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    file_size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def context_length(self) -> int | None:
        value = self.arch_value("context_length")
        return int(value) if value is not None else None

    @property
    def n_layers(self) -> int:
        return int(self.arch_value("block_count", 0) or 0)

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value.strip() else None

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int) and file_type in FILE_TYPES:
            return FILE_TYPES[file_type]
        counts = Counter(GGML_TYPES.get(t.type_id, (f"type{t.type_id}",))[0] for t in self.tensors)
        return counts.most_common(1)[0][0] if counts else "unknown"

    def layer_bytes(self) -> tuple[list[int], int]:
        """Bytes of each repeating block (`blk.N.*`) and of everything else (embeddings, output)."""
        layers = [0] * self.n_layers
        other = 0
        for t in self.tensors:
            size = t.nbytes or 0
            parts = t.name.split(".")
            if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < len(layers):
                layers[int(parts[1])] += size
            else:
                other += size
        return layers, other


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, why: str) -> ModelFileError:
        return ModelFileError(f"{self.path}: {why}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"truncated or corrupt GGUF header (needs {n} bytes at offset {self.pos}, file has {len(self.buf)})")
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, type_id: int) -> Any:
        if type_id in _SCALARS:
            return self.scalar(_SCALARS[type_id])
        if type_id == 8:
            return self.string()
        if type_id == 9:
            item_type, count = self.scalar("<I"), self.scalar("<Q")
            if count > len(self.buf):
                raise self.fail(f"truncated or corrupt GGUF header (array of {count} items is longer than the file)")
            if item_type in _SCALARS and item_type != 7:
                size = struct.calcsize(_SCALARS[item_type])
                raw = self.take(size * count)
                return list(struct.unpack(f"<{count}{_SCALARS[item_type][1]}", raw)) if count <= _MAX_ARRAY_KEEP else count
            items = [self.value(item_type) for _ in range(count)]
            return items if count <= _MAX_ARRAY_KEEP else count
        raise self.fail(f"corrupt GGUF header (unknown metadata value type {type_id})")


def read_gguf(path: str | os.PathLike[str]) -> GGUFInfo:
    """Parse and sanity-check a GGUF header; raises ModelFileError with a one-line reason."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder, not a .gguf file")
    try:
        size = path.stat().st_size
        if size < 24:
            raise ModelFileError(f"{path}: not a GGUF model (file is {size} bytes)")
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Reader(buf, path), size)
    except PermissionError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror})") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc})") from None


def _parse(r: _Reader, size: int) -> GGUFInfo:
    if r.take(4) != b"GGUF":
        raise r.fail("not a GGUF model (bad magic bytes; expected a .gguf file)")
    version = r.scalar("<I")
    if version not in (2, 3):
        raise r.fail(f"unsupported GGUF version {version} (llama.cpp reads versions 2 and 3)")
    n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
    if n_tensors > size // 8 or n_kv > size // 8:
        raise r.fail("corrupt GGUF header (impossible tensor or metadata count)")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = r.string()
        metadata[key] = r.value(r.scalar("<I"))
    tensors = []
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.scalar("<I")
        if n_dims > 8:
            raise r.fail(f"corrupt GGUF header (tensor {name!r} has {n_dims} dimensions)")
        shape = tuple(r.scalar("<Q") for _ in range(n_dims))
        tensors.append(TensorInfo(name, shape, r.scalar("<I"), r.scalar("<Q")))
    alignment = int(metadata.get("general.alignment", 32) or 32)
    data_start = (r.pos + alignment - 1) // alignment * alignment
    for t in tensors:
        nbytes = t.nbytes
        if nbytes is not None and data_start + t.offset + nbytes > size:
            raise r.fail(
                f"truncated model file: tensor {t.name!r} ends at byte {data_start + t.offset + nbytes:,} "
                f"but the file has {size:,} bytes (re-download or re-copy it)"
            )
    if not tensors:
        raise r.fail("GGUF file has no tensors (not a model)")
    return GGUFInfo(path=r.path, version=version, metadata=metadata, tensors=tuple(tensors), file_size=size)
