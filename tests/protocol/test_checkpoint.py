"""Checkpoints resolve from folders and the local HF cache; spans load only their own tensors."""
import json
import shutil

import pytest
import torch

from potluck.protocol import checkpoint as ckpt
from potluck.protocol.default_model import remove_leftovers
from potluck.protocol.errors import BadRequest


def test_folder_is_named_after_itself(tiny_checkpoints):
    checkpoint = ckpt.resolve_checkpoint(str(tiny_checkpoints["qwen3"]))
    assert checkpoint.name == "tiny-qwen3" and checkpoint.num_blocks == 8
    assert ckpt.resolve_checkpoint(str(tiny_checkpoints["qwen3"]), name="other").name == "other"


def test_hf_id_resolves_from_the_local_cache(tiny_checkpoints, tmp_path, monkeypatch):
    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_checkpoints["llama"], snapshot)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    checkpoint = ckpt.resolve_checkpoint("acme/tiny")
    assert checkpoint.name == "acme/tiny" and checkpoint.path == snapshot


def test_unknown_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadRequest, match="hf download nobody/nothing-here"):
        ckpt.resolve_checkpoint("nobody/nothing-here")


def test_a_conversion_removes_what_stopped_conversions_left(tmp_path):
    target = tmp_path / "models" / "SmolLM2-135M-Instruct"
    kept = [target, tmp_path / "models" / ".SmolLM2-135M-Instruct.lock", tmp_path / "models" / "Other.tmp-12"]
    left = [tmp_path / "models" / ".SmolLM2-135M-Instruct.tmp-4242",
            tmp_path / "models" / ".SmolLM2-135M-Instruct.download-4242-x1"]
    for folder in [target, *left]:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "weights").write_bytes(b"0" * 100)
    for file in kept[1:]:
        file.write_text("")
    remove_leftovers(target)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in left)


def test_a_single_weights_file_wins_over_a_leftover_sharded_index_as_in_transformers(tiny_checkpoints, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "both"
    shutil.copytree(tiny_checkpoints["llama"], folder)  # its model.safetensors: the weights transformers loads
    save_file({"model.norm.weight": torch.zeros(64)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    files = ckpt.tensor_files(folder)
    assert set(files.values()) == {folder / "model.safetensors"} and "model.layers.0.mlp.up_proj.weight" in files
    assert ckpt.load_tensors(folder, ["model.norm.weight"], torch.float32)["model.norm.weight"].any()
