"""A plain (non-editable) install ships the twistd dropin, and twistd finds it there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import ROOT

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

TWISTD_HELP = ("import sys; sys.argv = ['twistd', 'jobworker', '--help']; "
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


@pytest.mark.slow
def test_the_install_holds_the_dropin_and_no_twisted_package_init(installed: Path) -> None:
    """twisted/plugins/jobworker_plugin.py is installed, with no __init__.py shadowing Twisted's."""
    assert (installed / "twisted" / "plugins" / "jobworker_plugin.py").is_file()
    assert not (installed / "twisted" / "__init__.py").exists()
    assert not (installed / "twisted" / "plugins" / "__init__.py").exists()
    assert (installed / "jobworker" / "daemon" / "tap.py").is_file()


@pytest.mark.slow
def test_getplugins_finds_jobworker_in_the_plain_install(installed: Path,
                                                         tmp_path: Path) -> None:
    """From outside the repo with PYTHONPATH=<tmp>, twistd's plugin lookup loads jobworker from <tmp>."""
    result = run_python("-c", PROBE, pythonpath=str(installed), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["count"] == 1 and found["module"] == "jobworker.daemon.tap"
    assert found["dropin"].startswith(str(installed) + os.sep)
    assert found["tap"].startswith(str(installed) + os.sep)


@pytest.mark.slow
def test_the_plain_install_works_without_the_checkout_on_sys_path(installed: Path,
                                                                   tmp_path: Path) -> None:
    """With site processing off (no editable-install .pth), <tmp> alone supplies the dropin and
    ``twistd jobworker --help`` runs from it."""
    site_packages = sysconfig.get_paths()["purelib"]
    pythonpath = f"{installed}{os.pathsep}{site_packages}"
    result = run_python("-S", "-c", PROBE, pythonpath=pythonpath, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert str(ROOT) not in found["path"]
    assert found["count"] == 1
    assert found["dropin"].startswith(str(installed) + os.sep)
    help_ = run_python("-S", "-c", TWISTD_HELP, pythonpath=pythonpath, cwd=tmp_path)
    assert help_.returncode == 0, help_.stderr
    assert "--frame-timeout=" in help_.stdout and "--pki=" in help_.stdout
