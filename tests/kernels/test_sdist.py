"""The source distribution carries every file the extension build reads (MANIFEST.in): setup.py
lists only the .cpp/.cu sources of the build it configures, so without MANIFEST.in an sdist lacked
every header (and, made without CUDA, every CUDA file) and `pip install` from it built no extension."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_sdist_lists_every_file_of_csrc(tmp_path):
    env = dict(os.environ, BISE_KERNELS_BUILD_CPP="0")  # no source list from setup.py: MANIFEST.in alone
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    (sources,) = tmp_path.glob("*.egg-info/SOURCES.txt")
    listed = set(sources.read_text().split())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    assert {"csrc/checks.h", "csrc/cuda/select.cu"} <= on_disk
    assert on_disk - listed == set()
