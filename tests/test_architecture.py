"""The package's shape: folders by stage, lower layers never import upper ones, no import circle.

Every ``palr.*`` import counts, also those inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "palr"
# bottom to top; a module may import its own layer and those below it
LAYERS = [["core"], ["data"], ["runs"], ["retrieval", "llm"], ["rank"], ["evaluate"], ["train"], ["serve"], ["cli"]]
LEVEL = {pkg: i for i, group in enumerate(LAYERS) for pkg in group}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def palr_imports(path: Path) -> set[str]:
    """The palr modules ``path`` imports (``from palr.x import y`` counts palr.x.y when that is a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("palr")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("palr"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}
GRAPH = {m: {i for i in palr_imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LEVEL else None


def test_every_module_lives_in_a_stage_folder() -> None:
    loose = sorted(m for m in MODULES if m != "palr" and stage(m) is None)
    assert loose == [], f"modules outside the stage folders: {loose}"


def test_lower_layers_never_import_upper_ones() -> None:
    bad = sorted(f"{m} -> {i}" for m, deps in GRAPH.items() for i in deps
                 if stage(m) and stage(i) and LEVEL[stage(i)] > LEVEL[stage(m)])
    assert bad == [], "upward imports:\n" + "\n".join(bad)


def test_no_import_circle() -> None:
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d] if d in path else [m, d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    # a package __init__ re-exporting its modules is not a circle of behaviour, but still counts
    assert cycles == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from palr.core.errors import PalrError\n    return PalrError\n")
    assert "palr.core.errors" in palr_imports(f)


def test_one_recommend_request_walks_downhill(tiny_ml100k_run: dict[str, Path]) -> None:
    """Load a PALR run and recommend for one user: every call between palr's stages goes down (or stays), and
    the request touches at most rank, runs, data, retrieval, llm (+ core); the CLI or the HTTP app adds one."""
    import sys

    from palr.rank.pipeline import PALR

    calls: dict[tuple[str, str], int] = {}

    def stage_of(frame: object) -> str | None:
        parts = getattr(frame, "f_globals", {}).get("__name__", "").split(".")
        return parts[1] if parts[0] == "palr" and len(parts) > 1 and parts[1] in LEVEL else None

    def profile(frame: object, event: str, arg: object) -> None:
        if event != "call" or (callee := stage_of(frame)) is None:
            return
        f = frame.f_back  # type: ignore[attr-defined]
        while f is not None and stage_of(f) is None:
            f = f.f_back
        caller = stage_of(f) if f is not None else "<caller>"
        calls[(caller, callee)] = calls.get((caller, callee), 0) + 1  # type: ignore[index]

    sys.setprofile(profile)
    try:
        rec = PALR.load(tiny_ml100k_run["palr"], data_dir=tiny_ml100k_run["data_dir"]).recommend(user="1", k=5)
    finally:
        sys.setprofile(None)
    assert len(rec.items) == 5
    upward = sorted(f"{a} -> {b}" for a, b in calls if a in LEVEL and LEVEL[b] > LEVEL[a])
    assert upward == [], f"calls that climb back up the layers: {upward}"
    stages = {b for _, b in calls}
    assert stages <= {"rank", "runs", "data", "retrieval", "llm", "core"}, stages
    assert "rank" in stages and "retrieval" in stages  # the trace saw the request
