"""Model specs -> ``LoadedModel``: Hugging Face directories, GGUF files, tailjax checkpoints.

A model spec is a path, optionally ending in ``@<quantization>`` (``model.gguf@int3-g64``) to make a
round-to-nearest candidate from it. ``locate`` is the one place that tells the formats apart; each
format's reader yields lazy tensors that ``tailjax.models.place`` puts straight into their final
shardings (a tailjax checkpoint is restored by orbax into them), so no model is ever whole on one
device or in host memory unless it is meant to be.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tailjax import files
from tailjax.frozen import frozen_jit
from tailjax.models import checkpoint, gguf, hf, lora, place
from tailjax.models.config import ModelConfig
from tailjax.models.quantize import QuantSpec, quantize_model
from tailjax.models.spec import ModelSpec
from tailjax.models.tokenizer import Tokenizer, check_vocab, from_checkpoint_meta, from_gguf_reader, \
    from_hf_directory, from_json
from tailjax.models.transformer import Decoder

CHECKPOINT_FILE = "tailjax_model.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}


class Located(NamedTuple):
  """A model spec, resolved: its ``format`` (``gguf``, ``hf`` or ``checkpoint``), path and quantization text."""

  format: str
  path: Path
  quantization: str


def locate(spec: str | Path) -> Located:
  """``path[@quantization]`` -> which format it is; a missing path or an unknown layout is an error naming it."""
  parsed = ModelSpec.parse(spec, labelled=False)
  path, quant = Path(parsed.path), parsed.quantization
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such model file or directory")
  if path.is_file() and path.suffix == ".gguf":
    return Located("gguf", path, quant)
  if path.is_dir() and (path / CHECKPOINT_FILE).exists():
    return Located("checkpoint", path, quant)
  if path.is_dir() and (path / "config.json").exists():
    return Located("hf", path, quant)
  raise ValueError(f"{path}: not a model (expected a .gguf file, a Hugging Face directory with config.json, "
                   f"or a tailjax checkpoint with {CHECKPOINT_FILE})")


def _gguf_reader(path: Path):
  import gguf as gguf_lib

  try:
    return gguf_lib.GGUFReader(path)
  except (OSError, ValueError, IndexError, KeyError, TypeError, struct.error) as err:  # truncated or corrupt header
    raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(err).__name__}: {err})") from err


def _checkpoint_meta(directory: Path) -> dict:
  meta_path = directory / CHECKPOINT_FILE
  try:
    meta = json.loads(meta_path.read_text())
    meta["config"] = ModelConfig.from_dict(meta["config"])
  except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
    raise ValueError(f"{meta_path}: not a readable tailjax checkpoint description ({err!r})") from err
  return meta


def storage(spec: str | Path) -> str:
  """How a model spec's checkpoint stores its weights, for a report's header: a GGUF file's main tensor type (by
  elements; a quantized one is said to be no float reference), else the format and ``native_dtype``."""
  where = locate(spec)
  if where.format != "gguf":
    kind = "Hugging Face" if where.format == "hf" else "tailjax checkpoint"
    return f"{kind}, {native_dtype(spec)}"
  sizes: dict[str, int] = {}
  for t in _gguf_reader(where.path).tensors:
    sizes[t.tensor_type.name] = sizes.get(t.tensor_type.name, 0) + int(np.prod(t.shape))
  main = max(sizes, key=sizes.get)
  if main in ("F32", "F16", "BF16"):
    return f"GGUF, {main}"
  return f"GGUF, {main}: quantized weights (dequantized on load), not a float reference"


def native_dtype(spec: str | Path) -> str:
  """The dtype a model spec's checkpoint stores its weights in, from metadata only (no weights read):
  a Hugging Face ``config.json``'s ``dtype``/``torch_dtype`` or else its first safetensors tensor, a tailjax
  checkpoint's recorded dtype; for GGUF (quantized blocks, dequantized on load) ``bfloat16``."""
  where = locate(spec)
  if where.format == "gguf":
    return "bfloat16"
  if where.format == "checkpoint":
    return str(_checkpoint_meta(where.path).get("dtype", "float32"))
  raw = hf.read_raw_config(where.path)
  named = raw.get("dtype") or raw.get("torch_dtype")
  if named in DTYPES:
    return named
  from safetensors import safe_open

  with safe_open(hf.safetensors_files(where.path)[0], framework="numpy") as f:
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


def _forward(model: Decoder, token_ids: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
  return model(token_ids, segment_ids)


_hidden = frozen_jit(_forward)


def from_gguf(path: str | Path, dtype=jnp.float32, param_dtype=None, device_mesh=None) -> LoadedModel:
  """A GGUF file -> dequantized model (each device's rows dequantized for it alone) + tokenizer."""
  path = Path(path)
  reader = _gguf_reader(path)
  cfg = gguf.read_config(reader, path)
  tensors = gguf.read_tensors(reader, cfg, path)
  model = place.fill(cfg, tensors, str(path), dtype, param_dtype, device_mesh)
  tokenizer = from_gguf_reader(reader, path)
  check_vocab(tokenizer, cfg.vocab_size, str(path))
  return LoadedModel(cfg, model, tokenizer, str(path))


def from_hf(directory: str | Path, dtype=jnp.float32, param_dtype=None, device_mesh=None) -> LoadedModel:
  """A Hugging Face directory (``config.json``, safetensors, tokenizer files) -> model + tokenizer."""
  directory = Path(directory)
  cfg = hf.read_config(directory)
  model = place.fill(cfg, hf.read_tensors(directory), str(directory), dtype, param_dtype, device_mesh)
  tokenizer = from_hf_directory(directory)
  check_vocab(tokenizer, cfg.vocab_size, str(directory))
  return LoadedModel(cfg, model, tokenizer, str(directory))


def save_checkpoint(loaded: LoadedModel, directory: str | Path) -> Path:
  """Write a tailjax checkpoint: orbax ``params``, then its description (``write_checkpoint_meta``)."""
  directory = Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  checkpoint.save(loaded.model, directory / "params")
  write_checkpoint_meta(directory, loaded.config, loaded.tokenizer, loaded.name,
                        str(loaded.model.embed.embedding.get_value().dtype))
  return directory


def write_checkpoint_meta(directory: Path, config: ModelConfig, tokenizer: Tokenizer | None, source: str,
                          dtype: str, lora: dict | None = None) -> None:
  """What makes a directory of orbax ``params`` a model spec: ``tokenizer.json`` and ``tailjax_model.json``
  (config, source, dtype, BOS rule; ``lora``: the params are adapters, ``LoraConfig`` fields and the ``base``
  model spec they adapt), the latter written last and atomically (a kill leaves no half file). The one writer
  of checkpoint descriptions (``save_checkpoint``, the trainer's checkpoints)."""
  meta = {"config": config.to_dict(), "source": source, "dtype": dtype}
  if lora is not None:
    meta["lora"] = lora
  if tokenizer is not None:
    files.write_atomic(directory / "tokenizer.json", tokenizer.backend.to_str(), "the tokenizer")
    meta["tokenizer"] = {"file": "tokenizer.json", "add_bos": tokenizer.add_bos, "bos_id": tokenizer.bos_id,
                         "eos_id": tokenizer.eos_id, "chat_template": tokenizer.chat_template}
  files.write_atomic(directory / CHECKPOINT_FILE, json.dumps(meta, indent=1), "the checkpoint description")


def from_checkpoint(directory: str | Path, dtype=None, param_dtype=None, device_mesh=None) -> LoadedModel:
  """A directory written by ``save_checkpoint`` (or the trainer), restored by orbax straight into each
  parameter's sharding on ``device_mesh`` (None: the first local device), in ``param_dtype``."""
  directory = Path(directory).absolute()
  meta = _checkpoint_meta(directory)
  if "lora" in meta:
    return _from_adapters(directory, meta, dtype, param_dtype, device_mesh)
  cfg = meta["config"]
  stored = jnp.dtype(meta.get("dtype", "float32"))
  dtype = dtype or stored
  model = nnx.eval_shape(lambda: Decoder(cfg, dtype=dtype, param_dtype=param_dtype or stored, rngs=nnx.Rngs(0)))
  checkpoint.restore(directory / "params", model, device_mesh)
  tokenizer = from_checkpoint_meta(directory, meta)
  check_vocab(tokenizer, cfg.vocab_size, str(directory))
  return LoadedModel(cfg, model, tokenizer, str(directory))


def _from_adapters(directory: Path, meta: dict, dtype, param_dtype, device_mesh) -> LoadedModel:
  """A checkpoint of LoRA adapters: its base loaded, the adapters restored onto it and merged (a plain model)."""
  fields = dict(meta["lora"])
  base_spec = fields.pop("base")
  try:
    base = load(base_spec, dtype or jnp.float32, param_dtype, device_mesh)
  except (OSError, ValueError) as err:
    raise ValueError(f"{directory}: holds LoRA adapters of {base_spec}, which does not load ({err})") from err
  lora.adapt(base.model, lora.LoraConfig.from_dict(fields), nnx.Rngs(0))
  checkpoint.restore(directory / "params", base.model, device_mesh, kind=nnx.LoRAParam)
  lora.merge(base.model)
  own = from_checkpoint_meta(directory, meta)
  if own is not None and base.tokenizer is not None and "eos_id" not in meta["tokenizer"]:
    # written before checkpoints carried them: the base's end-of-sequence id and chat template (same vocabulary)
    own = dataclasses.replace(own, eos_id=base.tokenizer.eos_id, chat_template=base.tokenizer.chat_template)
  return LoadedModel(base.config, base.model, own or base.tokenizer, str(directory))


def load_config(spec: str | Path) -> ModelConfig:
  """Only the ``ModelConfig`` of a model spec, from its metadata (no weights read)."""
  where = locate(spec)
  if where.format == "gguf":
    return gguf.read_config(_gguf_reader(where.path), where.path)
  if where.format == "checkpoint":
    return _checkpoint_meta(where.path)["config"]
  return hf.read_config(where.path)


def load_tokenizer(spec: str | Path) -> Tokenizer:
  """Only the tokenizer of a model spec (no weights read), or a ``tokenizer.json`` file."""
  path = Path(str(spec))
  if path.is_file() and path.suffix == ".json":
    return from_json(path)
  where = locate(spec)
  if where.format == "gguf":
    tokenizer = from_gguf_reader(_gguf_reader(where.path), where.path)
  elif where.format == "checkpoint":
    tokenizer = from_checkpoint_meta(where.path, _checkpoint_meta(where.path))
  else:
    tokenizer = from_hf_directory(where.path)
  if tokenizer is None:
    raise ValueError(f"{where.path}: holds no tokenizer")
  return tokenizer


def load(spec: str | Path, dtype=jnp.float32, param_dtype=None, device_mesh=None) -> LoadedModel:
  """``path[@quantization]``: a ``.gguf`` file, a Hugging Face directory or a tailjax checkpoint.

  With ``@int4`` (see ``QuantSpec.parse``) every transformer-block linear weight is rounded
  to nearest, so the candidate runs the same code on quantized numbers. ``dtype`` is a JAX
  dtype or a name from ``DTYPES``, or ``"auto"`` (``resolve_dtype``). On a ``device_mesh``
  (``tailjax.mesh``) every parameter is created in its final sharding, each device reading
  only its own part of the file; without one, on the first local device.
  """
  where = locate(spec)
  quantization = QuantSpec.parse(where.quantization) if where.quantization else None
  if isinstance(dtype, str):
    dtype = DTYPES[resolve_dtype(where.path, dtype)]
  loader = {"gguf": from_gguf, "checkpoint": from_checkpoint, "hf": from_hf}[where.format]
  loaded = loader(where.path, dtype, param_dtype, device_mesh)
  if quantization is not None:
    quantize_model(loaded.model, quantization)
    loaded.quantization = quantization
  return loaded
