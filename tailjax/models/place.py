"""Checkpoint tensors -> a decoder's parameters, each created once, on its devices, in its final sharding.

Every checkpoint format is read as ``(canonical tensor name, lazy PyTorch-layout tensor)`` pairs
(``tailjax.models.lazy``). ``fill`` finds each tensor's parameter in an abstract decoder
(``nnx.eval_shape``: no random init to throw away), checks every name and shape before a byte is
read (a tensor with no place, a place with no tensor, a shape mismatch, a parameter filled twice:
errors naming the source), then builds each parameter with ``jax.make_array_from_callback`` on the
sharding ``tailjax.mesh`` gives it: every device asks for its own box, and only that box is read,
dequantized and cast to the parameter dtype. A block's parameter (stacked ``[repeats, ...]``,
``tailjax.models.transformer``) is written one layer at a time into its donated buffer. Peak host
memory is about one layer's largest shard, not the model; on a pod each host reads only the boxes
of its own devices.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tailjax import mesh as meshes
from tailjax.models import lazy
from tailjax.models.config import ModelConfig
from tailjax.models.moe import MoE
from tailjax.models.transformer import Decoder, slot


class _Target(NamedTuple):
  """Where a tensor goes: the parameter, whether its last two axes are PyTorch's ``[out, in]``, for a block's
  parameter which row of its leading ``[repeats]`` axis (``transformer.slot``; None: the whole parameter), and
  for one expert of a stacked ``[E, ...]`` parameter, which expert (None: all of them)."""

  param: nnx.Variable
  transpose: bool
  row: int | None = None
  expert: int | None = None


def _targets(model: Decoder) -> dict[str, _Target]:
  """Canonical tensor name (``hf.canonical_name``) -> the parameter it fills."""
  cfg = model.cfg
  targets = {"model.embed_tokens.weight": _Target(model.embed.embedding, False),
             "model.norm.weight": _Target(model.norm.scale, False)}
  if not cfg.tie_word_embeddings:
    targets["lm_head.weight"] = _Target(model.lm_head, True)
  if cfg.per_layer_input_size:
    inputs = model.per_layer_inputs
    targets.update({"model.embed_tokens_per_layer.weight": _Target(inputs.embedding.embedding, False),
                    "model.per_layer_model_projection.weight": _Target(inputs.projection.kernel, True),
                    "model.per_layer_projection_norm.weight": _Target(inputs.norm.scale, False)})
  for i in range(cfg.num_layers):
    where = slot(cfg, i)
    block, p = model.layers[where.stack].blocks[where.position], f"model.layers.{i}."
    at = lambda param, transpose, expert=None: _Target(param, transpose, where.row, expert)
    if cfg.block == "gemma4":
      targets.update(_gemma4_targets(cfg, block, p, at))
      continue
    targets[p + "input_layernorm.weight"] = at(block.attn_norm.scale, False)
    if cfg.sandwich_norms:
      targets[p + "post_attention_layernorm.weight"] = at(block.attn_post_norm.scale, False)
      targets[p + "pre_feedforward_layernorm.weight"] = at(block.mlp_norm.scale, False)
      targets[p + "post_feedforward_layernorm.weight"] = at(block.mlp_post_norm.scale, False)
    else:
      targets[p + "post_attention_layernorm.weight"] = at(block.mlp_norm.scale, False)
    mixer = _deltanet_targets if cfg.layer_type(i) == "linear" else _mla_targets if cfg.attention == "mla" else \
        _attention_targets
    targets.update(mixer(cfg, block.attn, p, at))
    if isinstance(block.mlp, MoE):
      targets.update(_expert_targets(cfg, block.mlp, p + "mlp.", at))
      if cfg.router == "sigmoid_groups":
        targets[p + "mlp.gate.e_score_correction_bias"] = at(block.mlp.score_correction, False)
      if cfg.shared_expert_size:  # GLM: shared_experts; Qwen2-MoE: shared_expert, with its gate
        shared = "shared_expert" if cfg.shared_expert_gate else "shared_experts"
        for name in ("gate", "up", "down"):
          targets[f"{p}mlp.{shared}.{name}_proj.weight"] = at(getattr(block.mlp.shared, name).kernel, True)
      if cfg.shared_expert_gate:
        targets[p + "mlp.shared_expert_gate.weight"] = at(block.mlp.shared_gate, True)
      if cfg.moe_bias:  # gpt-oss: stacked [E, out]
        targets[p + "mlp.gate.bias"] = at(block.mlp.router_bias, False)
        for name in ("gate", "up", "down"):
          targets[f"{p}mlp.experts.{name}_proj.bias"] = at(getattr(block.mlp, f"{name}_bias"), False)
    else:
      for name in ("gate", "up", "down"):
        targets[f"{p}mlp.{name}_proj.weight"] = at(getattr(block.mlp, name).kernel, True)
  return targets


def _expert_targets(cfg: ModelConfig, moe: MoE, p: str, at) -> dict[str, _Target]:
  """The router ``{p}gate.weight`` and the experts, stacked ``[E, out, in]`` (GGUF, transformers 5) or one by one."""
  targets = {p + "gate.weight": at(moe.router, True)}
  for name in ("gate", "up", "down"):
    param = getattr(moe, name)
    targets[f"{p}experts.{name}_proj.weight"] = at(param, True)
    for j in range(cfg.num_experts):
      targets[f"{p}experts.{j}.{name}_proj.weight"] = at(param, True, j)
  return targets


def _gemma4_targets(cfg: ModelConfig, block, p: str, at) -> dict[str, _Target]:
  """A Gemma 4 layer (``tailjax.models.gemma4``): attention without the projections a layer does not have, the
  norms around the MLP and beside it the experts (``moe.``, ``hf.canonical_name``), per-layer inputs, the scalar."""
  attn = block.attn
  targets = {p + "layer_scalar": at(block.layer_scalar, False),
             p + "self_attn.q_norm.weight": at(attn.q_norm.scale, False)}
  for name in ("q", "k", "v", "o"):
    if hasattr(attn, name):
      layer = getattr(attn, name)
      targets[f"{p}self_attn.{name}_proj.weight"] = at(layer.kernel, True)
      if layer.bias is not None:
        targets[f"{p}self_attn.{name}_proj.bias"] = at(layer.bias, False)
  if hasattr(attn, "k_norm"):
    targets[p + "self_attn.k_norm.weight"] = at(attn.k_norm.scale, False)
  norms = dict(input_layernorm="attn_norm", post_attention_layernorm="attn_post_norm",
               pre_feedforward_layernorm="mlp_norm", post_feedforward_layernorm="mlp_post_norm",
               pre_feedforward_layernorm_2="moe_norm", post_feedforward_layernorm_1="mlp_post_norm_1",
               post_feedforward_layernorm_2="moe_post_norm", post_per_layer_input_norm="per_layer_norm")
  targets.update({f"{p}{name}.weight": at(getattr(block, mine).scale, False) for name, mine in norms.items()
                  if hasattr(block, mine)})
  targets.update({f"{p}mlp.{name}_proj.weight": at(getattr(block.mlp, name).kernel, True)
                  for name in ("gate", "up", "down")})
  if hasattr(block, "moe"):
    targets.update(_expert_targets(cfg, block.moe, p + "moe.", at))
    targets[p + "moe.router_scale"] = at(block.moe.router_scale, False)
    targets[p + "moe.per_expert_scale"] = at(block.moe.per_expert_scale, False)
  if cfg.per_layer_input_size:
    targets[p + "per_layer_input_gate.weight"] = at(block.per_layer_gate.kernel, True)
    targets[p + "per_layer_projection.weight"] = at(block.per_layer_projection.kernel, True)
  return targets


def _attention_targets(cfg: ModelConfig, attn, p: str, at) -> dict[str, _Target]:
  targets = {}
  for name in "qkvo":
    layer = getattr(attn, name)
    targets[f"{p}self_attn.{name}_proj.weight"] = at(layer.kernel, True)
    if layer.bias is not None:
      targets[f"{p}self_attn.{name}_proj.bias"] = at(layer.bias, False)
  if cfg.qk_norm:
    targets[p + "self_attn.q_norm.weight"] = at(attn.q_norm.scale, False)
    targets[p + "self_attn.k_norm.weight"] = at(attn.k_norm.scale, False)
  if cfg.attention_sinks:
    targets[p + "self_attn.sinks"] = at(attn.sinks, False)
  return targets


def _mla_targets(cfg: ModelConfig, attn, p: str, at) -> dict[str, _Target]:
  """Multi-head latent attention (``tailjax.models.mla``) under DeepSeek's tensor names."""
  del cfg
  p += "self_attn."
  names = dict(q="q_proj", q_a="q_a_proj", q_b="q_b_proj", kv_a="kv_a_proj_with_mqa", kv_b="kv_b_proj", o="o_proj")
  targets = {}
  for mine, name in names.items():
    if hasattr(attn, mine):
      layer = getattr(attn, mine)
      targets[f"{p}{name}.weight"] = at(layer.kernel, True)
      if layer.bias is not None:
        targets[f"{p}{name}.bias"] = at(layer.bias, False)
  for mine, name in (("q_a_norm", "q_a_layernorm"), ("kv_a_norm", "kv_a_layernorm")):
    if hasattr(attn, mine):
      targets[f"{p}{name}.weight"] = at(getattr(attn, mine).scale, False)
  return targets


def _deltanet_targets(cfg: ModelConfig, mixer, p: str, at) -> dict[str, _Target]:
  """Gated DeltaNet's tensors, ``in_proj_qkv`` and ``conv1d`` cut into q, k and v (``_unfuse``)."""
  del cfg
  p += "linear_attn."
  targets = {f"{p}in_proj_{name}.weight": at(getattr(mixer, name).kernel, True) for name in "qkvzba"}
  for name in "qkv":
    targets[f"{p}conv1d_{name}.weight"] = at(getattr(mixer, f"conv_{name}"), True)  # [width, K] -> [K, width]
  targets[p + "out_proj.weight"] = at(mixer.o.kernel, True)
  targets[p + "dt_bias"] = at(mixer.dt_bias, False)
  targets[p + "A_log"] = at(mixer.A_log, False)
  targets[p + "norm.weight"] = at(mixer.norm.scale, False)
  return targets


def _expected(target: _Target) -> tuple[int, ...]:
  """The shape of the tensor that fills ``target``: the parameter's, less its row and expert axes."""
  shape = tuple(target.param.get_value().shape)
  return shape[(target.row is not None) + (target.expert is not None):]


def hf_tensors(model: Decoder) -> dict[str, np.ndarray]:
  """The inverse of loading: every parameter under its canonical (Hugging Face) name, in PyTorch layout,
  float32; experts one tensor each (``mlp.experts.{j}.gate_proj.weight``), as checkpoints store them.
  Written with a family's ``config.json`` it is a directory transformers loads (benchmarks, parity)."""
  out = {}
  for name, target in _targets(model).items():
    if len(_expected(target)) == 3:
      continue  # the stacked name of a layer's experts; each expert has its own
    value = np.asarray(target.param.get_value(), np.float32)
    value = value if target.row is None else value[target.row]
    value = value if target.expert is None else value[target.expert]
    out[name] = np.ascontiguousarray(np.swapaxes(value, -1, -2) if target.transpose else value)
  return out


def _unfuse(name: str, value: lazy.LazyTensor, cfg: ModelConfig) -> list[tuple[str, lazy.LazyTensor]]:
  """Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``; transformers 5's stacked experts
  ``experts.gate_up_proj`` / ``experts.down_proj``; Gated DeltaNet's ``in_proj_qkv`` and ``conv1d``) -> the
  canonical tensors they concatenate."""
  prefix, found, leaf = name.rpartition(".self_attn.qkv_proj.")
  if found:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    bounds = [0, q, q + kv, value.shape[0]]
    return [(f"{prefix}.self_attn.{x}_proj.{leaf}", lazy.Part(value, 0, bounds[i], bounds[i + 1]))
            for i, x in enumerate("qkv")]
  for fused in (".linear_attn.in_proj_qkv.", ".linear_attn.conv1d."):  # Gated DeltaNet: q, k, v concatenated
    prefix, found, leaf = name.rpartition(fused)
    if found:
      keys = cfg.linear_num_key_heads * cfg.linear_key_head_dim
      bounds = [0, keys, 2 * keys, value.shape[0]]
      conv = "conv1d" in fused
      value = lazy.Squeezed(value, 1) if conv and len(value.shape) == 3 else value  # [C, 1, K] -> [C, K]
      stem = f"{prefix}.linear_attn.{'conv1d_' if conv else 'in_proj_'}"
      return [(f"{stem}{x}.{leaf}", lazy.Part(value, 0, bounds[i], bounds[i + 1])) for i, x in enumerate("qkv")]
  for fused in (".mlp.gate_up_proj.", ".mlp.experts.gate_up_proj", ".moe.experts.gate_up_proj"):
    prefix, found, _ = name.rpartition(fused)
    if found:
      stem = fused.removesuffix("gate_up_proj.").removesuffix("gate_up_proj")
      axis, rows = len(value.shape) - 2, value.shape[-2]
      if rows % 2:
        raise ValueError(f"tensor {name} has {rows} rows, not gate and up halves")
      return [(f"{prefix}{stem}gate_proj.weight", lazy.Part(value, axis, 0, rows // 2)),
              (f"{prefix}{stem}up_proj.weight", lazy.Part(value, axis, rows // 2, rows))]
  if name.endswith((".mlp.experts.down_proj", ".moe.experts.down_proj")):
    return [(name + ".weight", value)]
  return [(name, value)]


def fill(cfg: ModelConfig, tensors: Iterable[tuple[str, lazy.LazyTensor]], source: str, dtype, param_dtype=None,
         device_mesh: jax.sharding.Mesh | None = None) -> Decoder:
  """A ``Decoder`` of ``cfg`` whose parameters are ``tensors``, each placed by ``tailjax.mesh``'s rules on
  ``device_mesh`` (None: the first local device) and stored in ``param_dtype`` (default ``dtype``)."""
  model = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  for param, tensor, stacked in _assign(model, tensors, source, cfg):
    build = _stacked_array if stacked else _array
    param.set_value(build(tensor, param.get_value().dtype, meshes.variable_sharding(param, device_mesh)))
  return model


def _assign(model: Decoder, tensors, source: str,
            cfg: ModelConfig) -> list[tuple[nnx.Variable, lazy.LazyTensor, bool]]:
  """Every parameter with the lazy tensor that fills it and whether that is a block's stack of rows (layers), all
  names and shapes checked, nothing read.

  A block's parameter is filled row by row (one layer each), a row of MoE experts either whole or expert
  by expert; the pieces are stacked lazily (``lazy.Stacked``) once all are there."""
  targets = _targets(model)
  whole: dict[int, tuple[nnx.Variable, lazy.LazyTensor, bool]] = {}
  rows: dict[int, dict[int, lazy.LazyTensor]] = {}  # parameter -> row -> tensor
  experts: dict[tuple[int, int | None], dict[int, lazy.LazyTensor]] = {}  # (parameter, row) -> expert -> tensor
  filled: set[tuple[int, int | None]] = set()

  def complete(target: _Target, value: lazy.LazyTensor) -> None:
    key = (id(target.param), target.row)
    filled.add(key)
    for name in [n for n, t in targets.items() if (id(t.param), t.row) == key]:
      del targets[name]  # the other granularity of the same piece (a row's experts stacked or one by one)
    if target.row is None:
      whole[id(target.param)] = (target.param, value, False)
      return
    done = rows.setdefault(id(target.param), {})
    done[target.row] = value
    if len(done) == target.param.get_value().shape[0]:
      whole[id(target.param)] = (target.param, lazy.Stacked(tuple(done[r] for r in range(len(done)))), True)

  for name, value in (piece for item in tensors for piece in _unfuse(*item, cfg)):
    if name not in targets:
      if name == "lm_head.weight" and cfg.tie_word_embeddings or name.endswith("rotary_emb.inv_freq"):
        continue
      raise ValueError(f"{source}: tensor {name} has no place in the model")
    target = targets.pop(name)
    value = lazy.Transposed(value) if target.transpose else value
    if tuple(value.shape) != _expected(target):
      raise ValueError(f"{source}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                       f"{_expected(target)}")
    key = (id(target.param), target.row)
    if key in filled:
      raise ValueError(f"{source}: tensor {name} fills a parameter that another tensor already filled")
    if target.expert is None:
      complete(target, value)
      continue
    parts = experts.setdefault(key, {})
    parts[target.expert] = value
    if len(parts) == cfg.num_experts:
      complete(target, lazy.Stacked(tuple(parts[j] for j in range(cfg.num_experts))))
      del experts[key]
  if targets:
    raise ValueError(f"{source}: tensors missing: {sorted(targets)[:5]}{' ...' if len(targets) > 5 else ''}")
  return list(whole.values())


def _array(tensor: lazy.LazyTensor, dtype, sharding: jax.sharding.Sharding) -> jax.Array:
  """One parameter: each addressable device's box read (once per distinct box: replicas share it, and it is
  dropped once the last of them has it) and cast."""
  wanted = collections.Counter(_key(lazy.box_of(index, tensor.shape)) for index in
                               sharding.addressable_devices_indices_map(tuple(tensor.shape)).values())
  boxes: dict[tuple, np.ndarray] = {}

  def piece(index) -> np.ndarray:
    box = lazy.box_of(index, tensor.shape)
    key = _key(box)
    if key not in boxes:
      boxes[key] = np.asarray(tensor.read(box), dtype)
    wanted[key] -= 1
    return boxes[key] if wanted[key] > 0 else boxes.pop(key)

  return jax.make_array_from_callback(tuple(tensor.shape), sharding, piece)


def _key(box) -> tuple:
  return tuple((s.start, s.stop) for s in box)


def _stacked_array(tensor: lazy.Stacked, dtype, sharding: jax.sharding.Sharding) -> jax.Array:
  """A block's ``[repeats, ...]`` parameter written one row (layer) at a time into its sharded buffer, which each
  write donates: the host holds one layer's boxes at a time and the devices the stack plus one layer."""
  rows = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:])) \
      if isinstance(sharding, jax.sharding.NamedSharding) else sharding  # the layer axis is never split
  stacked = _zeros(tuple(tensor.shape), np.dtype(dtype), sharding)()
  for i, part in enumerate(tensor.parts):
    stacked = _write_row(sharding)(stacked, _array(part, dtype, rows), i)
  return stacked


@functools.lru_cache(maxsize=256)
def _zeros(shape: tuple[int, ...], dtype, sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=256)
def _write_row(sharding):
  return jax.jit(lambda stack, row, i: jax.lax.dynamic_update_index_in_dim(stack, row, i, 0), donate_argnums=0,
                 out_shardings=sharding)
