"""Model specs as users write them, ``[LABEL=]PATH[@QUANT]``, parsed in one place.

``PATH`` is a ``.gguf`` file, a Hugging Face directory or a tailjax checkpoint (``tailjax.models.load.locate``
tells which); ``@QUANT`` (``QuantSpec.parse``: ``int4``, ``int3-g64-asym``, ...) rounds it when loaded; an empty
``PATH`` (``@int4``) is an evaluation's reference, rounded. ``LABEL=`` names the model in reports; an ``=``
after a ``/`` belongs to the path, and the last ``@`` starts the quantization.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class ModelSpec(NamedTuple):
  path: str  # "": the reference of an evaluation
  quantization: str = ""  # "": as stored
  label: str | None = None

  @classmethod
  def parse(cls, text: str | Path, labelled: bool = True) -> ModelSpec:
    """``text`` -> its parts; ``labelled=False`` reads a ``LABEL=`` prefix as part of the path."""
    text = str(text)
    label, sep, rest = text.partition("=")
    if not (labelled and sep and "/" not in label):
      label, rest = None, text
    path, _, quantization = rest.rpartition("@") if "@" in rest else (rest, "", "")
    return cls(path, quantization, label)

  @property
  def of_reference(self) -> bool:
    """``@QUANT`` alone: the reference of an evaluation, rounded."""
    return not self.path

  @property
  def unlabelled(self) -> str:
    """The spec without its label, as ``tailjax.models.load`` takes it."""
    return self.path + (f"@{self.quantization}" if self.quantization else "")
