"""The house: what `ls llama_jax` shows, each room's docstring, and an import graph without cycles."""

import ast
import pathlib
import re

import llama_jax

PACKAGE = pathlib.Path(llama_jax.__file__).parent
ROOT = PACKAGE.parent
# Entry points compose the rooms (a command line may use any of them), so they are left out of the
# graph: `__main__` modules and the command-line bodies.
ENTRY_POINTS = {"__main__.py", "cli.py"}


def _node(module: str) -> str | None:
  """The room a dotted module name belongs to: its subpackage, or its top-level module."""
  parts = module.split(".")
  if parts[0] != "llama_jax":
    return None
  return parts[1] if len(parts) > 1 else "api"  # `import llama_jax` is for llama_jax.load


def _edges() -> dict[str, set[str]]:
  graph: dict[str, set[str]] = {}
  for path in PACKAGE.rglob("*.py"):
    if path.name in ENTRY_POINTS:
      continue
    rel = path.relative_to(PACKAGE)
    here = rel.parts[0].removesuffix(".py")
    if here == "__init__":
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from llama_jax import x` imports the room x, not the package's __init__
        names = ([f"llama_jax.{a.name}" for a in node.names] if node.module == "llama_jax"
                 else [node.module])
      for name in names:
        target = _node(name)
        if target and target != here and target != "__init__":
          graph.setdefault(here, set()).add(target)
  return graph


def _cycles(graph):
  """Strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in list(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles_between_rooms():
  graph = _edges()
  assert graph, "no imports found"
  assert _cycles(graph) == []


def test_no_import_cycles_inside_a_room():
  # Within a subpackage, module -> module, the same rule.
  for package in [p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]:
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
      if path.name in ENTRY_POINTS or path.name == "__init__.py":
        continue
      here = path.stem
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
          parts = node.module.split(".")
          if parts[:2] == ["llama_jax", package.name]:
            targets = [parts[2]] if len(parts) > 2 else [a.name for a in node.names]
            for t in targets:
              if (package / f"{t}.py").exists() and t != here:
                graph.setdefault(here, set()).add(t)
    assert _cycles(graph) == [], package.name


def test_every_room_says_what_it_holds():
  for package in [p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()]:
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text()))
    assert doc and len(doc) > 40, f"{package.name}/__init__.py has no docstring"
  for path in PACKAGE.rglob("*.py"):
    if path.name != "__init__.py" and path.stat().st_size > 200:
      assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no docstring"


def test_readme_layout_table_matches_ls():
  readme = (ROOT / "README.md").read_text()
  table = readme[readme.index("## Layout"):readme.index("## The model")]
  listed = set(re.findall(r"^\| `([a-z_]+(?:\.py|/))`", table, re.M))
  listed = {n for n in listed if not (ROOT / n.rstrip("/")).exists()}  # the repository's own rows
  present = {p.name + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
             if not p.name.startswith(("_", ".")) and (p.suffix == ".py" or (p / "__init__.py").exists())}
  assert listed == present
