"""Real checkpoints as Flax NNX decoders: ``load(spec)`` -> ``LoadedModel``."""

from tailjax.models.config import PRESETS, ModelConfig, RopeScaling
from tailjax.models.load import (LoadedModel, Tokenizer, from_checkpoint, from_gguf, from_hf, load,
                                 load_tokenizer, save_checkpoint)
from tailjax.models.quantize import QuantSpec, fake_quantize, quantize_model
from tailjax.models.transformer import Decoder

__all__ = [
    "PRESETS", "Decoder", "LoadedModel", "ModelConfig", "QuantSpec", "RopeScaling", "Tokenizer", "fake_quantize",
    "from_checkpoint", "from_gguf", "from_hf", "load", "load_tokenizer", "quantize_model", "save_checkpoint",
]
