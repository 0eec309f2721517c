"""Model discovery and the GPU offload planner (synthetic sizes; no GPU needed)."""

import json
import shutil

from llmos.gguf import read_gguf
from llmos.models import GIB, MIB, describe_model, find_models, kv_bytes_per_layer, plan_offload

LAYERS = [100 * MIB] * 32  # a 7B-ish Q4 model: 32 layers of 100 MiB
OTHER = 300 * MIB
KV = 16 * MIB


def test_everything_fits():
    plan = plan_offload(LAYERS, OTHER, KV, free_bytes=8 * GIB, gpu_supported=True)
    assert plan.n_gpu_layers == 33  # all 32 blocks plus the output layer
    assert "fit" in plan.reason


def test_partial_offload_counts_layers_and_their_kv():
    free = 512 * MIB + OTHER + 10 * (100 + 16) * MIB + 50 * MIB  # reserve + other + 10 layers + slack
    plan = plan_offload(LAYERS, OTHER, KV, free_bytes=free, gpu_supported=True)
    assert plan.n_gpu_layers == 10
    assert "22 layers stay on CPU" in plan.reason


def test_kv_cache_reduces_the_count():
    free = 512 * MIB + OTHER + 10 * 100 * MIB
    no_kv = plan_offload(LAYERS, OTHER, 0, free_bytes=free, gpu_supported=True)
    with_kv = plan_offload(LAYERS, OTHER, 64 * MIB, free_bytes=free, gpu_supported=True)
    assert no_kv.n_gpu_layers == 10 and with_kv.n_gpu_layers == 6


def test_nothing_fits():
    plan = plan_offload(LAYERS, OTHER, KV, free_bytes=600 * MIB, gpu_supported=True)
    assert plan.n_gpu_layers == 0 and "CPU" in plan.reason


def test_no_gpu_support_or_no_gpu_falls_back_to_cpu():
    plan = plan_offload(LAYERS, OTHER, KV, free_bytes=80 * GIB, gpu_supported=False)
    assert plan.n_gpu_layers == 0 and "without GPU support" in plan.reason
    plan = plan_offload(LAYERS, OTHER, KV, free_bytes=None, gpu_supported=True)
    assert plan.n_gpu_layers == 0 and "no GPU" in plan.reason


def test_kv_bytes_from_real_header(default_model_path):
    info = read_gguf(default_model_path)
    # SmolLM2-135M: 3 KV heads of 64 dims, K and V, f16
    assert kv_bytes_per_layer(info, 1024) == 1024 * 3 * (64 + 64) * 2


def test_find_models_default_home_and_config(tmp_path, default_model_path):
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copy(default_model_path, home / "models" / "copy.gguf")
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    (extra / "broken.gguf").write_text("not a model")
    found = find_models(home, [extra])
    origins = [o for o, _ in found]
    assert origins == ["default", "home", "config"]
    rows = [describe_model(o, p) for o, p in found]
    assert rows[1]["quantization"] == "Q4_1" and rows[1]["chat_template"] is True
    assert "error" in rows[2] and "not a GGUF" in rows[2]["error"]


def test_a_model_file_is_hashed_on_first_use_and_a_change_is_reported(tmp_path, default_model_path):
    import hashlib
    import shutil

    from llmos.models import record_model, sha256

    home, model = tmp_path / "home", tmp_path / "m.gguf"
    shutil.copy(default_model_path, model)
    assert record_model(model, home) is None  # first use: recorded, nothing to say
    ledger = json.loads((home / "models.json").read_text())
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert ledger[str(model.resolve())]["sha256"] == digest == sha256(model, home)
    assert record_model(model, home) is None  # the same file again
    with open(model, "r+b") as fh:  # a poisoned copy at the same path
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    notice = record_model(model, home)
    assert notice is not None and "model file changed" in notice and str(model) in notice and "\n" not in notice
    assert record_model(model, home) is None  # said once; the new file is now the one known
