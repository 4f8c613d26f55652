"""LoRA: adapters start at the base, train alone, merge into base + (alpha / r) A B, resume exactly, and a
checkpoint of adapters is a model spec."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from click.testing import CliRunner
from flax import nnx

from tailjax import cli, distill, models
from tailjax.models import Decoder, lora
from tailjax.models.layers import Linear
from tailjax.models.load import write_checkpoint_meta
from helpers import TINY, distill_config, interrupted_and_resumed, teacher_and_corpus

tiny = pytest.fixture(scope="module")(teacher_and_corpus)  # a tiny GGUF teacher and a JSONL corpus

LORA = {"rank": 3, "alpha": 6.0, "targets": ["q", "v", "down"], "dropout": 0.25}


def kernels(model) -> dict[str, np.ndarray]:
  return {"/".join(map(str, path)): np.asarray(v, np.float64)
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_an_adapted_layer_computes_the_rank_r_update(rng):
  model = Decoder(TINY, rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 9)))
  base = np.asarray(model(x))
  assert lora.adapt(model, lora.LoraConfig(**{**LORA, "dropout": 0.25}), nnx.Rngs(1)) == 3  # one stacked module per target
  assert np.array_equal(np.asarray(model(x)), base)  # B = 0: the adapted model starts as its base
  layer = model.block(0).attn.q
  assert isinstance(layer, Linear) and layer.lora_a.shape == (TINY.hidden_size, 3)
  layer.lora_b.set_value(jnp.asarray(rng.normal(size=layer.lora_b.shape), jnp.float32))
  h = rng.normal(size=(5, TINY.hidden_size))
  want = h @ np.asarray(layer.kernel, np.float64) + 2.0 * (h @ np.asarray(layer.lora_a, np.float64)) @ np.asarray(
      layer.lora_b, np.float64)
  assert np.abs(np.asarray(layer(jnp.asarray(h, jnp.float32)), np.float64) - want).max() < 1e-4
  # dropout: only in a forward whose layers hold keys, on the adapter's input, the kept inputs scaled by 1/(1-p)
  assert lora.dropout_keys(model, jax.random.key(5)) == 3  # stacked layers: a key per row of each
  keyed = [m for _, m in nnx.iter_graph(model) if isinstance(m, Linear) and m.lora_key is not None]
  assert len(keyed) == 3 and all(m.lora_key.shape == m.lora_a.shape[:-2] for m in keyed)
  layer.lora_key = lora.DropoutKey(jax.random.key(5))
  h = rng.normal(size=(400, TINY.hidden_size))
  keep = np.asarray(jax.random.bernoulli(layer.lora_key[...], 0.75, h.shape))
  assert abs(keep.mean() - 0.75) < 0.01
  dropped = h @ np.asarray(layer.kernel, np.float64) + 2.0 * ((h * keep / 0.75) @ np.asarray(
      layer.lora_a, np.float64)) @ np.asarray(layer.lora_b, np.float64)
  assert np.abs(np.asarray(layer(jnp.asarray(h, jnp.float32)), np.float64) - dropped).max() < 1e-4
  with pytest.raises(ValueError, match=r"lora targets \['w_q'\]: this model has no linear layer of that name"):
    lora.adapt(Decoder(TINY, rngs=nnx.Rngs(0)), lora.LoraConfig(targets=("w_q",)), nnx.Rngs(1))
  with pytest.raises(ValueError, match="lora rank 0"):
    lora.LoraConfig(rank=0)
  with pytest.raises(ValueError, match=r"lora dropout 1.0: expected a rate in \[0, 1\)"):
    lora.LoraConfig(dropout=1.0)


@pytest.mark.slow
def test_lora_training_changes_only_adapters_merges_and_resumes(tiny, tmp_path):  # noqa: F811
  base_spec = str(tiny / "teacher.gguf")
  cfg = distill_config(tiny, objective="ce", teacher=None, student=base_spec, lora=LORA, steps=4, save_every=2,
               eval_every=2, learning_rate=3e-2)
  whole = distill.distill(cfg, tmp_path / "whole")
  assert whole.losses[4] < whole.losses[1]
  resumed = interrupted_and_resumed(cfg, tmp_path / "cut", 3)
  assert sorted(resumed.losses) == [3, 4] and all(resumed.losses[s] == whole.losses[s] for s in (3, 4))
  # adapter dropout acts in training: without it the losses before the first update (step 1's learning rate is 0
  # in warmup, and B = 0 leaves the adapters' output 0) are the same, the third is not
  plain = distill.distill(distill_config(tiny, objective="ce", teacher=None, student=base_spec, lora={**LORA, "dropout": 0.0},
                                 steps=3, save_every=3, eval_every=3, learning_rate=3e-2), tmp_path / "plain")
  assert plain.losses[2] == whole.losses[2] and abs(plain.losses[3] - whole.losses[3]) > 1e-4

  # the checkpoint holds adapters only and names its base
  step_dir = tmp_path / "whole" / "checkpoints" / "4"
  meta = json.loads((step_dir / "tailjax_model.json").read_text())
  assert meta["lora"] == {**LORA, "base": str(tiny / "teacher.gguf")}
  with ocp.StandardCheckpointer() as checkpointer:
    stored = checkpointer.restore(step_dir / "params")
  adapters = {"/".join(str(getattr(k, "key", k)) for k in path).removesuffix("/value"): np.asarray(v, np.float64)
              for path, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
  assert adapters and all(k.endswith(("lora_a", "lora_b")) for k in adapters)
  # loaded, it is the base with A B folded in: targets changed by exactly scale * A B, every other tensor as it was
  base_model = models.load(base_spec)
  base = kernels(base_model.model)
  merged = kernels(models.load(step_dir).model)
  assert merged.keys() == base.keys()
  changed = 0
  for name, value in merged.items():
    layer = name.removesuffix("/kernel")
    if name.endswith("/kernel") and f"{layer}/lora_a" in adapters:
      a, b = adapters[f"{layer}/lora_a"], adapters[f"{layer}/lora_b"]
      assert np.abs(value - (base[name] + 2.0 * a @ b)).max() < 1e-5
      changed += int(np.abs(b).max() > 0)
    else:
      assert np.array_equal(value, base[name]), name
  assert changed == 3
  # its saved validation CE is the merged model's; `tailjax merge` writes it as a plain checkpoint
  out = tmp_path / "merged"
  result = CliRunner().invoke(cli.main, ["--no-compile-cache", "merge", str(step_dir), "--output", str(out)])
  assert result.exit_code == 0, result.output
  assert "lora" not in json.loads((out / "tailjax_model.json").read_text())
  assert all(np.array_equal(v, merged[k]) for k, v in kernels(models.load(out).model).items())
  # a checkpoint, of adapters or whole, carries the tokenizer's end-of-sequence id and chat template: generation
  # stops and chats as the base's does; one written before they were kept takes its base's
  special = {"eos_id": 63, "chat_template": "{{ messages }}"}
  templated = dataclasses.replace(base_model, tokenizer=dataclasses.replace(base_model.tokenizer, **special))
  base_dir = models.save_checkpoint(templated, tmp_path / "templated")
  adapters_dir = tmp_path / "adapters"
  shutil.copytree(step_dir / "params", adapters_dir / "params")
  write_checkpoint_meta(adapters_dir, templated.config, templated.tokenizer, "test", "float32",
                               lora={**LORA, "base": str(base_dir)})
  for directory in (base_dir, adapters_dir):
    tokenizer = models.load(directory).tokenizer
    assert (tokenizer.eos_id, tokenizer.chat_template) == (63, "{{ messages }}"), directory
  meta = json.loads((adapters_dir / "tailjax_model.json").read_text())
  del meta["tokenizer"]["eos_id"], meta["tokenizer"]["chat_template"]
  (adapters_dir / "tailjax_model.json").write_text(json.dumps(meta))
  assert (models.load(adapters_dir).tokenizer.eos_id, models.load(adapters_dir).tokenizer.chat_template) == (
      63, "{{ messages }}")
  with pytest.raises(ValueError, match="LoRA adapts a pretrained model"):
    distill.prepare(distill_config(tiny, objective="ce", teacher=None, tokenizer=base_spec, lora=LORA))
