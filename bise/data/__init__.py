"""Biased datasets for BISE: real built-in benchmarks generated offline, and the user's own data.

    ds = bise.data.load("biased-mnist:rho=0.997", seed=0)
    ds.train.inputs(), ds.train.y, ds.train.b, ds.train.aligned()

See docs/data.md for every spec, option, format and protocol.
"""

from .sources import SourceMissing
from .spec import available, load
from .types import BiasedDataset, Split

__all__ = ["BiasedDataset", "SourceMissing", "Split", "available", "load"]
