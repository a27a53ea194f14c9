"""Extraction-epoch scaling over processes (torch.distributed, gloo on CPU); see scaling.py.

Small here (colored-digits, mlp, 1 and 2 processes) so that the benchmark suite stays short; the
full measurement is `python benchmarks/scaling.py --procs 1 2 4`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import scaling  # noqa: E402


def test_extraction_epoch_scaling(benchmark, tmp_path):
    argv = ["--procs", "1", "2", "--data", "colored-digits", "--arch", "mlp", "--batch-size", "64",
            "--out", str(tmp_path / "scaling.json")]
    result = benchmark.pedantic(scaling.main, args=(argv,), rounds=1, iterations=1)
    rows = result["rows"]
    assert [r["processes"] for r in rows] == [1, 2]
    assert rows[0]["bytes_per_step_per_rank"]["all_reduce_bytes"] == 0  # one process: no communication
    assert rows[1]["bytes_per_step_per_rank"]["all_reduce_bytes"] > 0
    benchmark.extra_info.update({f"procs_{r['processes']}": r for r in rows})
