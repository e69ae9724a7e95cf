"""Loader and registry errors a user can hit: missing paths, unknown architectures, incomplete checkpoints."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tokenmill.models.loader import load_model, load_model_config
from tokenmill.models.registry import UnsupportedArchitectureError, get_model_class, supported_architectures


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model("./no/such/folder")


def test_folder_without_model_files(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a GGUF"):
        load_model(bogus)


def test_unknown_hf_architecture(tmp_path, tiny_hf):
    tiny_hf.save(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["MambaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError, match="MambaForCausalLM.*supported: .*LlamaForCausalLM"):
        load_model(tmp_path)


def test_unknown_gguf_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="'gpt2'"):
        load_model(path)
    with pytest.raises(UnsupportedArchitectureError):
        load_model_config(path)


def test_registry_lists_what_it_supports():
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "llama", "qwen2"} <= set(supported_architectures())
    assert get_model_class("qwen2") is get_model_class("LlamaForCausalLM")
    with pytest.raises(ValueError, match="not supported"):
        get_model_class("bert")


def test_checkpoint_missing_a_weight(tmp_path, tiny_hf):
    tiny_hf.save(tmp_path, "llama")
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.qkv_proj\.weight"):
        load_model(tmp_path)


def test_checkpoint_with_a_wrong_shape(tmp_path, tiny_hf):
    tiny_hf.save(tmp_path, "llama")
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(65)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        load_model(tmp_path)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path, tiny_hf, paged):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    tiny_hf.save(single, "qwen2", seed=3)
    sharded.mkdir()
    (sharded / "config.json").write_text((single / "config.json").read_text())
    weights = load_file(single / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, sharded / file)
        weight_map.update({n: file for n in shard_names})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    seq = list(range(20))
    a = paged.run(load_model(single).model, [seq], paged.one_step([20]))[0]
    b = paged.run(load_model(sharded).model, [seq], paged.one_step([20]))[0]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}}, "yarn"),
    ],
)
def test_unsupported_config_features(tmp_path, tiny_hf, change, message):
    tiny_hf.save(tmp_path, "llama")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_model_config(tmp_path)
