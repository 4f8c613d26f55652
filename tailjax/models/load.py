"""Checkpoints -> ``LoadedModel``: Hugging Face directories, GGUF files, tailjax checkpoints.

Every format is read as ``(Hugging Face tensor name, PyTorch-layout array)`` pairs and
poured into an abstract decoder (``nnx.eval_shape``: no random init to throw away);
a tensor with no place, a place with no tensor, or a shape mismatch is an error naming
the file. A model spec may end in ``@<quantization>`` (``model.gguf@int3-g64``) to make a
round-to-nearest candidate from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tailjax.models import gguf, hf
from tailjax.models.config import ModelConfig
from tailjax.models.moe import MoE
from tailjax.models.quantize import QuantSpec, quantize_model
from tailjax.models.transformer import Decoder

CHECKPOINT_FILE = "tailjax_model.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}


def _split_spec(spec: str | Path) -> tuple[Path, str]:
  """``path[@quantization]`` -> (the path, the quantization text or "")."""
  text = str(spec)
  path, _, quant = text.rpartition("@") if "@" in text else (text, "", "")
  return Path(path), quant


def native_dtype(spec: str | Path) -> str:
  """The dtype a model spec's checkpoint stores its weights in, from metadata only (no weights read):
  a Hugging Face ``config.json``'s ``dtype``/``torch_dtype`` or else its first safetensors tensor, a tailjax
  checkpoint's recorded dtype; for GGUF (quantized blocks, dequantized on load) ``bfloat16``."""
  path, _ = _split_spec(spec)
  if path.is_file() and path.suffix == ".gguf":
    return "bfloat16"
  if path.is_dir() and (path / CHECKPOINT_FILE).exists():
    return str(json.loads((path / CHECKPOINT_FILE).read_text()).get("dtype", "float32"))
  if path.is_dir() and (path / "config.json").exists():
    raw = hf.read_raw_config(path)
    named = raw.get("dtype") or raw.get("torch_dtype")
    if named in DTYPES:
      return named
    from safetensors import safe_open

    with safe_open(hf.safetensors_files(path)[0], framework="numpy") as f:
      for name in f.keys():
        if (kind := _SAFETENSORS_DTYPES.get(f.get_slice(name).get_dtype())) is not None:
          return kind
  return "float32"


def resolve_dtype(spec: str | Path, dtype: str = "auto") -> str:
  """``dtype`` by name, or for ``"auto"`` the checkpoint's own (``native_dtype``) on an accelerator and
  float32 on a CPU (whose matmuls upcast half-precision weights anyway)."""
  if dtype != "auto":
    if dtype not in DTYPES:
      raise ValueError(f"dtype {dtype!r}: expected auto or one of {sorted(DTYPES)}")
    return dtype
  return "float32" if jax.default_backend() == "cpu" else native_dtype(spec)


@dataclasses.dataclass
class Tokenizer:
  """A ``tokenizers.Tokenizer`` with the calls tailjax needs; BOS handling made explicit."""

  backend: object
  add_bos: bool = False
  bos_id: int | None = None

  def encode(self, text: str) -> list[int]:
    ids = self.backend.encode(text, add_special_tokens=False).ids
    return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

  def decode(self, ids) -> str:
    return self.backend.decode(list(ids))

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def fingerprint(self) -> str:
    """Hash of the id <-> token map and the BOS rule: equal fingerprints tokenize alike."""
    vocab = sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps([vocab, self.add_bos, self.bos_id]).encode()).hexdigest()[:16]


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig
  model: Decoder
  tokenizer: Tokenizer | None
  source: str
  quantization: QuantSpec | None = None

  @property
  def name(self) -> str:
    return self.source if self.quantization is None else f"{self.source}@{self.quantization}"

  def hidden_states(self, token_ids, segment_ids=None) -> jax.Array:
    return _hidden(self.model, jnp.asarray(token_ids), None if segment_ids is None else jnp.asarray(segment_ids))

  def logprobs(self, token_ids) -> jax.Array:
    """``[B, T]`` ids -> ``[B, T, V]`` next-token log-probabilities (materialized: tests, small inputs)."""
    hidden = self.hidden_states(token_ids)
    logits = jnp.einsum("btd,dv->btv", hidden, self.model.unembedding(), preferred_element_type=jnp.float32)
    if (cap := self.config.final_logit_softcap) is not None:
      logits = cap * jnp.tanh(logits / cap)
    return jax.nn.log_softmax(logits, axis=-1)


@nnx.jit
def _hidden(model: Decoder, token_ids: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  return model(token_ids, segment_ids)


class _Target(NamedTuple):
  """Where a tensor goes: the parameter, whether its last two axes are PyTorch's ``[out, in]``, and
  for one expert of a stacked ``[E, ...]`` parameter, which expert (None: the whole parameter)."""

  param: nnx.Variable
  transpose: bool
  expert: int | None = None


def _targets(model: Decoder) -> dict[str, _Target]:
  """Canonical tensor name (``hf.canonical_name``) -> the parameter it fills."""
  cfg = model.cfg
  targets = {"model.embed_tokens.weight": _Target(model.embed.embedding, False),
             "model.norm.weight": _Target(model.norm.scale, False)}
  if not cfg.tie_word_embeddings:
    targets["lm_head.weight"] = _Target(model.lm_head, True)
  for i, block in enumerate(model.blocks):
    p = f"model.layers.{i}."
    targets[p + "input_layernorm.weight"] = _Target(block.attn_norm.scale, False)
    if cfg.sandwich_norms:
      targets[p + "post_attention_layernorm.weight"] = _Target(block.attn_post_norm.scale, False)
      targets[p + "pre_feedforward_layernorm.weight"] = _Target(block.mlp_norm.scale, False)
      targets[p + "post_feedforward_layernorm.weight"] = _Target(block.mlp_post_norm.scale, False)
    else:
      targets[p + "post_attention_layernorm.weight"] = _Target(block.mlp_norm.scale, False)
    for name in "qkvo":
      layer = getattr(block.attn, name)
      targets[f"{p}self_attn.{name}_proj.weight"] = _Target(layer.kernel, True)
      if layer.bias is not None:
        targets[f"{p}self_attn.{name}_proj.bias"] = _Target(layer.bias, False)
    if cfg.qk_norm:
      targets[p + "self_attn.q_norm.weight"] = _Target(block.attn.q_norm.scale, False)
      targets[p + "self_attn.k_norm.weight"] = _Target(block.attn.k_norm.scale, False)
    if isinstance(block.mlp, MoE):
      targets[p + "mlp.gate.weight"] = _Target(block.mlp.router, True)
      for name in ("gate", "up", "down"):
        param = getattr(block.mlp, name)
        targets[f"{p}mlp.experts.{name}_proj.weight"] = _Target(param, True)  # stacked [E, out, in] (GGUF)
        for j in range(cfg.num_experts):
          targets[f"{p}mlp.experts.{j}.{name}_proj.weight"] = _Target(param, True, j)
    else:
      for name in ("gate", "up", "down"):
        targets[f"{p}mlp.{name}_proj.weight"] = _Target(getattr(block.mlp, name).kernel, True)
  return targets


def hf_tensors(model: Decoder) -> dict[str, np.ndarray]:
  """The inverse of loading: every parameter under its canonical (Hugging Face) name, in PyTorch layout,
  float32; experts one tensor each (``mlp.experts.{j}.gate_proj.weight``), as checkpoints store them.
  Written with a family's ``config.json`` it is a directory transformers loads (benchmarks, parity)."""
  out = {}
  for name, target in _targets(model).items():
    value = np.asarray(target.param.get_value(), np.float32)
    if target.param.get_value().ndim == 3 and target.expert is None:
      continue  # the stacked name; each expert has its own
    value = value[target.expert] if target.expert is not None else value
    out[name] = np.ascontiguousarray(np.swapaxes(value, -1, -2) if target.transpose else value)
  return out


def _unfuse(name: str, value: np.ndarray, cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
  """Fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``; transformers 5's stacked experts
  ``experts.gate_up_proj`` / ``experts.down_proj``) -> the canonical tensors they concatenate."""
  prefix, found, leaf = name.rpartition(".self_attn.qkv_proj.")
  if found:
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [(f"{prefix}.self_attn.{x}_proj.{leaf}", part)
            for x, part in zip("qkv", np.split(value, [q, q + kv], axis=0))]
  for fused in (".mlp.gate_up_proj.", ".mlp.experts.gate_up_proj"):
    prefix, found, _ = name.rpartition(fused)
    if found:
      expert = "experts." if "experts" in fused else ""
      gate, up = np.split(value, 2, axis=-2)
      return [(f"{prefix}.mlp.{expert}gate_proj.weight", gate), (f"{prefix}.mlp.{expert}up_proj.weight", up)]
  if name.endswith(".mlp.experts.down_proj"):
    return [(name + ".weight", value)]
  return [(name, value)]


def _fill(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]], source: str, dtype, param_dtype) -> Decoder:
  model = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  targets = _targets(model)
  stacks: dict[int, tuple[_Target, np.ndarray, set[int]]] = {}  # experts arriving one at a time
  filled: set[int] = set()
  for name, value in (piece for item in tensors for piece in _unfuse(*item, cfg)):
    if name not in targets:
      if name == "lm_head.weight" and cfg.tie_word_embeddings or name.endswith("rotary_emb.inv_freq"):
        continue
      raise ValueError(f"{source}: tensor {name} has no place in the model")
    target = targets.pop(name)
    value = np.swapaxes(value, -1, -2) if target.transpose else value
    expected = target.param.get_value().shape
    if target.expert is not None:
      expected = expected[1:]
    if value.shape != expected:
      raise ValueError(f"{source}: tensor {name} has shape {value.shape}, the model expects {expected}")
    key = id(target.param)
    if key in filled:
      raise ValueError(f"{source}: tensor {name} fills a parameter that another tensor already filled")
    if target.expert is None:
      target.param.set_value(jnp.asarray(value, target.param.get_value().dtype))
      filled.add(key)
      _drop_expert_names(targets, target.param)
      continue
    _, stack, have = stacks.setdefault(key, (target, np.zeros(target.param.get_value().shape, np.float32), set()))
    stack[target.expert] = value
    have.add(target.expert)
    if len(have) == cfg.num_experts:
      target.param.set_value(jnp.asarray(stack, target.param.get_value().dtype))
      filled.add(key)
      del stacks[key]
      _drop_expert_names(targets, target.param)
  if targets:
    raise ValueError(f"{source}: tensors missing: {sorted(targets)[:5]}{' ...' if len(targets) > 5 else ''}")
  return model


def _drop_expert_names(targets: dict[str, _Target], param: nnx.Variable) -> None:
  """A stacked expert parameter is filled either whole or expert by expert: once filled, forget the other names."""
  for name in [n for n, t in targets.items() if t.param is param]:
    del targets[name]


def _check_vocab(tokenizer: Tokenizer | None, cfg: ModelConfig, source: str) -> None:
  if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {cfg.vocab_size}")


def from_gguf(path: str | Path, dtype=jnp.float32, param_dtype=None) -> LoadedModel:
  """A GGUF file (llama or qwen2 architecture) -> dequantized model + tokenizer."""
  import gguf as gguf_lib

  path = Path(path)
  try:
    reader = gguf_lib.GGUFReader(path)
  except (OSError, ValueError) as err:
    raise ValueError(f"{path}: not a readable GGUF file ({err})") from err
  cfg = gguf.read_config(reader, path)
  model = _fill(cfg, gguf.read_tensors(reader, cfg, path), str(path), dtype, param_dtype)
  tokenizer = _gguf_tokenizer(reader, path)
  _check_vocab(tokenizer, cfg, str(path))
  return LoadedModel(cfg, model, tokenizer, str(path))


def _gguf_tokenizer(reader, path: Path) -> Tokenizer:
  return Tokenizer(gguf.read_tokenizer(reader, path), bool(gguf.field(reader, "tokenizer.ggml.add_bos_token")),
                   gguf.field(reader, "tokenizer.ggml.bos_token_id"))


def from_hf(directory: str | Path, dtype=jnp.float32, param_dtype=None) -> LoadedModel:
  """A Hugging Face directory (``config.json``, safetensors, tokenizer files) -> model + tokenizer."""
  directory = Path(directory)
  cfg = hf.read_config(directory)
  model = _fill(cfg, hf.read_tensors(directory), str(directory), dtype, param_dtype)
  tokenizer = _hf_tokenizer(directory)
  _check_vocab(tokenizer, cfg, str(directory))
  return LoadedModel(cfg, model, tokenizer, str(directory))


def _hf_tokenizer(directory: Path) -> Tokenizer | None:
  if (auto := hf.read_tokenizer(directory)) is None:
    return None
  if not getattr(auto, "is_fast", False):
    raise ValueError(f"{directory}: the tokenizer has no fast (tokenizers) version")
  bos = auto.bos_token_id
  plain = auto.backend_tokenizer.encode("a", add_special_tokens=False).ids
  return Tokenizer(auto.backend_tokenizer, bos is not None and auto("a")["input_ids"] == [bos, *plain], bos)


def save_checkpoint(loaded: LoadedModel, directory: str | Path) -> Path:
  """Write a tailjax checkpoint: ``tailjax_model.json`` (config, BOS rule), ``tokenizer.json``, orbax ``params``."""
  import orbax.checkpoint as ocp

  directory = Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  meta = {"config": loaded.config.to_dict(), "source": loaded.name, "dtype": str(_param_dtype(loaded.model))}
  if loaded.tokenizer is not None:
    loaded.tokenizer.backend.save(str(directory / "tokenizer.json"))
    meta["tokenizer"] = {"file": "tokenizer.json", "add_bos": loaded.tokenizer.add_bos,
                         "bos_id": loaded.tokenizer.bos_id}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory / "params", nnx.state(loaded.model, nnx.Param), force=True)
  (directory / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=1))
  return directory


def _param_dtype(model: Decoder):
  return model.embed.embedding.get_value().dtype


def from_checkpoint(directory: str | Path, dtype=None, param_dtype=None) -> LoadedModel:
  """A directory written by ``save_checkpoint`` (or the trainer)."""
  import orbax.checkpoint as ocp

  directory = Path(directory).absolute()
  meta_path = directory / CHECKPOINT_FILE
  try:
    meta = json.loads(meta_path.read_text())
    cfg = ModelConfig.from_dict(meta["config"])
  except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
    raise ValueError(f"{meta_path}: not a readable tailjax checkpoint description ({err!r})") from err
  stored = jnp.dtype(meta.get("dtype", "float32"))
  dtype = dtype or stored
  model = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype or stored, rngs=nnx.Rngs(0)))
  abstract = nnx.state(model, nnx.Param)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(directory / "params", abstract)
  except (OSError, ValueError, KeyError) as err:
    raise ValueError(f"{directory / 'params'}: unreadable parameters ({err})") from err
  nnx.update(model, restored)
  tokenizer = _checkpoint_tokenizer(directory, meta)
  _check_vocab(tokenizer, cfg, str(directory))
  return LoadedModel(cfg, model, tokenizer, str(directory))


def _checkpoint_tokenizer(directory: Path, meta: dict) -> Tokenizer | None:
  from tokenizers import Tokenizer as Backend

  if "tokenizer" not in meta:
    return None
  t = meta["tokenizer"]
  return Tokenizer(Backend.from_file(str(directory / t["file"])), t["add_bos"], t["bos_id"])


def load_config(spec: str | Path) -> ModelConfig:
  """Only the ``ModelConfig`` of a model spec, from its metadata (no weights read)."""
  import gguf as gguf_lib

  path, _ = _split_spec(spec)
  if path.is_file() and path.suffix == ".gguf":
    return gguf.read_config(gguf_lib.GGUFReader(path), path)
  if path.is_dir() and (path / CHECKPOINT_FILE).exists():
    return ModelConfig.from_dict(json.loads((path / CHECKPOINT_FILE).read_text())["config"])
  if path.is_dir() and (path / "config.json").exists():
    return hf.read_config(path)
  raise FileNotFoundError(f"{path}: no such model (a .gguf file, a Hugging Face directory or a tailjax checkpoint)")


def load_tokenizer(spec: str | Path) -> Tokenizer:
  """Only the tokenizer of a model spec (no weights read), or a ``tokenizer.json`` file."""
  import gguf as gguf_lib
  from tokenizers import Tokenizer as Backend

  path, _ = _split_spec(spec)
  tokenizer = None
  if path.is_file() and path.suffix == ".gguf":
    tokenizer = _gguf_tokenizer(gguf_lib.GGUFReader(path), path)
  elif path.is_file() and path.suffix == ".json":
    try:
      tokenizer = Tokenizer(Backend.from_file(str(path)))
    except Exception as err:  # tokenizers raises a plain Exception for malformed files
      raise ValueError(f"{path}: not a tokenizers JSON file ({err})") from err
  elif path.is_dir() and (path / CHECKPOINT_FILE).exists():
    tokenizer = _checkpoint_tokenizer(path, json.loads((path / CHECKPOINT_FILE).read_text()))
  elif path.is_dir() and (path / "config.json").exists():
    tokenizer = _hf_tokenizer(path)
  elif not path.exists():
    raise FileNotFoundError(f"{path}: no such tokenizer or model")
  if tokenizer is None:
    raise ValueError(f"{path}: holds no tokenizer")
  return tokenizer


def load(spec: str | Path, dtype=jnp.float32, param_dtype=None) -> LoadedModel:
  """``path[@quantization]``: a ``.gguf`` file, a Hugging Face directory or a tailjax checkpoint.

  With ``@int4`` (see ``QuantSpec.parse``) every transformer-block linear weight is rounded
  to nearest, so the candidate runs the same code on quantized numbers. ``dtype`` is a JAX
  dtype or a name from ``DTYPES``, or ``"auto"`` (``resolve_dtype``).
  """
  path, quant = _split_spec(spec)
  quantization = QuantSpec.parse(quant) if quant else None
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such model file or directory")
  if isinstance(dtype, str):
    dtype = DTYPES[resolve_dtype(path, dtype)]
  if path.is_file() and path.suffix == ".gguf":
    loaded = from_gguf(path, dtype, param_dtype)
  elif path.is_dir() and (path / CHECKPOINT_FILE).exists():
    loaded = from_checkpoint(path, dtype, param_dtype)
  elif path.is_dir() and (path / "config.json").exists():
    loaded = from_hf(path, dtype, param_dtype)
  else:
    raise ValueError(f"{path}: not a model (expected a .gguf file, a Hugging Face directory with config.json, "
                     f"or a tailjax checkpoint with {CHECKPOINT_FILE})")
  if quantization is not None:
    quantize_model(loaded.model, quantization)
    loaded.quantization = quantization
  return loaded
