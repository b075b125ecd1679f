"""U-Net spatial shape arithmetic, free of TensorFlow so config validation stays light.

Same padding keeps each level's size, so H and W must be divisible by 2^depth.
Valid padding (Ronneberger et al. 2015) loses 4 pixels per pair of 3x3 convolutions; every size
reaching a 2x2 pooling must be even, and the output is smaller than the input (572 -> 388 at depth 4).
"""

from __future__ import annotations


def _valid_output(size: int, depth: int) -> int:
    for level in range(depth):
        size -= 4
        if size <= 0 or size % 2:
            raise ValueError(
                f"size {size + 4} at level {level} gives {size} after two valid 3x3 convolutions, which must be even and > 0"
            )
        size //= 2
    size -= 4  # bottleneck
    if size <= 0:
        raise ValueError("input too small for the valid-padding bottleneck")
    for _ in range(depth):
        size = size * 2 - 4
    return size


def output_size(size: tuple[int, int], depth: int, padding: str) -> tuple[int, int]:
    """Spatial (H, W) of the U-Net output for an input of `size`; raises ValueError if impossible."""
    check_input_size(size, depth, padding)
    if padding == "same":
        return tuple(size)
    return tuple(_valid_output(s, depth) for s in size)


def check_input_size(size: tuple[int, int], depth: int, padding: str) -> None:
    """Raises ValueError, saying what is allowed, when `size` cannot pass through the network."""
    if padding not in ("same", "valid"):
        raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}")
    if padding == "same":
        step = 2**depth
        for s in size:
            if s % step:
                raise ValueError(f"{list(size)} must be divisible by 2^depth = {step} with same padding")
        return
    for s in size:
        try:
            _valid_output(s, depth)
        except ValueError as e:
            ok = valid_sizes_near(s, depth)
            raise ValueError(f"{s} does not fit valid padding at depth {depth} ({e}); nearest allowed: {ok}") from None


def valid_sizes_near(size: int, depth: int) -> list[int]:
    """Allowed valid-padding input sizes just below and above `size`."""
    step = 2**depth
    # Allowed sizes are b * 2^depth + (2^(depth+2) - 4) for a bottom size b > 4.
    offset = 2 ** (depth + 2) - 4
    k = max(5, (size - offset) // step)
    return [k * step + offset, (k + 1) * step + offset]
