"""The package's layering, read from its imports: core is pure torch, checkpoints load without the compressor,
and no module imports another inside a function to hide a cycle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hf_fibration"
# what the load path may reach: a saved checkpoint loads without the sites, methods, loop or policies
LOAD_PATH = ("integrations/quantizer.py", "integrations/shapes.py", "integrations/checkpoint_io.py",
             "integrations/loading.py", "integrations/run_record.py", "models/surgery.py", "models/architectures.py")
COMPRESSOR = ("hf_fibration.models.sites", "hf_fibration.methods", "hf_fibration.pipeline", "hf_fibration.policies",
              "hf_fibration.repair", "hf_fibration.training", "hf_fibration.api")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, inside a function) for every import of the file that runs (not those for type checkers only)."""
    tree = ast.parse(path.read_text())
    nested = {id(sub) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              for sub in ast.walk(node)}
    typing_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", None) == "TYPE_CHECKING" for sub in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            out.append(("." * node.level + (node.module or ""), id(node) in nested))
        elif isinstance(node, ast.Import):
            out.extend((alias.name, id(node) in nested) for alias in node.names)
    return out


def test_core_imports_nothing_of_transformers_or_the_rest_of_the_package():
    for path in (PACKAGE / "core").glob("*.py"):
        for module, _ in _imports(path):
            assert not module.startswith(("transformers", "hf_fibration")), f"{path.name} imports {module}"


def test_the_load_path_does_not_reach_the_compressor():
    for name in LOAD_PATH:
        for module, _ in _imports(PACKAGE / name):
            assert not module.startswith(COMPRESSOR), f"{name} imports {module}"


def test_no_package_module_is_imported_inside_a_function():
    for path in PACKAGE.rglob("*.py"):
        for module, nested in _imports(path):
            assert not (nested and (module.startswith("hf_fibration") or module.startswith("."))), \
                f"{path.relative_to(PACKAGE)} imports {module} inside a function"


def test_top_level_imports_form_no_cycle():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = "hf_fibration." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        name = name.removesuffix(".__init__")
        graph[name] = {m for m, nested in _imports(path) if m.startswith("hf_fibration.") and not nested}
    graph = {k: {m if m in graph else m.rpartition(".")[0] for m in v} & set(graph) for k, v in graph.items()}
    done, stack = set(), []

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in stack, "import cycle: " + " → ".join(stack[stack.index(node):] + [node])
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        if node != "hf_fibration":
            visit(node)
