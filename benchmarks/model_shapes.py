"""Weight shapes of real models, shared by the CPU and GPU selection benchmarks."""

from __future__ import annotations


def resnet50_weight_shapes(divisor: int = 1) -> list[tuple[int, ...]]:
    """The 54 weight tensors of torchvision's ResNet-50 (53 convolutions and the classifier),
    channels divided by ``divisor`` (a smaller copy for smoke runs)."""
    shapes = [(64 // divisor, 3, 7, 7)]
    in_ch = 64 // divisor
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        width //= divisor
        for b in range(blocks):
            shapes += [(width, in_ch, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if b == 0:
                shapes.append((4 * width, in_ch, 1, 1))
            in_ch = 4 * width
    return shapes + [(1000, in_ch)]


def bert_base_weight_shapes() -> list[tuple[int, ...]]:
    """The weight matrices of BERT-base (embeddings, 12 layers, pooler): ~109 M scores."""
    d, ff = 768, 3072
    shapes = [(30522, d), (512, d), (2, d)]
    for _ in range(12):
        shapes += [(d, d)] * 4 + [(ff, d), (d, ff)]
    return shapes + [(d, d)]
