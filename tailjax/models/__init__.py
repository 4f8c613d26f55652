"""Real checkpoints as Flax NNX decoders: ``load(spec)`` -> ``LoadedModel``."""

from tailjax.models.config import PRESETS, ModelConfig, RopeScaling
from tailjax.models.load import (DTYPES, LoadedModel, from_checkpoint, from_gguf, from_hf, load,
                                 load_config, load_tokenizer, native_dtype, resolve_dtype, save_checkpoint,
                                 storage)
from tailjax.models.quantize import QuantSpec, fake_quantize, quantize_model
from tailjax.models.spec import ModelSpec
from tailjax.models.tokenizer import Tokenizer
from tailjax.models.transformer import Decoder

__all__ = [
    "DTYPES", "PRESETS", "Decoder", "LoadedModel", "ModelConfig", "ModelSpec", "QuantSpec", "RopeScaling", "Tokenizer",
    "fake_quantize", "from_checkpoint", "from_gguf", "from_hf", "load", "load_config", "load_tokenizer",
    "native_dtype", "quantize_model", "resolve_dtype", "save_checkpoint", "storage",
]
