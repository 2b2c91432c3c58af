"""The layers of ``../shared/DESIGN.md`` hold in the code: imports point downward only.

Read from the source (every ``import`` of a qsmnode module, also those inside functions), not
from what one run happens to import:

- the numerical core (``qsm``, ``m1``) imports no edge, service, pipeline or entry point;
- the DICOM edge (``dicom``) no service, pipeline or entry point;
- the pipeline (``qsmnode/pipeline.py``) no service and no entry point;
- the service (``node``) no entry point; the simulator is never imported by product code;
- ``qsmnode process`` (``commands/process.py``) reaches nothing of the node's sender, outbox,
  worker, jobs or store, even through other modules.

The entry points are ``cli.py``, ``__main__.py``, ``commands/``, ``demo/`` and ``bids/`` (the
BIDS App): they may use every layer.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qsmnode"

ENTRY_POINTS = frozenset({"cli", "__main__", "commands", "demo", "bids"})
FORBIDDEN = {
    "qsm": frozenset({"m1", "dicom", "pipeline", "node", "sim"}) | ENTRY_POINTS,
    "m1": frozenset({"dicom", "pipeline", "node", "sim"}) | ENTRY_POINTS,
    "dicom": frozenset({"pipeline", "node", "sim"}) | ENTRY_POINTS,
    "pipeline": frozenset({"node", "sim"}) | ENTRY_POINTS,
    "node": frozenset({"sim"}) | ENTRY_POINTS,
    "acquisition": frozenset({"qsm", "m1", "dicom", "pipeline", "node", "sim"}) | ENTRY_POINTS,
}
"""Per layer (the first name under ``qsmnode``), the layers it must not import."""

NOT_FROM_PROCESS = ("qsmnode.node.sender", "qsmnode.node.outbox", "qsmnode.node.worker",
                    "qsmnode.node.worker_child", "qsmnode.node.jobs", "qsmnode.node.store")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def import_graph() -> dict[str, frozenset[str]]:
    """Every qsmnode module and the qsmnode modules it imports (``from a import b`` counts as
    ``a.b`` when that is a module, else ``a``)."""
    sources = {module_name(p): p for p in PACKAGE.rglob("*.py")}

    def known(name: str) -> str:
        while name not in sources and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, frozenset[str]] = {}
    for name, path in sources.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = frozenset(known(f) for f in found
                                if f.startswith("qsmnode") and known(f) != name)
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_graph_sees_the_package() -> None:
    graph = import_graph()
    assert {"qsmnode.qsm.engine", "qsmnode.node.receiver", "qsmnode.pipeline",
            "qsmnode.commands.process"} <= set(graph)
    assert "qsmnode.qsm.engine" in graph["qsmnode.pipeline"]
    # an import inside a function counts (the process command imports the SCU lazily)
    assert "qsmnode.node.storescu" in graph["qsmnode.commands.process"]


@pytest.mark.parametrize("lower", sorted(FORBIDDEN))
def test_imports_point_downward_only(lower: str) -> None:
    upward = {module: sorted(d for d in deps if layer(d) in FORBIDDEN[lower])
              for module, deps in import_graph().items() if layer(module) == lower}
    assert {m: d for m, d in upward.items() if d} == {}


def test_qsmnode_process_reaches_nothing_of_the_nodes_delivery_or_jobs() -> None:
    graph = import_graph()
    reached: set[str] = set()
    todo = ["qsmnode.commands.process"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph.get(module, ()))
    assert "qsmnode.pipeline" in reached  # the one entry point
    assert sorted(m for m in reached
                  if m in NOT_FROM_PROCESS or m.startswith(tuple(f"{n}." for n in NOT_FROM_PROCESS))
                  ) == []
