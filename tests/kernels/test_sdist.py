"""The source distribution carries every file the extension build reads (MANIFEST.in): setup.py
lists only the .cpp/.cu sources of the build it configures, so without MANIFEST.in an sdist lacked
every header (and, made without CUDA, every CUDA file) and `pip install` from it built no extension.
Its metadata (egg_info, what pip builds from) takes the version from bise_kernels.__version__ and
gives setuptools nothing to warn about."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools

import bise_kernels

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def egg_info(tmp_path_factory):
    """(the .egg-info folder, setup.py's stderr) of `setup.py egg_info` in this checkout."""
    base = tmp_path_factory.mktemp("egg_info")
    env = dict(os.environ, BISE_KERNELS_BUILD_CPP="0")  # no source list from setup.py: MANIFEST.in alone
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(base)], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True)
    (folder,) = base.glob("*.egg-info")
    return folder, proc.stderr


def test_the_sdist_lists_every_file_of_csrc(egg_info):
    listed = set((egg_info[0] / "SOURCES.txt").read_text().split())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert {"csrc/checks.h", "csrc/cuda/select.cu"} <= on_disk
    assert on_disk - listed == set()


def test_the_metadata_has_the_packages_version_and_no_deprecation(egg_info):
    """`project.license` as a TOML table made setuptools print a 10-line deprecation box three times per
    `pip install` (an error for builds after 2027-02-18); the version is written once, in bise_kernels."""
    folder, stderr = egg_info
    meta = (folder / "PKG-INFO").read_text()
    assert re.search(r"^Version: (.*)$", meta, re.M).group(1) == bise_kernels.__version__
    spdx = int(setuptools.__version__.split(".")[0]) >= 77  # setup.py: plain text before 77 (a torch 2.11 venv: 66)
    assert re.search(r"^License-Expression: Apache-2.0$" if spdx else r"^License: Apache-2.0$", meta, re.M), meta
    assert "Deprecat" not in stderr, stderr


def test_the_sdist_carries_the_examples(egg_info):
    """tests/test_examples.py runs every script of examples/ (MANIFEST.in: setuptools 84 adds the test by
    default, the device venv's 65 did not: the check_device_build run failed here)."""
    listed = set((egg_info[0] / "SOURCES.txt").read_text().split())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*") if p.is_file()}
    assert {"examples/README.md", "examples/bise_own_data.py", "tests/test_examples.py"} <= listed
    assert on_disk - listed == set()
    assert not any(name.endswith(".pyc") for name in listed)


def test_the_sdist_carries_the_changelog(egg_info):
    """CHANGELOG.md (MANIFEST.in): setuptools adds README and LICENSE by default, not the release notes."""
    assert "CHANGELOG.md" in set((egg_info[0] / "SOURCES.txt").read_text().split())


def test_the_sdist_leaves_out_the_docs_test(egg_info):
    """tests/test_docs.py checks files the sdist does not carry (MANIFEST.in excludes it)."""
    assert "tests/test_docs.py" not in set((egg_info[0] / "SOURCES.txt").read_text().split())


def test_a_compiler_that_fails_torchs_check_skips_the_extension_unless_forced(tmp_path):
    """torch checks the compiler in build_extensions, before any extension builds: a compiler that fails
    that check (here `false`) stopped the install where a failed build is documented as skipped. Built
    into a build folder of its own (``--build-lib``), so this checkout's extension is not touched."""
    def build(**env):
        return subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                               "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, capture_output=True, text=True,
                              env=dict(os.environ, CXX="false", CC="false", BISE_KERNELS_BUILD_CUDA="0", **env),
                              timeout=300)

    skipped = build()
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "bise_kernels: building bise_kernels._C failed (" in skipped.stderr
    assert not list((tmp_path / "lib").rglob("_C*.so"))
    assert build(BISE_KERNELS_BUILD_CPP="1").returncode != 0  # forced: an install error
