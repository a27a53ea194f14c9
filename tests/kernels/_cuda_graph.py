"""Capturing a CUDA graph as torch.cuda.graph asks: warm-up calls on a side stream, then the capture."""

from typing import Callable, Optional

import torch


def capture(fn: Callable, warmups: int = 1, warmup: Optional[Callable] = None):
    """(graph, what ``fn`` returned in the capture), after ``warmups`` calls of ``warmup`` (default
    ``fn``) on a side stream: one-time work (the CUDA selection's plan copy, cuBLAS workspaces) is
    done eagerly then, not recorded. Capturing runs nothing: the graph's first replay is fn's first run."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            (warmup or fn)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
