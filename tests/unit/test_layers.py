"""The architecture, enforced: who may import what (see docs/architecture.md).

An AST scan of src/ rather than an import-linter dependency: the rules are few.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "rustic_ai" / "k8s"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    package = ".".join(path.relative_to(PKG.parent.parent).with_suffix("").parts[:-1])
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
    return names


def modules(layer: str) -> list[Path]:
    return sorted(p for p in (PKG / layer).rglob("*.py") if "_pb2" not in p.name)


def offenders(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in modules(layer):
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(PKG)} imports {name}")
    return bad


LAYERS = ["base", "registry", "protocol", "process", "placement", "host", "engine", "cli", "demo"]


@pytest.mark.parametrize(
    "layer, forbidden",
    [
        ("base", ("grpc", "grpc_health", "redis", "subprocess", "rustic_ai.k8s.registry", "rustic_ai.k8s.protocol",
                  "rustic_ai.k8s.process", "rustic_ai.k8s.host", "rustic_ai.k8s.engine")),
        ("registry", ("grpc", "subprocess", "rustic_ai.k8s.protocol", "rustic_ai.k8s.host", "rustic_ai.k8s.engine")),
        ("protocol", ("redis", "subprocess", "rustic_ai.k8s.registry", "rustic_ai.k8s.host", "rustic_ai.k8s.engine")),
        ("process", ("grpc", "redis", "rustic_ai.k8s.registry", "rustic_ai.k8s.protocol", "rustic_ai.k8s.host",
                     "rustic_ai.k8s.engine")),
        ("placement", ("grpc", "redis", "subprocess", "rustic_ai.k8s.host", "rustic_ai.k8s.engine")),
        ("host", ("grpc", "redis", "subprocess", "rustic_ai.k8s.engine")),
        ("engine", ("grpc", "redis", "subprocess", "rustic_ai.k8s.host", "rustic_ai.k8s.process")),
    ],
)
def test_layer_imports(layer, forbidden):
    assert offenders(layer, forbidden) == []


def test_every_package_is_in_a_layer():
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages <= set(LAYERS), packages - set(LAYERS)


def test_no_pickle_anywhere():
    for path in PKG.rglob("*.py"):
        assert not {"pickle", "cPickle", "cloudpickle", "dill"} & imports_of(path), path
