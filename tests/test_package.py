"""The package installs: a wheel built from the clone holds the code and its data files, declares the app's
requirements (listed once, in requirements.txt) and a ``seedstory`` command that works outside the clone."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    work = tmp_path_factory.mktemp("src")
    # built from a copy, so the clone gets no build/ or egg-info folders
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, name), work / name)
    shutil.copytree(os.path.join(ROOT, "seedstory"), work / "seedstory", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(work), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True)
    (path,) = out.glob("seedstory-*.whl")
    return path


def test_the_wheel_holds_the_code_the_data_files_the_requirements_and_the_command(wheel):
    z = zipfile.ZipFile(wheel)
    names = z.namelist()
    assert "seedstory/pipeline.py" in names and "seedstory/data/synthetic.py" in names
    assert any(n.startswith("seedstory/checkpoints/manifests/") and n.endswith(".json.gz") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "training/", "assets/"))]
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode().splitlines()
    required = [line.split(":", 1)[1].strip() for line in meta if line.startswith("Requires-Dist:") and "extra ==" not in line]
    listed = [line.strip() for line in open(os.path.join(ROOT, "requirements.txt"))
              if line.strip() and not line.startswith("#")]
    assert required == listed
    entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "seedstory = seedstory.__main__:entry" in entry


def test_the_installed_command_runs_outside_the_clone(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target), "SEEDSTORY_HOME": ""}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def seedstory(*args, cwd):
        return subprocess.run([sys.executable, str(target / "bin" / "seedstory"), *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=300)

    helped = seedstory("--help", cwd=elsewhere)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: seedstory ")
    lost = seedstory("presets", cwd=elsewhere)  # no clone here: says what to do, no traceback
    assert lost.returncode == 1 and "SEEDSTORY_HOME" in lost.stderr and "Traceback" not in lost.stderr
    found = seedstory("presets", cwd=ROOT)  # used from inside a clone, it finds the presets there
    assert found.returncode == 0 and "demo" in found.stdout.split()
