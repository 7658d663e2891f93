"""The package's import graph: no module imports one that imports it back, at the top or inside a function."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2_jax"


def imports_of(path: Path) -> set[str]:
    """The gpt2_jax modules that `path` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt2_jax"):
            if node.module == "gpt2_jax":  # from gpt2_jax import data, sharding
                out.update(f"gpt2_jax.{a.name}" for a in node.names)
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("gpt2_jax."))
    return out


def graph() -> dict[str, set[str]]:
    modules = {f"gpt2_jax.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & set(modules) for name, path in modules.items()}


def test_no_import_cycles():
    g = graph()
    assert len(g) > 15 and g["gpt2_jax.trainer"] >= {"gpt2_jax.train_step", "gpt2_jax.checkpoint"}
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


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from gpt2_jax.hf import x\n    import gpt2_jax.model\n")
    assert imports_of(tmp_path / "m.py") == {"gpt2_jax.hf", "gpt2_jax.model"}
