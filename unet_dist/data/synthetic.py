"""A synthetic data set in the Oxford-IIIT Pet layout, for the demo and the tests.

Images are 240 to 500 pixels a side, like the photos of the real set. Each holds one "pet": a rotated ellipse filled with a striped texture, on a background of
smooth noise, plus (often) a distractor rectangle with the same striped texture. Colours of pet,
background and distractor come from the same distribution, so a model must use texture and shape,
not colour. Trimaps follow the real set: 1 = pet, 2 = background, 3 = a border band at the edge.

Sparse sets (`sparse=True`) hold small pets on larger images instead, about 0.5% of the pixels, as
lesions, cells or vehicles are in medical, microscopy and aerial images: what patch training with
foreground oversampling (data.patch_size, data.foreground_oversample) is for.

Cell sets (`cells=True`) are EM-like instead, as the 2015 U-Net's ISBI slices: gray 572x572 PNGs of
about 300 touching cells (Voronoi regions) parted by dark membranes 2-3 pixels wide, the cells the
"pets" and the membranes the background: what the border weight map (train.loss weighted_ce) is for.
With faint membranes, barely darker than the cells, a model must learn the thin gaps to part them.

CT sets (`ct=True`) are CT-like slices in Hounsfield units instead, int16 .npy arrays of 96x96: an
"organ" (the pet) 30 HU above the soft tissue around it, a decoy region 15 HU above it, and in
every other slice air (-1000 HU) and bone (1800 HU) at the edges. Only a value's level tells organ
from decoy, and the air and bone move each slice's own percentiles: what `convert --intensity
dataset` is for.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

BORDER_PX = 2.0
SPARSE_SIZE = 384  # sparse sets: every image this many pixels a side
CELLS_SIZE, CELLS = 572, 300  # cell sets: pixels a side and cells an image
FAINT_MEMBRANE = 0.08  # cell sets with faint membranes: how much darker than the cell (noise: 0.06)
CT_SIZE = 96  # CT sets: pixels a side


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """(h, w) noise in [0, 1], bilinearly upsampled from a (cells x cells) grid."""
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    return np.asarray(img, np.float32) / 255.0


def _stripes(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(h, w) striped texture in [0, 1] with a random period and orientation."""
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(5, 10)
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi / period)
    return 0.5 + 0.5 * np.sign(np.sin(phase + rng.uniform(0, 2 * np.pi)))


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.15, 0.85, size=3).astype(np.float32)


def _distractor(rng: np.random.Generator, img: np.ndarray, yy: np.ndarray, xx: np.ndarray, rh: int, rw: int) -> None:
    """Paints an axis-aligned rh x rw rectangle with the pet's kind of texture (the wrong shape) into img."""
    h, w = img.shape[:2]
    y0, x0 = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
    tex = _stripes(rng, yy, xx)[..., None]
    patch = tex * _colour(rng) + (1 - tex) * _colour(rng)
    img[y0 : y0 + rh, x0 : x0 + rw] = patch[y0 : y0 + rh, x0 : x0 + rw]


def make_sample(rng: np.random.Generator, min_size: int = 240, max_size: int = 500,
                sparse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image uint8 (H, W, 3), trimap uint8 (H, W) with values 1, 2, 3). sparse: a pet of
    3-6% of the side anywhere and three small distractors, in place of a pet of 18-35% of the side
    near the centre and (often) one larger distractor."""
    h, w = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Background: two colours blended by smooth noise, plus fine grain.
    c1, c2 = _colour(rng), _colour(rng)
    t = _smooth_noise(rng, h, w, cells=int(rng.integers(3, 7)))[..., None]
    img = c1 * t + c2 * (1 - t)

    if sparse:
        for _ in range(3):
            _distractor(rng, img, yy, xx, int(rng.integers(12, 28)), int(rng.integers(12, 28)))
    elif rng.random() < 0.6:
        _distractor(rng, img, yy, xx, int(rng.integers(h // 8, h // 4)), int(rng.integers(w // 8, w // 4)))

    # Pet: a rotated ellipse, striped, drawn last so it may cover a distractor.
    scale, centre = ((0.03, 0.06), (0.1, 0.9)) if sparse else ((0.18, 0.35), (0.35, 0.65))
    a = rng.uniform(*scale) * w
    b = rng.uniform(*scale) * h
    cy, cx = rng.uniform(*centre) * h, rng.uniform(*centre) * w
    theta = rng.uniform(0, np.pi)
    dx, dy = xx - cx, yy - cy
    u = (np.cos(theta) * dx + np.sin(theta) * dy) / a
    v = (-np.sin(theta) * dx + np.cos(theta) * dy) / b
    r = np.sqrt(u * u + v * v)
    inside = r <= 1.0
    tex = _stripes(rng, yy, xx)[..., None]
    pet = tex * _colour(rng) + (1 - tex) * _colour(rng)
    img = np.where(inside[..., None], pet, img)

    img = img + rng.normal(0, 0.03, size=img.shape).astype(np.float32)
    image = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    border = np.abs(r - 1.0) * min(a, b) < BORDER_PX
    trimap = np.where(inside, 1, 2).astype(np.uint8)
    trimap[border] = 3
    return image, trimap


def make_cells(rng: np.random.Generator, size: int = CELLS_SIZE, cells: int = CELLS,
               faint: bool = False, instances: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image uint8 (size, size), trimap uint8 (size, size): 1 = cell, 2 = membrane). A
    pixel is membrane where its nearest two cell centres are within 2.5 pixels of equidistant.
    faint: membranes FAINT_MEMBRANE darker than their cell (a contrast about the noise's) instead of
    dark, as touching cells in light microscopy often are: cells then merge unless a model learns
    the thin gaps, what the 2015 U-Net's border weights are for.
    instances: an instance label image uint16 (size, size) instead of the trimap, each pixel its
    nearest cell's id 1..cells, membranes included (cells touching, as annotators label them)."""
    from scipy.spatial import cKDTree

    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.stack([yy.ravel(), xx.ravel()], 1)
    near, which = cKDTree(rng.random((cells, 2)) * size).query(pixels, k=2)
    membrane = (near[:, 1] - near[:, 0] <= 2.5).reshape(size, size)
    # Cells of their own shade with grain and organelle-like blobs; membranes dark.
    shade = rng.uniform(0.55, 0.8, cells)[which[:, 0]].reshape(size, size)
    blobs = _smooth_noise(rng, size, size, cells=size // 12)
    if faint:
        img = np.where(membrane, shade - FAINT_MEMBRANE, shade) - 0.25 * np.maximum(blobs - 0.6, 0)
    else:
        img = np.where(membrane, 0.2, shade - 0.25 * np.maximum(blobs - 0.6, 0))
    img = img + rng.normal(0, 0.06, size=img.shape)
    image = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    if instances:
        return image, (which[:, 0] + 1).reshape(size, size).astype(np.uint16)
    return image, np.where(membrane, 2, 1).astype(np.uint8)


def make_ct(rng: np.random.Generator, size: int = CT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Returns (image int16 (size, size) in Hounsfield units, trimap uint8 (size, size): 1 = organ,
    2 = the rest). Soft tissue 40 HU, the organ (a disc) 70, a decoy disc beside it 55, noise 8 HU;
    air and bone at the edges of every other slice (by the generator's draw)."""
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(size * 5 // 16, size * 11 // 16, 2)
    organ = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(size // 10, size // 4) ** 2
    dy, dx = rng.integers(size // 5, size * 4 // 5, 2)
    decoy = ((yy - dy) ** 2 + (xx - dx) ** 2 < rng.integers(size // 12, size // 6) ** 2) & ~organ
    hu = rng.normal(40, 8, (size, size)) + 30 * organ + 15 * decoy
    if rng.random() < 0.5:
        edge = size // 12
        hu[:, :edge] = -1000
        hu[:edge, edge : 2 * edge] = 1800
    return hu.astype(np.int16), np.where(organ, 1, 2).astype(np.uint8)


STEM = re.compile(r"synth_\d{5}\.(jpg|png|npy)")


def foreign_files(out: Path) -> list[Path]:
    """Files in OUT's images/, annotations/trimaps/ and masks/ that write_dataset did not write."""
    folders = [Path(out) / "images", Path(out) / "annotations" / "trimaps", Path(out) / "masks"]
    return sorted(p for d in folders if d.is_dir() for p in d.iterdir() if not STEM.fullmatch(p.name))


def write_dataset(out: Path, n: int, seed: int = 0, sparse: bool = False, cells: bool = False,
                  ct: bool = False, faint: bool = False, instances: bool = False) -> None:
    """Writes OUT/images/*.jpg and OUT/annotations/trimaps/*.png (Oxford-IIIT Pet layout), replacing
    an earlier synthetic set there (a smaller set must not keep the earlier one's extra samples).
    Refuses (ValueError) a folder holding other files: they would be mixed into the set.
    sparse: small pets on SPARSE_SIZE x SPARSE_SIZE images (`make_sample`); cells: EM-like slices
    (`make_cells`, faint membranes with `faint`), written as PNG; with `instances` their instance
    label images instead of trimaps, as 16-bit PNG in OUT/masks (the folders layout, for convert
    --classes instances); ct: CT-like slices (`make_ct`), written as int16 .npy arrays."""
    out = Path(out)
    other = foreign_files(out)
    if other:
        raise ValueError(f"{out} holds files this command did not write (such as {other[0]}): synthetic samples "
                         "would be mixed into them; give a new folder")
    masks = out / "masks" if instances else out / "annotations" / "trimaps"
    for folder in (out / "images", out / "annotations" / "trimaps", out / "masks"):
        if folder.is_dir():  # an earlier set's files, and the folder of its masks if they were of the other kind
            for p in folder.iterdir():
                p.unlink()
            if folder not in (out / "images", masks):
                folder.rmdir()
    for folder in (out / "images", masks):
        folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        if cells:
            image, trimap = make_cells(rng, faint=faint, instances=instances)
        elif ct:
            image, trimap = make_ct(rng)
        elif sparse:
            image, trimap = make_sample(rng, sparse=True, min_size=SPARSE_SIZE, max_size=SPARSE_SIZE)
        else:
            image, trimap = make_sample(rng)
        stem = f"synth_{i:05d}"
        if cells:  # lossless, as EM and microscopy images are kept
            Image.fromarray(image).save(out / "images" / f"{stem}.png")
        elif ct:  # Hounsfield units, which no 8-bit image holds
            np.save(out / "images" / f"{stem}.npy", image)
        else:
            Image.fromarray(image).save(out / "images" / f"{stem}.jpg", quality=92)
        Image.fromarray(trimap).save(masks / f"{stem}.png")
