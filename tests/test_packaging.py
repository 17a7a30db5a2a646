"""The package as a wheel: built from the repo, installed (not editable) into a fresh venv, and the stages run from
outside the checkout with it."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

from gigavideo.rundir.layout import RunDir


@pytest.mark.slow
def test_a_wheel_ships_every_subpackage_and_runs_a_stage_from_outside_the_checkout(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info next to pyproject.toml
    shutil.copytree(REPO / "gigavideo", source / "gigavideo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source], check=True)
    wheel = next((tmp_path / "dist").glob("gigavideo-*.whl"))
    packages = {
        Path(n).parent.as_posix()
        for n in subprocess.run(
            [sys.executable, "-m", "zipfile", "-l", wheel], capture_output=True, text=True, check=True
        ).stdout.split()
        if n.endswith("__init__.py")
    }
    expected = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "gigavideo").rglob("__init__.py")}
    assert expected <= packages, sorted(expected - packages)

    fresh = tmp_path / "fresh"
    subprocess.run([sys._base_executable, "-m", "venv", fresh], check=True)  # its own pip (ensurepip, offline)
    python = fresh / "bin" / "python"
    # The fresh venv's pip: this venv's would take the wheel for an upgrade of its own (editable) gigavideo
    subprocess.run([python, *pip[1:], "install", "--no-deps", "--no-index", wheel], check=True)
    # The dependencies (torch, diffusers ...) from this venv, but not its editable gigavideo: a path added by a .pth
    # line is not itself scanned for .pth files.
    site = Path(
        subprocess.run(
            [python, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [python, "-c", "import gigavideo.models.families.wan22_a14b as m; print(m.__file__)"],
        cwd=outside,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(fresh)), where  # the wheel's copy, not the checkout's
    run = tmp_path / "run"
    for script in ("scripts/prepare_base.py", "stage1_prompts/generate.py"):
        proc = subprocess.run(
            [python, REPO / script, f"--run_dir={run}", "--config=tiny"], cwd=outside, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(RunDir(run).manifest("stage1").read_text())
    assert manifest["num_samples"] > 0 and not (outside / "runs").exists()
