"""Biased datasets for BISE: real built-in benchmarks generated offline, and the user's own data.

    ds = bise.data.load("biased-mnist:rho=0.997", seed=0)
    ds.train.inputs(), ds.train.y, ds.train.b, ds.train.aligned()

See docs/data.md for every spec, option, format and protocol.
"""

from .maskset import PROTOCOLS as MASK_SETS
from .maskset import default_protocol, mask_data
from .sources import SourceMissing
from .spec import available, load, redraw
from .types import BiasedDataset, Split

__all__ = ["BiasedDataset", "MASK_SETS", "SourceMissing", "Split", "available", "default_protocol", "load",
           "mask_data", "redraw"]
