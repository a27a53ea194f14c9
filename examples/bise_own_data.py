"""BISE on your own arrays: a biased dataset made here, saved as an .npz, and the whole workflow on it.

The script draws a small synthetic dataset where the target (one of K noisy binary patterns) and
a bias (the stroke colour) agree on a fraction ``rho`` of the training images, writes it in the
.npz layout of docs/data.md ("Your own data"), loads it with ``bise.load_data("npz:PATH,...")``,
trains the vanilla ERM model, reports its health (``bise.check_vanilla``: training
accuracy, how many bias-conflicting samples it saw and fit), extracts the BISE subnetwork,
compares both on the bias-conflicting test samples, exports the physically smaller network,
checks it against the masked one, saves it and loads it back.

The .npz also carries ``mask_x, mask_y, mask_b``: a second draw of the training set (the same
patterns, the bias drawn and rendered afresh), which makes BISE learn its masks on samples the
vanilla never memorised (the "fresh-draw" mask set, docs/data.md). Drop them and BISE uses the
vanilla's own training set ("vanilla-train").

    python examples/bise_own_data.py                                  # writes to runs/bise_own_data/
    python examples/bise_own_data.py --mask-epochs 30 --head-epochs 10 --device cuda --out /tmp/mine
"""

import argparse
from pathlib import Path

import numpy as np
import torch

import bise
from bise.export import max_abs_diff  # bise.export is the function; its module's helpers are here

PALETTE = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, .5, 0], [.5, 0, 1]])


def bias_labels(rng, y: np.ndarray, k: int, rho) -> np.ndarray:
    """b = y on exactly round(rho * N) random samples, another class uniformly elsewhere; rho=None: b uniform."""
    if rho is None:
        return rng.integers(0, k, len(y))
    b = (y + rng.integers(1, k, len(y))) % k  # conflicting: any other class
    aligned = rng.permutation(len(y))[:round(rho * len(y))]
    b[aligned] = y[aligned]
    return b


def render(rng, patterns: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3): each pattern drawn in its bias colour (with colour noise) on black."""
    colour = np.clip(PALETTE[b] + rng.normal(0, 0.1, (len(b), 3)), 0, 1)
    return np.rint(255 * patterns[..., None] * colour[:, None, None, :]).astype(np.uint8)


def draw_patterns(rng, prototypes: np.ndarray, y: np.ndarray, flip: float) -> np.ndarray:
    """Each sample: its class's binary prototype with a fraction ``flip`` of the pixels flipped."""
    return (prototypes[y] ^ (rng.random((len(y),) + prototypes.shape[1:]) < flip)).astype(np.float64)


def make_npz(path: Path, *, k: int, size: int, n_train: int, n_test: int, rho: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    prototypes = rng.random((k, size, size)) < 0.4
    arrays = {}
    for split, n, split_rho in (("train", n_train, rho), ("val", n_test // 2, None), ("test", n_test, None)):
        y = rng.permutation(np.arange(n) % k)  # balanced classes
        patterns = draw_patterns(rng, prototypes, y, flip=0.2)
        b = bias_labels(rng, y, k, split_rho)
        arrays.update({f"{split}_x": render(rng, patterns, b), f"{split}_y": y, f"{split}_b": b})
        if split == "train":  # the second draw: the same patterns and targets, the bias drawn again
            mask_b = bias_labels(rng, y, k, rho)
            arrays.update(mask_x=render(rng, patterns, mask_b), mask_y=y, mask_b=mask_b)
    np.savez(path, **arrays)


def row(name: str, m: dict, params: int) -> str:
    return (f"{name:<12}{m['aligned_accuracy']:>9.3f}{m['conflicting_accuracy']:>13.3f}"
            f"{m['unbiased_accuracy']:>10.3f}{m['worst_group_accuracy']:>8.3f}{params:>9}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=4, help=f"K target (and bias) classes, at most {len(PALETTE)}")
    p.add_argument("--rho", type=float, default=0.98, help="aligned fraction of the training set")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--arch", default="mlp", help="a bise.models architecture (mlp, simple-cnn, ...)")
    p.add_argument("--vanilla-epochs", type=int, default=20)
    p.add_argument("--mask-epochs", type=int, default=20)
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/bise_own_data"))
    a = p.parse_args()
    if not 2 <= a.classes <= len(PALETTE):
        p.error(f"--classes must be in [2, {len(PALETTE)}] (one colour per class), got {a.classes}")

    a.out.mkdir(parents=True, exist_ok=True)
    npz = a.out / "data.npz"
    make_npz(npz, k=a.classes, size=8, n_train=a.n_train, n_test=a.n_test, rho=a.rho, seed=a.seed)
    # The nominal rho and the symmetric-rho weighting of the paper's colour benchmarks (user data
    # defaults to group-balanced weights and rho=None).
    data = bise.load_data(f"npz:{npz},rho={a.rho},weighting=symmetric-rho", seed=a.seed)
    print(f"{npz}: {data.info['sizes']} images of {data.input_shape}, {data.num_classes} classes, "
          f"rho realised {data.info['rho_realised']}, second draw for the masks: {data.mask_train is not None}")

    vanilla = bise.train_vanilla(data, a.arch, epochs=a.vanilla_epochs, seed=a.seed, device=a.device, quiet=True)
    health = bise.check_vanilla(vanilla, data, device=a.device, strict=False)
    fit = health.conflicting_train_accuracy  # None without conflicting samples
    print(f"vanilla health: train accuracy {health.train_accuracy:.3f} (chance {health.chance:.2f}), "
          f"{health.n_conflicting_train} conflicting training samples seen, "
          f"{'-' if fit is None else f'{fit:.3f}'} of them fit; dead ReLU units {health.dead_units}/{health.units}; "
          f"ok: {health.ok}")

    config = bise.ExtractConfig(mask_epochs=a.mask_epochs, head_epochs=a.head_epochs, seed=a.seed, device=a.device)
    sub = bise.extract(vanilla, data, config=config, quiet=True)
    small = sub.export(data.train.inputs()[:64])
    diff = max_abs_diff(sub.model, small, data.test)
    assert diff <= 1e-4, f"export differs from the masked model by {diff}"

    params = lambda m: sum(t.numel() for t in m.parameters())  # noqa: E731
    print(f"\nunbiased test split ({len(data.test)} images, colour independent of the target):")
    print(f"{'model':<12}{'aligned':>9}{'conflicting':>13}{'unbiased':>10}{'worst':>8}{'params':>9}")
    print(row("vanilla", bise.evaluate(vanilla, data.test, device=a.device), params(vanilla)))
    print(row("BISE", sub.evaluate(data.test, device=a.device), params(small)))
    print(f"BISE kept {sub.units_kept} of {sub.units_total} units (mask set {sub.info['mask_set']!r}, "
          f"best epoch {sub.info.get('best_epoch')}); export matches the masked model to {diff:.1e}")

    path = a.out / "subnetwork.pt"
    bise.save_exported(small, str(path), sub.model.bise_spec)  # weights + subnetwork.json (the pruned shapes)
    loaded = bise.load_exported(str(path))
    x = data.test.inputs()[:256]
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x)), "the reloaded export differs"
    print(f"saved {path} (+ {path.with_suffix('.json').name}); bise.load_exported gives the same outputs")


if __name__ == "__main__":
    main()
