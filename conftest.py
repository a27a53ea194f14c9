# Triton reads TRITON_INTERPRET when kernels are decorated: set it before anything imports them.
import os

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
