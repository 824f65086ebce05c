"""The package's import structure, read from the source (no module is run): each layer imports
only layers below it, sibling packages of one layer stay apart, nothing imports the command
lines, no library module imports the experiment configs, and no import circle."""

import ast
import os
import textwrap

import pytest

# Lowest first: a module may import its own package and any package of a lower layer; not a
# sibling package of its own layer, nor anything higher. The last layer is the command lines'
# public aliases (mixtral_jax.main, .train, .build, .sample).
LAYERS = (
    ("errors",),
    ("config",),
    ("runtime",),
    ("parallel",),
    ("data", "model"),
    ("training",),
    ("sweep", "tools"),
    ("cli",),
    ("main", "train", "build", "sample"),
)
PACKAGE = "mixtral_jax"


def modules(root: str) -> dict[str, str]:
  """Dotted module name → file, for every .py file of the package under `root`."""
  found = {}
  for directory, _, names in os.walk(os.path.join(root, PACKAGE)):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def imports(path: str, known: dict[str, str]) -> set[str]:
  """The modules of the package (and `configs`) that the file at `path` imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # `from a.b import c` imports module a.b.c if there is one, else a name of a.b.
      names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known
               else node.module for alias in node.names]
    else:
      continue
    found.update(n for n in names if n.split(".")[0] in (PACKAGE, "configs"))
  return found


def layer_of(module: str) -> tuple[int, str]:
  """(layer index, package or top-level module) of a module of the package."""
  part = module.split(".")[1] if "." in module else ""
  for index, layer in enumerate(LAYERS):
    if part in layer:
      return index, part
  raise AssertionError(f"{module} is in no layer of LAYERS: place its package there")


def violations(root: str) -> list[str]:
  """Every import that breaks the layering, and every import circle, as lines."""
  known = modules(root)
  graph = {module: imports(path, known) for module, path in known.items()}
  found = []
  for module, imported in sorted(graph.items()):
    if module == PACKAGE:
      continue
    index, part = layer_of(module)
    for target in sorted(imported):
      if target.split(".")[0] == "configs":
        found.append(f"{module} imports {target}: the library may not read experiment configs")
        continue
      if target == PACKAGE:
        continue
      target_index, target_part = layer_of(target)
      if target_part != part and target_index >= index:
        found.append(f"{module} imports {target}: layer {LAYERS[index]} may only import "
                     f"layers below it")
  found += [f"import circle: {' → '.join(circle)}" for circle in circles(graph)]
  return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The import circles of `graph`, each once (depth-first search)."""
  found, state = [], {}

  def visit(module: str, path: list[str]) -> None:
    state[module] = "open"
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        found.append(path[path.index(target):] + [target])
      elif target in graph and target not in state:
        visit(target, path + [target])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  return found


def test_the_package_keeps_its_layers_and_has_no_import_circle(repo):
  assert violations(repo) == []


def test_every_module_is_in_a_layer(repo):
  for module in modules(repo):
    if module != PACKAGE:
      layer_of(module)


def _plant(tmp_path, files: dict[str, str]) -> str:
  for name, text in files.items():
    path = tmp_path / PACKAGE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  return str(tmp_path)


@pytest.mark.parametrize("files, expected", [
    ({"model/moe.py": "from mixtral_jax.data import pipeline\n", "data/pipeline.py": ""},
     "mixtral_jax.model.moe imports mixtral_jax.data.pipeline: layer ('data', 'model')"),
    ({"training/loop.py": "def f():\n  from mixtral_jax.cli import train\n",
      "cli/train.py": ""},
     "mixtral_jax.training.loop imports mixtral_jax.cli.train: layer ('training',)"),
    ({"config/checks.py": "import mixtral_jax.runtime.files\n", "runtime/files.py": ""},
     "mixtral_jax.config.checks imports mixtral_jax.runtime.files"),
    ({"tools/convert.py": "from configs import default\n"},
     "mixtral_jax.tools.convert imports configs: the library may not read"),
    ({"model/a.py": "from mixtral_jax.model import b\n",
      "model/b.py": "from mixtral_jax.model import a\n"},
     "import circle: mixtral_jax.model.a → mixtral_jax.model.b → mixtral_jax.model.a"),
])
def test_a_planted_bad_import_is_caught(tmp_path, files, expected):
  found = violations(_plant(tmp_path, files))
  assert any(line.startswith(expected) for line in found), found


def test_allowed_imports_pass(tmp_path):
  root = _plant(tmp_path, {"model/moe.py": "from mixtral_jax import config\nimport jax\n",
                           "config/__init__.py": "from mixtral_jax.errors import UserError\n",
                           "errors.py": "", "cli/train.py": "from mixtral_jax.model import moe\n"})
  assert violations(root) == []
