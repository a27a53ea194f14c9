"""The stable-sort oracle and adversarial inputs shared by the selection tests."""

import torch


def sort_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: the first k indices of the stable descending sort."""
    flat = scores.flatten()
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return mask.reshape(scores.shape)


def adversarial_inputs(n: int, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs that break naive selections: ties, signed zeros, denormals, extremes, sorted runs."""
    g = torch.Generator().manual_seed(seed)
    finfo = torch.finfo(dtype)
    random = torch.randn(n, generator=g).to(dtype)
    zeros = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(-0.0), torch.tensor(0.0)).to(dtype)
    denormal = (torch.randint(-3, 4, (n,), generator=g).double() * finfo.smallest_normal / 4).to(dtype)
    huge = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(dtype) * finfo.max
    huge[::3] = 0
    return {
        "random": random,
        "all_equal": torch.zeros(n, dtype=dtype),
        "few_values": torch.randint(0, 3, (n,), generator=g).to(dtype),
        "sorted": torch.sort(random).values,
        "reverse_sorted": torch.sort(random, descending=True).values,
        "signed_zeros": zeros,
        "denormal": denormal,
        "huge": huge,
    }
