"""The package's import graph: every module imports in a fresh interpreter, and the subpackage graph
(every import, function-local ones included, read from the AST) is acyclic and follows the layer
order config <- models <- data (and convert) <- checks <- train <- infer <- eval."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "sgt_jax")
# Layer of each top-level part of sgt_jax: a module may import its own part or a lower layer only.
LAYERS = {"config": 0, "models": 1, "data": 2, "convert": 2, "checks": 3, "train": 4, "infer": 5, "eval": 6,
          "cli": 7}


def _modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sgt_jax" else None


def _imports(path: str, module: str) -> set[str]:
    """Every sgt_jax module named by an import statement anywhere in the file (AST, all scopes)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from sgt_jax import config`
    return {m for m in out if m == "sgt_jax" or m.startswith("sgt_jax.")}


def _part_graph() -> dict[str, set[tuple[str, str]]]:
    """part -> {(importing module, imported part)} over every edge between different parts."""
    mods = _modules()
    graph: dict[str, set[tuple[str, str]]] = {}
    for mod, path in mods.items():
        src = _part(mod)
        for imported in _imports(path, mod):
            dst = _part(imported)
            if src and dst and src != dst and dst in LAYERS:
                graph.setdefault(src, set()).add((mod, dst))
    return graph


def test_every_part_has_a_layer():
    parts = {_part(m) for m in _modules()} - {None, "__init__"}
    assert parts <= set(LAYERS), f"parts without a layer: {sorted(parts - set(LAYERS))}"


def test_imports_follow_the_layer_order():
    bad = sorted(f"{mod} imports sgt_jax.{dst} (layer {LAYERS[dst]} >= {LAYERS[src]} of {src})"
                 for src, edges in _part_graph().items() for mod, dst in edges if LAYERS[dst] >= LAYERS[src])
    assert not bad, "\n".join(bad)


def test_part_graph_is_acyclic():
    edges = {src: {dst for _, dst in e} for src, e in _part_graph().items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_config_is_a_leaf():
    mods = _modules()
    assert _imports(mods["sgt_jax.config"], "sgt_jax.config") == set()


def test_every_module_imports_in_a_fresh_interpreter_and_core_modules_stay_free_of_tf_and_torch():
    names = sorted(_modules())
    core = ["sgt_jax.models.umm", "sgt_jax.train.step", "sgt_jax.infer.sampler", "sgt_jax.train.loop"]
    code = "\n".join([
        "import importlib, sys",
        f"for name in {core!r}: importlib.import_module(name)",
        "heavy = sorted(m for m in ('tensorflow', 'torch') if m in sys.modules)",
        "assert not heavy, f'core modules imported {heavy}'",
        f"for name in {names!r}: importlib.import_module(name)",
        "print('imported', len(" + repr(names) + "))",
    ])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"imported {len(names)}" in out.stdout
