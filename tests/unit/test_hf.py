"""Hugging Face directories: logits equal transformers' PyTorch models on the same weights."""

import json

import numpy as np
import pytest
import torch
import transformers

from tailjax import models
from helpers import SHAPE, random_hf_model, tokenizer_files, torch_logprobs

torch.manual_seed(0)


VARIANTS = {
    "qwen2-bias-untied": (transformers.Qwen2Config, dict(tie_word_embeddings=False)),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "llama-headdim-bias": (transformers.LlamaConfig, dict(head_dim=24, attention_bias=True)),
    "llama3-rope": (transformers.LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "linear-rope": (transformers.LlamaConfig,
                    dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=4.0))),
    "yarn-rope": (transformers.Qwen2Config, dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=16))),
    "dynamic-rope": (transformers.LlamaConfig, dict(max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=1e4, factor=2.0))),
    "mistral-sliding": (transformers.MistralConfig, dict(sliding_window=5)),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logprobs_equal_transformers(variant, tmp_path, rng):
  config_cls, overrides = VARIANTS[variant]
  reference = random_hf_model(config_cls, tmp_path, **overrides)
  ids = rng.integers(0, SHAPE["vocab_size"], (2, 24))  # longer than every original context and window above
  loaded = models.load(tmp_path)
  assert loaded.config.qkv_bias == (config_cls is transformers.Qwen2Config or overrides.get("attention_bias", False))
  diff = np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max()
  assert diff <= 1e-3, diff


def test_sharded_checkpoint_and_tokenizer(tmp_path, rng):
  reference = random_hf_model(transformers.Qwen2Config, tmp_path, tie_word_embeddings=False)
  reference.save_pretrained(tmp_path, max_shard_size="40KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  tokenizer_files(tmp_path, SHAPE["vocab_size"] - 10)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)  # as the directory defines it
  loaded = models.load(tmp_path)
  text = "The assert statement, and a dog."
  assert loaded.tokenizer.encode(text) == hf_tokenizer(text)["input_ids"]
  ids = rng.integers(0, SHAPE["vocab_size"], (1, 12))
  assert np.abs(np.asarray(loaded.logprobs(ids), np.float64) - torch_logprobs(reference, ids)).max() <= 1e-3

  first_shard = sorted(set(index["weight_map"].values()))[0]
  (tmp_path / first_shard).unlink()
  with pytest.raises(ValueError, match=f"shards missing from .*{first_shard}"):
    models.load(tmp_path)


def test_bad_directories(tmp_path):
  random_hf_model(transformers.LlamaConfig, tmp_path)
  config_path = tmp_path / "config.json"
  config = json.loads(config_path.read_text())

  config_path.write_text(json.dumps({**config, "quantization_config": {"bits": 4}}))
  with pytest.raises(ValueError, match=r"config.json: unknown config fields \['quantization_config'\]"):
    models.load(tmp_path)
  config_path.write_text(json.dumps({**config, "partial_rotary_factor": 0.5}))
  with pytest.raises(ValueError, match=r"partial_rotary_factor=0.5 is not supported"):
    models.load(tmp_path)
  config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
  with pytest.raises(ValueError, match=r"config.json: lacks the fields \['hidden_size'\]"):
    models.load(tmp_path)
  config_path.write_text(json.dumps({**config, "model_type": "gpt2"}))
  with pytest.raises(ValueError, match="config.json: model_type 'gpt2' is not supported"):
    models.load(tmp_path)
  config_path.write_text(json.dumps({**config, "hidden_act": "gelu"}))
  with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
    models.load(tmp_path)
  config_path.write_text(json.dumps({**config, "num_hidden_layers": 3}))
  with pytest.raises(ValueError, match="tensors missing: .*model.layers.2"):
    models.load(tmp_path)
  config_path.write_text(json.dumps({**config, "intermediate_size": 81}))
  with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight has shape \(\d+, \d+\), the model expects"):
    models.load(tmp_path)
  config_path.write_text(json.dumps(config))
  tokenizer_files(tmp_path, SHAPE["vocab_size"] + 30)
  with pytest.raises(ValueError, match=f"{tmp_path}: the tokenizer has 330 tokens, the model only 300"):
    models.load(tmp_path)
  (tmp_path / "model.safetensors").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors file"):
    models.load(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  with pytest.raises(ValueError, match=r"no \*.safetensors weights"):
    models.load(tmp_path)
