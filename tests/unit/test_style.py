"""House rules a linter does not check: no private name of one tailjax module is used by another module (ruff's
PLC2701 exempts first-party imports), benchmarks and tests included."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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


def test_test_modules_import_helpers_not_each_other():
  """Shared builders and checks live in tests/helpers.py; a test module imported by another runs its tests twice
  and ties the two together."""
  found = []
  for path in sorted((ROOT / "tests").rglob("test_*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_"):
        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module}")
  assert not found, "\n".join(found)


def test_the_rule_sees_a_private_use(tmp_path):
  sample = tmp_path / "sample.py"
  sample.write_text("from tailjax import evaluate\nfrom tailjax.report import _fmt\nevaluate._badness\n")
  assert [use.split(": ", 1)[1] for use in private_uses(sample)] == ["from tailjax.report import _fmt",
                                                                      "evaluate._badness"]


# The orchestration's shape (eval, distill and the data and report stages they drive): short functions with few
# parameters, a typed config down each chain instead of long keyword lists. Numeric kernels (head/, models/) and
# the click commands (one parameter per flag) are outside the rule. `python tests/test_style.py` lists every
# function of the package over either limit, and every import cycle.
SHAPED = ("tailjax/eval", "tailjax/distill", "tailjax/data", "tailjax/report", "tailjax/selection.py")
MAX_LINES, MAX_PARAMETERS = 80, 8


def oversized(paths) -> list[str]:
  """``file:line name: N lines, M parameters`` for each function of ``paths`` over ``MAX_LINES`` lines or
  ``MAX_PARAMETERS`` parameters (``self`` and ``cls`` not counted)."""
  found = []
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        a = node.args
        names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg) if x is not None]
        parameters = len([n for n in names if n not in ("self", "cls")])
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_LINES or parameters > MAX_PARAMETERS:
          found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines, {parameters} parameters")
  return found


def module_imports(root: Path) -> dict[str, set[str]]:
  """Each tailjax module's name -> the tailjax modules it imports at module level (``from tailjax.a import b``
  reaches ``tailjax.a.b`` when that is a module, else ``tailjax.a``)."""
  modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / "tailjax").rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.parse(path.read_text(), str(path)).body:
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tailjax"):
        edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                  for a in node.names}
      elif isinstance(node, ast.Import):
        edges |= {a.name for a in node.names if a.name in modules}
    graph[name] = edges & set(modules) - {name}
  return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected groups of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        groups.append(sorted(group))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return groups


def shaped_files() -> list[Path]:
  return [p for s in SHAPED for p in ([ROOT / s] if s.endswith(".py") else sorted((ROOT / s).rglob("*.py")))]


def test_the_orchestration_has_short_functions_and_no_import_cycle():
  files = shaped_files()
  assert len(files) > 25
  assert not oversized(files), "\n".join(oversized(files))
  assert not import_cycles(module_imports(ROOT)), import_cycles(module_imports(ROOT))


def test_the_shape_rules_see_what_they_forbid(tmp_path):
  (tmp_path / "tailjax" / "p").mkdir(parents=True)
  long = "def f(a, b, c, d, e, f, g, h, i):\n" + "  x = 1\n" * 80
  (tmp_path / "tailjax" / "p" / "a.py").write_text("from tailjax.p import b\n" + long)
  (tmp_path / "tailjax" / "p" / "b.py").write_text("from tailjax.p.a import f\n")
  (tmp_path / "tailjax" / "p" / "__init__.py").write_text("")
  global ROOT
  root, ROOT = ROOT, tmp_path
  try:
    assert oversized([tmp_path / "tailjax" / "p" / "a.py"]) == ["tailjax/p/a.py:2 f: 81 lines, 9 parameters"]
  finally:
    ROOT = root
  assert import_cycles(module_imports(tmp_path)) == [["tailjax.p.a", "tailjax.p.b"]]


if __name__ == "__main__":
  for line in oversized(sorted((ROOT / "tailjax").rglob("*.py"))):
    print(line)
  for group in import_cycles(module_imports(ROOT)):
    print("import cycle:", " -> ".join(group))
