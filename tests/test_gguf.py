"""GGUF header checks: the real default model, and files that must be refused before llama.cpp sees them."""

import struct

import pytest

from llmos.gguf import ModelFileError, read_gguf


def test_default_model_header(default_model_path):
    info = read_gguf(default_model_path)
    assert info.architecture == "llama"
    assert 130e6 < info.n_params < 140e6
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.chat_template and "<|im_start|>" in info.chat_template
    layers, other = info.layer_bytes()
    assert len(layers) == info.n_layers == 30 and all(b > 0 for b in layers) and other > 0
    # the tensor table accounts for (almost) the whole file
    assert 0.9 < (sum(layers) + other) / info.file_size <= 1.0


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")


def test_folder(tmp_path):
    with pytest.raises(ModelFileError, match="folder"):
        read_gguf(tmp_path)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("this is a text file pretending to be a model " * 10)
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf(p)


def test_tiny_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        read_gguf(p)


def test_truncated_model(tmp_path, default_model_path):
    data = default_model_path.read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated") as err:
        read_gguf(p)
    assert str(p) in str(err.value)


def test_truncated_inside_header(tmp_path, default_model_path):
    with open(default_model_path, "rb") as fh:
        head = fh.read(5000)
    p = tmp_path / "head.gguf"
    p.write_bytes(head)
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        read_gguf(p)


def test_bad_version_and_counts(tmp_path):
    p = tmp_path / "v9.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0) + b"\0" * 64)
    with pytest.raises(ModelFileError, match="version 9"):
        read_gguf(p)
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**60, 1) + b"\0" * 64)
    with pytest.raises(ModelFileError, match="impossible"):
        read_gguf(p)
