import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def llmos_home(tmp_path, monkeypatch):
    """Every test gets its own llmos home (traces, config), never the user's."""
    home = tmp_path / "llmos-home"
    monkeypatch.setenv("LLMOS_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def default_model_path():
    from llmos.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def llama_backend():
    """One real default model for the whole session (loading it costs ~1 s)."""
    from llmos.config import ModelConfig, Sampling
    from llmos.llama import LlamaBackend

    backend = LlamaBackend(ModelConfig(gpu_layers=0), Sampling(temperature=0.0, max_tokens=96))
    yield backend
    backend.close()
