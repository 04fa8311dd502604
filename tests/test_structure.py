"""The tree's structure holds: layers import only downward, the schema loads no
implementation, the registry and the schema agree, and no file or function sprawls."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

from rlft_ray.config import ALGORITHMS, RunConfig
from rlft_ray.learners.base import Learner
from rlft_ray.learners.registry import algorithm_names, get_learner_cls, rollout_module

PACKAGE = Path(__file__).resolve().parents[1] / "rlft_ray"

#: The packages of ``rlft_ray`` (and its top-level modules) by layer: a package imports
#: only packages of lower layers, at module level or inside functions.
LAYERS: dict[str, int] = {
    "rlft_ray": 0,  # __init__: the version only
    "rlft_ray.core": 0,
    "rlft_ray.config": 1,
    "rlft_ray.types": 1,
    "rlft_ray.algorithms": 1,
    "rlft_ray.rewards": 2,
    "rlft_ray.agents": 2,  # text-env protocol and tools (no torch)
    "rlft_ray.lm": 2,
    "rlft_ray.rollout": 3,
    "rlft_ray.learners": 4,
    "rlft_ray.run": 5,
    "rlft_ray.apps": 6,
    "rlft_ray.tune": 6,
    "rlft_ray.cli": 7,
    "rlft_ray.__main__": 8,
}


def _unit(module: str) -> str:
    """The package (or top-level module) ``module`` belongs to: ``rlft_ray.X``."""
    return ".".join(module.split(".")[:2])


def _layer(module: str) -> int:
    return LAYERS[_unit(module)]


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out.append((name, path))
    return out


def _imports(path: Path) -> set[str]:
    """Every ``rlft_ray`` module ``path`` imports, at module level or inside functions
    (``from rlft_ray.pkg import mod`` counts as importing ``rlft_ray.pkg.mod``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rlft_ray"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlft_ray"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if _is_module(m)}


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel.with_suffix(".py")).is_file() or (
        PACKAGE.parent / rel / "__init__.py"
    ).is_file()


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {unit: set() for unit in LAYERS}
    for name, path in _modules():
        for dep in _imports(path):
            if _unit(dep) != _unit(name):
                graph[_unit(name)].add(_unit(dep))
    return graph


def test_every_package_has_a_layer() -> None:
    units = {_unit(name) for name, _ in _modules()}
    assert units == set(LAYERS), units ^ set(LAYERS)
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    # the package root holds the entry points, nothing else
    assert top == ["__init__.py", "__main__.py", "cli.py"], top


def test_layers_import_only_downward() -> None:
    upward = [
        f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
        for name, path in _modules()
        for dep in sorted(_imports(path))
        if _unit(dep) != _unit(name) and _layer(dep) >= _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycle_between_packages() -> None:
    """Lazy (function-level) imports count: a cycle through one still ties two packages."""
    graph = _package_graph()
    state: dict[str, int] = {}

    def visit(unit: str, stack: list[str]) -> list[str] | None:
        state[unit] = 1
        for dep in sorted(graph[unit]):
            if state.get(dep) == 1:
                return [*stack, unit, dep]
            if dep not in state and (cycle := visit(dep, [*stack, unit])):
                return cycle
        state[unit] = 2
        return None

    for unit in sorted(graph):
        if unit not in state:
            cycle = visit(unit, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle(monkeypatch) -> None:
    """The check above can fail: a lazy import from lm into rollout is reported."""
    real = _package_graph()
    monkeypatch.setitem(
        globals(), "_package_graph", lambda: {**real, "rlft_ray.lm": {"rlft_ray.rollout"}}
    )
    try:
        test_no_import_cycle_between_packages()
    except AssertionError as e:
        assert "rlft_ray.lm -> rlft_ray.rollout" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")


def test_schema_imports_no_implementation() -> None:
    for name, path in _modules():
        if name.startswith("rlft_ray.config"):
            deps = {d for d in _imports(path) if not d.startswith("rlft_ray.config")}
            assert deps <= {"rlft_ray.core", "rlft_ray.core.fileio"}, f"{name} imports {deps}"


def test_importing_the_schema_loads_no_torch_gym_ray_or_learner() -> None:
    code = (
        "import sys, rlft_ray.config as c\n"
        "c.build_config(overrides=['algo=grpo', 'grpo.optim.lr=3e-4'])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'gymnasium', 'ray')"
        " or m.startswith(('rlft_ray.learners', 'rlft_ray.learners.registry')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_registry_and_schema_name_the_same_algorithms() -> None:
    assert sorted(ALGORITHMS) == algorithm_names()
    assert typing.get_args(typing.get_type_hints(RunConfig)["algo"]) == ALGORITHMS
    for name in ALGORITHMS:  # each algorithm's hyperparameters live in the section of its name
        assert name in RunConfig.__dataclass_fields__, name
        assert issubclass(get_learner_cls(name), Learner), name
        for eval_every in (None, 5):  # the module Ray's first workers import ahead of time
            cfg = RunConfig(algo=name, eval_every=eval_every)
            sampler = get_learner_cls(name).sampler(cfg)
            assert rollout_module(cfg) == (sampler.__module__ if sampler else None), name


def test_a_gym_learner_does_not_import_the_lm_stack() -> None:
    """The registry imports only the learner asked for: CartPole start-up skips transformers."""
    code = (
        "import sys\n"
        "from rlft_ray.learners.registry import get_learner_cls\n"
        "get_learner_cls('ppo'); get_learner_cls('dqn')\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'peft'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_no_file_over_500_lines_no_function_over_80() -> None:
    too_long = []
    for name, path in _modules():
        text = path.read_text()
        if len(text.splitlines()) > 500:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if (name, node.name) == ("rlft_ray.cli", "_parser"):  # the CLI's argument table
                continue
            length = node.end_lineno - node.lineno + 1
            if length > 80:
                too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


def test_the_readme_algorithm_table_is_the_spec_table() -> None:
    from rlft_ray.config.algorithms import SPECS, markdown_table

    readme = (PACKAGE.parent / "README.md").read_text()
    start, end = "<!-- algorithms:start -->\n", "<!-- algorithms:end -->"
    table = readme[readme.index(start) + len(start) : readme.index(end)]
    assert table == markdown_table()
    assert len(table.splitlines()) == 2 + len(SPECS)
