"""The wheel, built and installed the way the Dockerfile does it, without Docker.

The files the Dockerfile's ``wheels`` stage copies are copied to a temporary build context (so the
checkout gets no build/ or egg-info and a file the image build lacks fails here); ``pip wheel``
builds the project and collects every dependency as a wheel, pinned by constraints.txt; a fresh
virtual environment installs only from those wheels (``--no-index``), and the installed commands
and packages are run from outside the checkout. Needs the package registry or pip's cache for the
dependencies, no broker.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]


def run(args: list[str | Path], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def build_context(target: Path) -> Path:
    """Exactly what the Dockerfile's wheels stage copies from the checkout."""
    dockerfile = (REPO / "Dockerfile").read_text()
    wheels_stage = dockerfile.split(" AS wheels", 1)[1].split("\nFROM ", 1)[0]
    sources = [s for line in re.findall(r"^COPY (.+)$", wheels_stage, re.MULTILINE) for s in line.split()[:-1]]
    assert {"pyproject.toml", "constraints.txt", "README.md", "producer/"} <= set(sources)
    target.mkdir()
    for source in sources:
        origin = REPO / source
        if origin.is_dir():
            shutil.copytree(origin, target / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, target / source)
    return target


def test_wheel_builds_once_and_installs_from_wheels_alone_into_a_clean_venv(tmp_path: Path) -> None:
    checkout_before = sorted(p.name for p in REPO.iterdir())
    context = build_context(tmp_path / "context")
    wheels = tmp_path / "wheels"
    # the Dockerfile's: pip wheel --wheel-dir /wheels --constraint constraints.txt ".[demo]"
    built = run([sys.executable, "-m", "pip", "wheel", "-v", "--wheel-dir", wheels, "--constraint",
                 "constraints.txt", ".[demo]"], cwd=context)
    output = built.stdout + built.stderr
    # setuptools' deprecation notices (the license table's, among others) stay gone
    assert "BuildBackendWarning" not in output and "SetuptoolsDeprecationWarning" not in output, output[-3000:]
    assert sorted(p.name for p in REPO.iterdir()) == checkout_before  # no build/ or egg-info left in the checkout

    (project,) = wheels.glob("tokenguard_stream-*.whl")
    with zipfile.ZipFile(project) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {n.split("/")[0] for n in names if "/" in n and ".dist-info" not in n} == {
        "producer", "aggregator", "schemas", "transport"}
    assert any(n.startswith("schemas/json/") and n.endswith(".json") for n in names)  # package data
    assert "License-Expression: MIT" in metadata
    entry_points = wheel_text(project, "entry_points.txt")
    assert "tokenguard = aggregator.cli:main" in entry_points

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)
    python, pip, tokenguard = venv / "bin" / "python", venv / "bin" / "pip", venv / "bin" / "tokenguard"
    # the image's: pip install --no-index --find-links /wheels --constraint constraints.txt tokenguard-stream
    run([pip, "install", "--no-index", "--find-links", wheels, "--constraint", REPO / "constraints.txt",
         "tokenguard-stream"], cwd=tmp_path)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    version = run([tokenguard, "--version"], cwd=outside).stdout
    assert "0.1.0" in version
    imported = run([python, "-c", "import producer, aggregator, schemas, transport\n"
                    "for m in (producer, aggregator, schemas, transport): print(m.__file__)"], cwd=outside).stdout
    for line in imported.split():
        assert line.startswith(str(venv)), f"imported from outside the venv: {line}"
    run([tokenguard, "aggregator", "--help"], cwd=outside)
    run([venv / "bin" / "tokenguard-aggregator", "--help"], cwd=outside)
    # the aggregator image needs no demo extra; the demo target adds it from the same wheels
    missing = subprocess.run([python, "-c", "import rich"], cwd=outside, capture_output=True)
    assert missing.returncode != 0
    run([pip, "install", "--no-index", "--find-links", wheels, "--constraint", REPO / "constraints.txt",
         "tokenguard-stream[demo]"], cwd=tmp_path)
    run([python, "-c", "import rich"], cwd=outside)


def wheel_text(wheel_path: Path, name: str) -> str:
    with zipfile.ZipFile(wheel_path) as wheel:
        return wheel.read(next(n for n in wheel.namelist() if n.endswith(f".dist-info/{name}"))).decode()
