"""pytest-benchmark's ``machine_info`` (in every saved JSON) gains what the CPU timings depend on:
torch's version and thread count, the instruction-set level ATen runs at (which the cpp select and
keep_mask follow; ``ATEN_CPU_CAPABILITY`` holds both to a lower one) and the commit measured."""

import os


def pytest_benchmark_update_machine_info(config, machine_info):
    import torch

    from bise_kernels.info import source_commit

    machine_info.update(
        torch=torch.__version__, torch_threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(), bise=source_commit(),
        env={k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS", "BISE_KERNELS_BACKEND")})
