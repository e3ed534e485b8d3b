"""The private Twisted names jobworker relies on: all present in this Twisted, all used
through ``jobworker._twisted`` and nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from twisted.internet import process as twisted_process

from jobworker import _twisted

PACKAGE = Path(_twisted.__file__).parent

#: Names that are Twisted's internals (private, or undocumented attributes of its classes).
INTERNALS = frozenset({
    "_BaseProcess", "registerReapProcessHandler", "reapProcessHandlers", "_listOpenFDs",
    "_getFileActions", "_tempDataLen", "_tempDataBuffer", "dataBuffer", "failVerification",
})


def test_this_twisted_has_every_internal_we_use() -> None:
    """On an upgrade that drops or renames one, this fails and names it, rather than
    jobworker quietly taking a slower path."""
    assert _twisted.missing() == []


def test_a_missing_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: take one name away and it is reported."""
    monkeypatch.delattr(twisted_process, "_listOpenFDs")
    assert _twisted.missing() == ["twisted.internet.process._listOpenFDs"]


def _twisted_uses(path: Path) -> list[str]:
    """Where ``path`` imports a private name from Twisted or touches one of INTERNALS."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
            found += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names
                      if a.name.startswith("_") or a.name in INTERNALS]
            if node.module in ("twisted.internet.process", "twisted.internet.abstract"):
                found.append(f"{path.name}:{node.lineno} imports from {node.module}")
            if node.module == "twisted.internet" and any(
                    a.name in ("process", "abstract") for a in node.names):
                found.append(f"{path.name}:{node.lineno} imports twisted.internet's internals")
        elif isinstance(node, ast.Attribute) and node.attr in INTERNALS:
            found.append(f"{path.name}:{node.lineno} uses .{node.attr}")
    return found


def test_no_other_module_touches_twisted_internals() -> None:
    """Every use of Twisted's internals goes through jobworker._twisted, so an upgrade has
    one module to read."""
    modules = [p for p in PACKAGE.rglob("*.py") if p != Path(_twisted.__file__)]
    assert len(modules) > 40  # the whole package was scanned
    assert [use for p in modules for use in _twisted_uses(p)] == []


def test_the_scan_finds_an_internal(tmp_path: Path) -> None:
    """The scan above can fail: a module reaching into Twisted is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from twisted.internet import process\n"
                   "process.reapProcessHandlers.clear()\n")
    assert _twisted_uses(bad) == ["bad.py:1 imports twisted.internet's internals",
                                  "bad.py:2 uses .reapProcessHandlers"]
