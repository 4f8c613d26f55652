"""Run configurations as dataclasses filled from YAML files and flags (``DistillConfig``, ``EvalConfig``).

``from_file(cls, path, **overrides)`` reads a YAML (or JSON) mapping of fields, names any field the class does
not have, then applies the non-None ``overrides`` (the CLI's flags); ``type_problems`` names each field whose
value is not of its annotated type, so a YAML ``steps: three`` is reported as such, not met later as a
comparison between a string and a number.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, TypeVar

Config = TypeVar("Config")

_KINDS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,),
          "list": (list, tuple), "tuple": (list, tuple), "None": (type(None),)}
_WANTED = {"str": "text", "int": "a whole number", "float": "a number", "bool": "true or false",
           "dict": "a mapping", "list": "a list", "tuple": "a list", "None": "null"}


def from_file(cls: type[Config], path: str | Path | None = None, **overrides) -> Config:
  """``cls`` from a YAML (or JSON) file of fields, then ``overrides`` (None values are ignored)."""
  import yaml

  values: dict[str, Any] = {}
  if path is not None:
    path = Path(path)
    try:
      values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
      raise ValueError(f"{path}: unreadable config ({err})") from err
    if not isinstance(values, dict):
      raise ValueError(f"{path}: a config is a mapping of fields")
    refuse_unknown(cls, values, str(path), "config fields")
  values.update({k: v for k, v in overrides.items() if v is not None})
  return cls(**values)


def refuse_unknown(cls: type, fields: dict[str, Any], where: str, what: str = "fields") -> None:
  """Refuses ``fields`` the dataclass ``cls`` does not have, naming them and the ones it has."""
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = set(fields) - set(names)
  if unknown:
    raise ValueError(f"{where}: unknown {what} {sorted(unknown)} (fields: {', '.join(names)})")


def items(value: Any) -> Any:
  """A field that holds a list: a string is one item (``targets: gate`` is ``("gate",)``, never its letters), a
  list or tuple a tuple; anything else is left for ``type_problems`` to name."""
  if isinstance(value, str):
    return (value,)
  return tuple(value) if isinstance(value, (list, tuple)) else value


def type_problems(config) -> list[str]:
  """``field=value must be ...`` for each field of the dataclass ``config`` whose value is not of its annotated
  type (``int | None``, ``str | dict``, ``list``: a list or tuple; a class by its name), and for each number that is not finite (a
  YAML ``.inf`` or ``.nan`` trains NaN or never stops)."""
  problems = []
  for field in dataclasses.fields(config):
    value, names = getattr(config, field.name), [n.strip() for n in str(field.type).split("|")]
    names = [n.split("[")[0] for n in names]  # list[str] -> list
    allowed = tuple(t for n in names for t in _KINDS.get(n, ()))
    a_class = any(type(value).__name__ == n.rsplit(".", 1)[-1] for n in names if n not in _KINDS)  # data.Protocol
    if not (a_class or isinstance(value, allowed)) or (isinstance(value, bool) and "bool" not in names):
      problems.append(f"{field.name}={value!r} must be {' or '.join(_WANTED.get(n, n) for n in names)}")
    elif isinstance(value, float) and not math.isfinite(value):
      problems.append(f"{field.name}={value!r} must be a finite number")
  return problems


def check_types(config, what: str) -> None:
  """Raises ``ValueError("{what}: ...")`` naming every ``type_problems`` of ``config``."""
  problems = type_problems(config)
  if problems:
    raise ValueError(f"{what}: " + "; ".join(problems))
