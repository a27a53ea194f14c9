"""Every backend's selection kernels against the reference, bit for bit: the small case set of
_select_cases.py on every backend and device available here.

Each backend file adds only the sizes and paths it has (test_select_cpp.py: the sampling bracket;
test_select_cuda.py: GPU-sized inputs; test_select_triton.py: the candidate buffer, the chunk
geometry, the sm_90 compile).
"""

import pytest
import torch

from _select_cases import CASE_DTYPE, SMALL_CASES, skip_unless_supported


@pytest.mark.parametrize("case", list(SMALL_CASES))
def test_selection_matches_the_reference(kernels, case):
    skip_unless_supported(kernels.name, CASE_DTYPE.get(case, torch.float32))
    SMALL_CASES[case](vars(kernels), kernels.device)
