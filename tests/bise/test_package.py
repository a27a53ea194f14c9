"""The top-level bise API: every name of __all__ resolves, the function names beat the submodules, and a
missing package of the [bise] extra is named with the command that installs it."""

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bise
from bise import _extra

ROOT = Path(__file__).resolve().parents[2]


def test_api_names_are_the_functions_even_after_their_submodules_are_imported():
    for name in ("extract", "evaluate", "export", "finetune", "cli", "report", "subnetwork"):
        importlib.import_module(f"bise.{name}")
    for name in ("extract", "evaluate", "export", "finetune"):
        assert inspect.isfunction(getattr(bise, name)), name
    assert bise.export.__name__ == "export_subnetwork"


def test_every_public_name_resolves():
    assert all(getattr(bise, name) is not None for name in bise.__all__)
    assert inspect.isclass(bise.ExtractConfig) and inspect.isclass(bise.Subnetwork)


def test_without_the_bise_extra_import_bise_names_it():
    """`pip install bise-kernels` (no [bise]), then `import bise`: one error naming the extra, raised from
    bise/__init__.py, not a ModuleNotFoundError deep in a submodule. torch_pruning stands for any module
    of the extra (the check is on the module's name: test_every_module_of_the_extra_is_named)."""
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'torch_pruning':\n"
               "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "import bise\n")
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()
    assert last[-1] == ('ModuleNotFoundError: bise needs torch-pruning (module torch_pruning), from the [bise] '
                        'extra: pip install "bise-kernels[bise]"'), proc.stderr
    assert 'File "' + str(ROOT / "bise" / "__init__.py") in last[-3], proc.stderr  # raised there, chain cut


def test_every_module_of_the_extra_is_named():
    """_extra.MODULES is pyproject.toml's [bise] extra, by import name."""
    text = (ROOT / "pyproject.toml").read_text()
    extra = re.search(r'^bise = \[(.*)\]$', text, re.M).group(1)
    packages = [p.split("=")[0].lower() for p in re.findall(r'"([^"]+)"', extra)]
    assert [{"pillow": "PIL", "torch-pruning": "torch_pruning"}.get(p, p) for p in packages] == list(_extra.MODULES)
    assert [p.lower() for p in _extra.PACKAGES.values()] == packages
    assert _extra.missing(ModuleNotFoundError("x", name="yaml")) is None
    assert str(_extra.missing(ModuleNotFoundError("x", name="PIL.Image"))).startswith(
        "bise needs Pillow (module PIL), from the [bise] extra")


CONSOLE_SCRIPT = ("import re\nimport sys\nfrom bise.cli import main\nif __name__ == '__main__':\n"
                  "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n    sys.exit(main())\n")


@pytest.mark.parametrize("module, package", [("tqdm", "tqdm"), ("PIL", "Pillow"), ("torch_pruning", "torch-pruning")])
@pytest.mark.parametrize("how", ["console script", "python -m bise"])
def test_the_bise_command_without_the_extra_says_so_in_one_line(tmp_path, module, package, how):
    """The `bise` command (pip's console script for bise.cli:main, or python -m bise) ended in a traceback
    from bise/__init__.py when a package of the extra was missing: one line naming it and the install
    command now, exit status 2 (as the command's other errors). The package is hidden, not uninstalled."""
    (tmp_path / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    (tmp_path / "bise").write_text(CONSOLE_SCRIPT)  # what pip writes for [project.scripts] bise
    command = [str(tmp_path / "bise")] if how == "console script" else ["-m", "bise"]
    proc = subprocess.run([sys.executable, *command, "run", "--help"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (f"bise: error: bise needs {package}{'' if module == package else f' (module {module})'}, "
                           'from the [bise] extra: pip install "bise-kernels[bise]"\n'), proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("argv, orig_argv, expected", [
    (["/usr/bin/bise"], None, True), (["/venv/Scripts/bise.exe"], None, True), (["bise-script.py"], None, True),
    (["/usr/bin/python"], None, False), (["-m", "run"], ["python", "-m", "bise", "run"], True),
    (["-m", "run"], ["python", "-mbise", "run"], True), (["-m", "run"], ["python", "-m", "pytest", "run"], False)])
def test_is_command_recognises_every_way_of_running_bise(monkeypatch, argv, orig_argv, expected):
    monkeypatch.setattr(sys, "argv", argv)
    if orig_argv is not None:
        monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert _extra._is_command() is expected
