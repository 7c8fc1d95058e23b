"""The tree's shape: only runtime code in the shipped packages, shared/ imports no daemon,
no test module imports another (helpers live in tests/bed/, fixtures come from its plugins)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DAEMONS = ("controld", "natd")
# Other branches rewrite these now; each entry goes when that branch is merged.
PENDING_SHARED = {"shared/cli.py"}  # the admin CLI is a client of controld.adminapi (client, protocol)
# (ScriptedLink and its drivers move to tests/bed/ once the core's natd link has settled)
PENDING_TESTS = {"tests/unit/test_iwf_operations.py", "tests/unit/test_iwf_regressions.py"}


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-local imports included)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
    return out


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_shared_imports_no_daemon() -> None:
    bad = {rel(p): sorted(m for m in imported(p) if m.split(".")[0] in DAEMONS)
           for p in (ROOT / "shared").rglob("*.py") if rel(p) not in PENDING_SHARED}
    assert not {k: v for k, v in bad.items() if v}


def test_no_shipped_package_holds_or_imports_test_code() -> None:
    for pkg in (*DAEMONS, "shared"):
        for p in (ROOT / pkg).rglob("*.py"):
            assert not p.name.startswith(("test", "conftest")) and "bed" not in p.parts, rel(p)
            if rel(p) not in PENDING_SHARED:
                assert not [m for m in imported(p) if m.split(".")[0] == "tests"], rel(p)


def test_no_test_module_imports_another() -> None:
    bad = {}
    for p in (ROOT / "tests").rglob("test_*.py"):
        if rel(p) in PENDING_TESTS:
            continue
        others = sorted(m for m in imported(p) if m.startswith("tests.") and m.rsplit(".", 1)[-1].startswith("test_"))
        if others:
            bad[rel(p)] = others
    assert not bad


def test_the_checks_see_imports() -> None:
    probe = ROOT / "tests" / "unit" / "test_layout.py"
    assert "ast" in imported(probe) and "pathlib" in imported(probe)
