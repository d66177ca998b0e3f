"""A built wheel carries the configs: installed non-editable into a throwaway virtualenv
(reusing the installed dependencies), ``aligner train sft --cfg job`` works from another
directory and reads the configs from the package (``pkg://aligner.conf``), not from this
checkout. (.ci/run also runs the quickstart from such an install, extension included.)"""
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    # the sources without csrc/: setup.py then builds no extension, which keeps this test fast
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    shutil.copytree(REPO / "aligner", src / "aligner", ignore=ignore)
    shutil.copytree(REPO / "conf", src / "conf", ignore=ignore)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ALIGNER_CONF_DIR")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", str(src), "-w", str(root / "dist")], check=True, env=env, timeout=600,
                   capture_output=True)
    wheel = next((root / "dist").glob("aligner-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # the dependencies installed here, reused (their .pth files, an editable aligner's among them, are not run):
    # this interpreter's site-packages and any other a .pth file put on its path (a virtualenv that reuses
    # another's dependencies), never a source folder
    deps = site.getsitepackages() + [p for p in sys.path if Path(p).name == "site-packages"]
    Path(purelib, "_installed_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, env=env, timeout=300, capture_output=True)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return wheel, venv, elsewhere, env


def test_the_wheel_carries_every_config(installed):
    wheel = installed[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"aligner/conf/" + p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert len(expected) > 15 and expected <= names
    assert "aligner/conf/__init__.py" in names


def test_an_installed_wheel_composes_configs_from_another_directory(installed):
    _, venv, elsewhere, env = installed
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import aligner, aligner.runtime as r; print(aligner.__file__); print(r.config_search_path())"],
                           check=True, capture_output=True, text=True, cwd=elsewhere, env=env).stdout.splitlines()
    assert where[0].startswith(str(venv)) and where[1] == "pkg://aligner.conf"
    out = subprocess.run([str(venv / "bin" / "aligner"), "train", "sft", "--cfg", "job"], capture_output=True,
                         text=True, cwd=elsewhere, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    here = subprocess.run([sys.executable, "-m", "aligner.cli.main", "train", "sft", "--cfg", "job"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.stdout == here.stdout and out.stdout.startswith("algorithm: sft\n")
    bad = subprocess.run([str(venv / "bin" / "aligner"), "train", "dpo", "dpo.loss_type=dpoo"], capture_output=True,
                         text=True, cwd=elsewhere, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("aligner train: error: dpo.loss_type: 'dpoo' is not accepted")
    listed = subprocess.run([str(venv / "bin" / "aligner"), "train", "--list"], capture_output=True, text=True,
                            cwd=elsewhere, env=env, timeout=300)
    assert listed.stdout.split()[1:] == sorted(p.stem for p in (REPO / "conf").glob("*.yaml"))
