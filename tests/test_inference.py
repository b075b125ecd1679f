"""Overlap-tile prediction is seamless: tiled and whole-image predictions agree."""

import keras
import numpy as np
import pytest

from unet_dist.config import load_config
from unet_dist.inference import predict_tiled
from unet_dist.model import build_unet
from unet_dist.shapes import output_size


def _image(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(0)
    return np.clip(np.dstack([np.sin(yy / 7), np.cos(xx / 5), np.sin((xx + yy) / 9)]) * 0.4 + 0.5
                   + rng.normal(0, 0.05, (h, w, 3)), 0, 1).astype(np.float32)


def test_valid_padding_tiles_equal_the_whole_image():
    # Valid convolutions see only their receptive field: tiling with the network's own context
    # reproduces the whole-image output exactly (Ronneberger et al. 2015, overlap-tile).
    cfg = load_config(None, ["model.padding=valid", "model.depth=2", "model.base_filters=4",
                             "data.image_size=[60, 60]", "model.batch_norm=false"])
    keras.utils.set_random_seed(1)
    model = build_unet(cfg.model, None)
    o = output_size((60, 60), 2, "valid")[0]
    c = (60 - o) // 2
    H, W = 3 * o, 2 * o  # the whole image, mirror padded by c, is a valid input too
    img = _image(H, W)
    whole = model(np.pad(img, ((c, c), (c, c), (0, 0)), mode="reflect")[None], training=False).numpy()[0]
    tiled = predict_tiled(model, img, cfg)
    assert tiled.shape == whole.shape == (H, W, 1)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (100, 150)])
def test_same_padding_tiles_agree_with_the_whole_image(size):
    cfg = load_config(None, ["model.depth=2", "model.base_filters=4", "data.image_size=[64, 64]"])
    keras.utils.set_random_seed(2)
    model = build_unet(cfg.model, None)
    img = _image(*size)
    ph, pw = (-size[0]) % 4, (-size[1]) % 4
    whole = model(np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")[None], training=False).numpy()[0]
    whole = whole[: size[0], : size[1]]
    tiled = predict_tiled(model, img, cfg, overlap=28)
    assert tiled.shape == whole.shape
    # The overlap (28 px, on the pooling grid) covers the depth-2 net's receptive
    # field radius (about 26 px), so away from the image border (where the whole-image run sees zero
    # padding and the tiles see mirrored pixels) tiles and whole image agree to float precision.
    inner = (slice(28, -28), slice(28, -28))
    np.testing.assert_allclose(tiled[inner], whole[inner], atol=1e-5)
    # ...while tiles without overlap show seams (when there is more than one tile): the check can tell.
    if max(size) <= 64:
        return
    seamy = predict_tiled(model, img, cfg, overlap=0)
    assert np.abs(seamy[inner] - whole[inner]).max() > 1e-3
