"""The package's import graph: no circle, nothing imports the training loop but its console
script, and sampling an export needs neither the training loop, the data stack nor accelerate."""
import ast
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tiny_run import REPO, TINY

PACKAGE = REPO / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules) -> set[str]:
    """pipeline.* modules `path` imports, at module level or inside functions (a lazy import is still
    a dependency: a circle through one is still a circle); relative imports resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - (node.level - 1)])
                module = f"{base}.{module}" if module else base
            if not module.startswith("pipeline"):
                continue
            subs = {f"{module}.{a.name}" for a in node.names} & set(modules)
            # `from pkg import submodule` needs the submodule; `from pkg import name`, the package
            out |= subs if len(subs) == len(node.names) else subs | {module}
    return out


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = {d for d in _imports(path, modules) if d in modules and d != name}
        # Importing pipeline.a.b imports the package pipeline.a first; a module's own parent
        # packages are already being imported when it runs, so they are no edge.
        parents = {".".join(d.split(".")[:i]) for d in deps for i in range(2, d.count(".") + 1)}
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = (deps | parents) - {name} - own
    return graph


def test_the_package_has_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_only_the_train_command_imports_the_training_loop():
    for name, deps in _graph().items():
        if any(d == "pipeline.train" or d.startswith("pipeline.train.") for d in deps):
            assert name.startswith("pipeline.train") or name == "pipeline.cli.train", name


def test_sampling_an_export_imports_no_training_loop_data_or_accelerate(tmp_path):
    from pipeline.config import load_config, to_yaml
    from pipeline.factory import build_model

    cfg = load_config(REPO / "configs/demo.yaml", [f"run_dir={tmp_path}", *TINY])
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.yaml").write_text(to_yaml(cfg))
    torch.manual_seed(0)
    save_file(build_model(cfg).state_dict(), export / "ema.safetensors")
    code = ("import sys; from pipeline.cli.sample import main; "
            f"rc = main([{str(export)!r}, '--num', '2', '--steps', '2', '--out', {str(tmp_path / 'g.png')!r}]); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'accelerate' or m == 'deepspeed' "
            "or m.startswith(('pipeline.train', 'pipeline.data'))); "
            "print('IMPORTED', bad); sys.exit(rc or (3 if bad else 0))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    assert (tmp_path / "g.png").is_file()
