"""House rules a linter does not check: no private name of one tailjax module is used by another module (ruff's
PLC2701 exempts first-party imports), benchmarks and tests included."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def private_uses(path: Path) -> list[str]:
  """``from tailjax.x import _y`` and ``x._y`` where ``x`` names a tailjax module, in one file."""
  tree = ast.parse(path.read_text(), str(path))
  where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
  modules, found = set(), []
  private = lambda name: name.startswith("_") and not name.startswith("__")
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tailjax"):
      for alias in node.names:
        if private(alias.name):
          found.append(f"{where}:{node.lineno}: from {node.module} import {alias.name}")
        elif node.module == "tailjax" or node.module.startswith("tailjax."):
          modules.add(alias.asname or alias.name)  # a module or a public name: attributes checked below
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("tailjax"):
          modules.add(alias.asname or alias.name.split(".")[0])
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name) and \
        node.value.id in modules:
      found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
  return found


def test_no_private_names_across_modules():
  files = [p for folder in ("tailjax", "tests", "benchmarks") for p in sorted((ROOT / folder).rglob("*.py"))]
  assert len(files) > 50
  found = [use for path in files for use in private_uses(path)]
  assert not found, "\n".join(found)


def test_the_rule_sees_a_private_use(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text("from tailjax import evaluate\nfrom tailjax.report import _fmt\nevaluate._badness\n")
  assert [use.split(": ", 1)[1] for use in private_uses(sample)] == ["from tailjax.report import _fmt",
                                                                      "evaluate._badness"]
