"""The package's import graph: packages form layers, each importing only from its own layer and those below,
and no module imports one that imports it back, at the top or inside a function."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2_jax"
# Bottom to top. The ground floor is the package's top-level modules (errors, runtime, sharding, text,
# tokenizer); serve/ is the HTTP server over sample/ and checkpoints/; aot/ compiles the run's programs, so it
# sits above everything.
LAYERS = ("ground", "model", "checkpoints", "data", "sample", "train", "serve", "aot")


def imports_of(path: Path) -> set[str]:
    """The gpt2_jax modules that `path` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt2_jax"):
            for a in node.names:  # from gpt2_jax.data import batches: the module gpt2_jax.data.batches
                out.add(f"{node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gpt2_jax."))
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, set[str]]:
    """module -> the modules it imports; an imported name that is not a module counts as its module."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    g = {}
    for name, path in modules.items():
        deps = set()
        for imp in imports_of(path):
            while imp not in modules:
                imp = imp.rpartition(".")[0]
            if imp != "gpt2_jax" and imp != name:
                deps.add(imp)
        g[name] = deps
    return g


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 2 and not (PACKAGE / parts[1]).is_dir():
        return "ground"
    return parts[1]


def test_every_module_is_in_a_layer():
    g = graph()
    assert {"gpt2_jax.train.loop", "gpt2_jax.model.gpt2", "gpt2_jax.errors", "gpt2_jax.aot.programs",
            "gpt2_jax.serve.app"} <= set(g)
    assert {layer(m) for m in g if m != "gpt2_jax"} == set(LAYERS)


def test_packages_import_only_their_layer_and_below():
    g = graph()
    upward = [f"{a} imports {b}" for a, deps in sorted(g.items()) if a != "gpt2_jax" for b in sorted(deps)
              if LAYERS.index(layer(b)) > LAYERS.index(layer(a))]
    assert not upward, "imports from a higher layer: " + "; ".join(upward)


def test_no_import_cycles():
    g = graph()
    assert g["gpt2_jax.train.loop"] >= {"gpt2_jax.train.step", "gpt2_jax.checkpoints.orbax"}
    state = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(g[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [])


def test_the_checks_see_imports_inside_functions_and_upward_imports(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from gpt2_jax.checkpoints.hf import x\n    import gpt2_jax.train.loop\n")
    assert imports_of(tmp_path / "m.py") == {"gpt2_jax.checkpoints.hf.x", "gpt2_jax.train.loop"}
    assert layer("gpt2_jax.errors") == "ground" and layer("gpt2_jax.data.rows") == "data"
    assert LAYERS.index(layer("gpt2_jax.train.loop")) > LAYERS.index(layer("gpt2_jax.model.gpt2"))
