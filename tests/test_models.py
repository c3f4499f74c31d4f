"""load_model: local model directories, GGUF files, and clear errors for everything else."""

import pytest
import torch
from gguf import GGUFWriter

from lm_infinite.models import ModelLoadError, default_model_path, load_model
from tiny_model_dir import save_tiny_model


def test_default_model_is_the_packaged_smollm2_gguf():
    path = default_model_path()
    assert path.name.startswith("SmolLM2-135M-Instruct") and path.suffix == ".gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_local_directory_loads_the_saved_weights_and_tokenizer(tmp_path):
    directory = save_tiny_model(tmp_path / "model")
    model, tokenizer = load_model(directory)
    ids = tokenizer("The grass is green.", return_tensors="pt").input_ids
    reloaded, _ = load_model(directory)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reloaded(ids).logits)
    assert not model.training


def test_missing_path_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        load_model(path)


def test_gguf_without_model_weights(tmp_path):
    path = tmp_path / "vocab-only.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="without model weights"):
        load_model(path)


def test_neither_directory_nor_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(ModelLoadError, match="neither a model directory nor a .gguf file"):
        load_model(path)


def test_directory_without_a_model(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(tmp_path)
