"""A plain (non-editable) install ships the twistd dropin, and twistd finds it there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT

import jobworker

PROBE = """
import json, sys
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "jobworker"]
import jobworker.daemon.tap, twisted.plugins.jobworker_plugin as dropin
print(json.dumps({"count": len(makers), "module": makers[0].module if makers else None,
                  "dropin": dropin.__file__, "tap": jobworker.daemon.tap.__file__,
                  "path": sys.path}))
"""

TWISTD = ("import sys; sys.argv = ['twistd', 'jobworker', '%s']; "
          "from twisted.scripts.twistd import run; run()")


def run_python(*args: str, pythonpath: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install --no-deps --target <tmp> .`` of this checkout."""
    target = tmp_path_factory.mktemp("plain-install") / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
         str(target), str(ROOT)],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    return target


@pytest.fixture(scope="module")
def dependencies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This environment's site-packages as symlinks, less any jobworker in it (the package,
    its metadata, its dropin in twisted/plugins): so only <tmp>'s copy can be found, whether
    this environment has jobworker editable (make test), installed (pip install '.[test]',
    tox) or not at all.  Twisted's plugins/ comes before PYTHONPATH's in its __path__."""
    site_packages = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path_factory.mktemp("dependencies") / "site"
    view.mkdir()

    def link_all(source: Path, target: Path, skip: Callable[[str], bool]) -> None:
        for entry in source.iterdir():
            if not skip(entry.name):
                (target / entry.name).symlink_to(entry)

    link_all(site_packages, view,
             lambda name: name.startswith(("jobworker", "__editable__")) or name == "twisted")
    (view / "twisted").mkdir()
    link_all(site_packages / "twisted", view / "twisted", lambda name: name == "plugins")
    (view / "twisted" / "plugins").mkdir()
    link_all(site_packages / "twisted" / "plugins", view / "twisted" / "plugins",
             lambda name: name.startswith("jobworker") or name in ("dropin.cache",
                                                                    "__pycache__"))
    return view


@pytest.mark.slow
def test_the_install_holds_the_dropin_and_no_twisted_package_init(installed: Path) -> None:
    """twisted/plugins/jobworker_plugin.py is installed, with no __init__.py shadowing Twisted's."""
    assert (installed / "twisted" / "plugins" / "jobworker_plugin.py").is_file()
    assert not (installed / "twisted" / "__init__.py").exists()
    assert not (installed / "twisted" / "plugins" / "__init__.py").exists()
    assert (installed / "jobworker" / "daemon" / "tap.py").is_file()


@pytest.mark.slow
def test_getplugins_finds_jobworker_in_the_plain_install(installed: Path, dependencies: Path,
                                                         tmp_path: Path) -> None:
    """From outside the repo with PYTHONPATH=<tmp> and the dependencies (no site
    processing, so no editable-install .pth), twistd's plugin lookup loads jobworker and its
    dropin from <tmp>."""
    result = run_python("-S", "-c", PROBE, pythonpath=f"{installed}{os.pathsep}{dependencies}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["count"] == 1 and found["module"] == "jobworker.daemon.tap"
    assert found["dropin"].startswith(str(installed) + os.sep)
    assert found["tap"].startswith(str(installed) + os.sep)
    assert str(ROOT) not in found["path"]


@pytest.mark.slow
def test_twistd_runs_jobworker_from_the_plain_install(installed: Path, dependencies: Path,
                                                      tmp_path: Path) -> None:
    """With the same path, ``twistd jobworker --help`` and ``--version`` run from <tmp>."""
    pythonpath = f"{installed}{os.pathsep}{dependencies}"
    help_ = run_python("-S", "-c", TWISTD % "--help", pythonpath=pythonpath, cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr
    assert "--frame-timeout=" in help_.stdout and "--pki=" in help_.stdout
    version = run_python("-S", "-c", TWISTD % "--version", pythonpath=pythonpath, cwd=tmp_path)
    assert version.stdout == f"jobworker {jobworker.__version__}\n", version.stderr


@pytest.mark.slow
def test_every_imported_distribution_is_declared(installed: Path) -> None:
    """Each third-party module the package imports comes from a distribution its built
    metadata requires (cryptography and zope.interface used to be imported undeclared)."""
    import ast
    import importlib.metadata

    imported: set[str] = set()
    for path in [*(ROOT / "jobworker").rglob("*.py"), ROOT / "twisted" / "plugins" /
                 "jobworker_plugin.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"jobworker"}
    assert {"twisted", "OpenSSL", "cryptography", "msgpack"} <= third_party

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    (metadata,) = installed.glob("jobworker-*.dist-info/METADATA")
    required = {norm(re.split(r"[\s\[<>=!;~(]", line.split(":", 1)[1].strip())[0])
                for line in metadata.read_text().splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    providers = importlib.metadata.packages_distributions()
    for module in sorted(third_party):
        dists = {norm(d) for d in providers.get(module, [])}
        assert dists & required, f"{module} (from {dists or 'nothing installed'}) is not in " \
                                 f"install_requires {sorted(required)}"
    assert "License-File: LICENSE" in metadata.read_text()
    assert (installed / "jobworker" / "py.typed").is_file()


@pytest.mark.slow
def test_the_sdist_holds_what_pytest_needs(tmp_path: Path) -> None:
    """The sdist built from this checkout carries the tests and every file they read
    (docs, certs, examples, the systemd unit, bench), the LICENSE and py.typed; no keys."""
    build = ("import sys; from setuptools import build_meta; "
             "print(build_meta.build_sdist(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-c", build, str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    name = result.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    expected = {"LICENSE", "README.md", "setup.cfg", "pyproject.toml", "MANIFEST.in",
                "tox.ini", "Makefile", "jobworker/py.typed", "twisted/plugins/jobworker_plugin.py",
                "certs/README.md", "certs/openssl-example.sh", "examples/batch.toml",
                "examples/policy.toml", "contrib/systemd/jobworker.service",
                "bench/run_all.py", "bench/ab.py"}
    expected |= {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("*.py")}
    expected |= {str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")}
    assert expected - members == set()
    assert not [m for m in members if m.endswith((".pem", ".key", ".crl"))]


def test_jobworker_certs_prints_the_version() -> None:
    """``jobworker-certs --version`` prints the package's ``__version__`` and exits 0."""
    result = subprocess.run([str(Path(sys.executable).parent / "jobworker-certs"), "--version"],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, f"jobworker-certs {jobworker.__version__}\n")
