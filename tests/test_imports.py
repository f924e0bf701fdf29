"""The import graph of `pspc_jax/` has no cycle, and the denoiser layer imports nothing above it."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pspc_jax")


def _module_name(path):
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path, modules):
  """The pspc_jax modules `path` imports anywhere in its body (deferred imports included)."""
  found = set()
  for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from pspc_jax import images` names a module; `from pspc_jax.x import f` names x.
      names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
    else:
      continue
    found.update(name for name in names if name in modules)
  return found


def _graph():
  paths = [os.path.join(folder, name) for folder, _, names in os.walk(PACKAGE)
           for name in names if name.endswith(".py")]
  modules = {_module_name(p): p for p in paths}
  return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _cycle(graph):
  """One import cycle as a list of modules, or None. Package __init__ files are left out: importing
  `pspc_jax` itself (the curated API) from a submodule would show as a cycle through every module."""
  graph = {m: {d for d in deps if graph.get(d) is not None and not d.endswith(("pspc_jax",))}
           for m, deps in graph.items() if m != "pspc_jax"}
  state, stack = {}, []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for dep in sorted(graph.get(module, ())):
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    stack.pop()
    state[module] = "done"
    return None

  for module in sorted(graph):
    if module not in state:
      found = visit(module)
      if found:
        return found
  return None


def test_import_graph_has_no_cycle():
  cycle = _cycle(_graph())
  assert cycle is None, " -> ".join(cycle)


def test_the_denoiser_layer_imports_nothing_above_it():
  # The denoisers may use the array conventions, validation, schedules and the streaming softmin;
  # never the jobs, files, the command line, sharding or sampling.
  above = ("pspc_jax.jobs", "pspc_jax.cli", "pspc_jax.files", "pspc_jax.maps_files",
           "pspc_jax.distributed", "pspc_jax.denoiser_options", "pspc_jax.checkpoints",
           "pspc_jax.evaluation", "pspc_jax.tuning", "pspc_jax.sensitivity", "pspc_jax.plots")
  for module, deps in _graph().items():
    if module.startswith("pspc_jax.denoisers"):
      bad = sorted(d for d in deps if d.startswith(above))
      assert not bad, f"{module} imports {bad}"
