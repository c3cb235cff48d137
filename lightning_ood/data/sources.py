"""Raw image sources that need no network. Each builder returns a :class:`RawSet` and is deterministic.

Offline sources (the data ships with packages installed on the machine):

- ``fashionmnist``: the IDX files, read by :func:`read_idx` from, in order, ``<root>/fashion-mnist/``,
  ``<root>/FashionMNIST/raw/``, ``<root>``, then the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``). 60 000 train / 10 000 test images, 28x28 grey, 10 classes.
- ``digits``: :func:`sklearn.datasets.load_digits`, 1797 8x8 grey digits, values 0-16 scaled to 0-255.
- ``faces``: :func:`skimage.data.lfw_subset`, 200 25x25 grey crops of LFW photographs (100 faces, then 100
  non-face patches from the same photographs).
- ``textures``: seeded random crops of scikit-image's ``brick``, ``grass`` and ``gravel`` (grey).
- ``photos``: seeded random crops of the bundled photographs ``astronaut``, ``camera``, ``coffee``,
  ``chelsea``, ``rocket``, ``hubble_deep_field`` and the left view of ``stereo_motorcycle`` (RGB).
- ``aux_photos``: auxiliary outliers for methods that train with outliers, disjoint from every test set above:
  seeded random crops of ``coins``, ``moon``, ``page``, ``text``, ``horse``, ``clock``, ``retina``,
  ``immunohistochemistry``, ``cell``, ``microaneurysms``, ``shepp_logan_phantom``, ``colorwheel`` and
  ``checkerboard`` (RGB). Not the right view of ``stereo_motorcycle``: it is the twin of a ``photos`` image.
- ``gaussian`` / ``uniform``: i.i.d. pixel noise, N(127.5, 64²) clipped to [0, 255], or uniform on {0..255}.

Crops: a square of side ``u * min(H, W)`` with ``u ~ U(scale)`` (at least ``min(crop_size, H, W)`` pixels)
at a random position of a uniformly chosen image, resized to ``crop_size``. A crop's label is the index of the
image it comes from. The generated sets draw from their own ``seed`` option (default 0), so a test set is
the same in every run whatever the run's seed.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Where installed Fashion-MNIST packages put the IDX files (Debian/Ubuntu ``dataset-fashion-mnist``).
SYSTEM_FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
TEXTURE_IMAGES = ("brick", "grass", "gravel")
PHOTO_IMAGES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "motorcycle_left")
AUX_IMAGES = (
    "coins", "moon", "page", "text", "horse", "clock", "retina", "immunohistochemistry", "cell",
    "microaneurysms", "shepp_logan_phantom", "colorwheel", "checkerboard",
)  # fmt: skip
_FLAT_REDRAWS = 100
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class RawSet:
    """Images as they come from a source, before any channel/size conversion.

    Attributes:
        images: uint8 ``[N, H, W, C]`` array held in memory, or a list of N image files decoded on access.
        labels: int64 ``[N]`` class indices into ``class_names``; ``-1`` for an unlabelled source.
        class_names: one name per class (empty for an unlabelled source).
    """

    images: np.ndarray | list[Path]
    labels: np.ndarray
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.images)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format, gzipped when the name ends in ``.gz``) of unsigned bytes.

    Returns:
        uint8 array of the shape stored in the header, e.g. ``[N, 28, 28]`` for images, ``[N]`` for labels.
    """
    path = Path(path)
    with gzip.open(path) if path.suffix == ".gz" else open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but the file holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def fashion_mnist_dirs(root: str | None) -> list[Path]:
    """The folders searched for Fashion-MNIST IDX files, in order."""
    dirs = [Path(root) / "fashion-mnist", Path(root) / "FashionMNIST" / "raw", Path(root)] if root else []
    return [*dirs, *SYSTEM_FASHION_MNIST_DIRS]


def _find_idx(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)


def find_fashion_mnist(root: str | None, split: str) -> tuple[Path, Path] | None:
    """The ``(images, labels)`` IDX files of ``split`` in the first folder that has both, else ``None``."""
    for folder in fashion_mnist_dirs(root):
        files = [_find_idx(folder, stem) for stem in _IDX_FILES[split]]
        if files[0] is not None and files[1] is not None:
            return files[0], files[1]
    return None


def fashion_mnist(split: str, root: str | None = None) -> RawSet:
    """Fashion-MNIST ``split`` ("train" or "test") from local IDX files; see the module docstring."""
    found = find_fashion_mnist(root, split)
    if found is None:
        places = "\n".join(f"  - {d}" for d in fashion_mnist_dirs(root))
        stems = ", ".join(f"{s}.gz" for s in _IDX_FILES[split])
        raise FileNotFoundError(
            f"Fashion-MNIST ({split}) not found: looked for {stems} in\n{places}\n"
            "Get it with one of: `apt-get install dataset-fashion-mnist`; set `download: true` and a `root` "
            "(downloaded by prepare_data through torchvision); or put the IDX files in `root`."
        )
    images, labels = (read_idx(p) for p in found)
    if images.ndim != 3 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST files {found} hold {images.shape} images and {labels.shape} labels")
    return RawSet(images[..., None], labels.astype(np.int64), FASHION_MNIST_CLASSES)


def prepare_fashion_mnist(split: str, root: str | None = None, download: bool = False) -> None:
    """Download Fashion-MNIST into ``<root>/FashionMNIST/raw`` with torchvision when it is nowhere local."""
    if find_fashion_mnist(root, split) is not None or not download:
        return
    if root is None:
        raise ValueError("data.download=true needs data.root: the folder to download Fashion-MNIST into")
    from torchvision.datasets import FashionMNIST

    FashionMNIST(root, train=split == "train", download=True)


def digits() -> RawSet:
    """sklearn's 1797 8x8 handwritten digits, 10 classes, values 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return RawSet(images, bunch.target.astype(np.int64), tuple(str(c) for c in bunch.target_names))


def faces() -> RawSet:
    """scikit-image's LFW subset: 200 25x25 grey images (100 faces, then 100 non-face patches), unlabelled."""
    from skimage.data import lfw_subset

    images = np.rint(lfw_subset() * 255.0).astype(np.uint8)[..., None]
    return RawSet(images, np.full(len(images), -1, dtype=np.int64))


def _skimage_image(name: str) -> np.ndarray:
    """A bundled scikit-image image as uint8 ``[H, W, C]`` (alpha dropped)."""
    from skimage import data
    from skimage.util import img_as_ubyte

    image = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    image = img_as_ubyte(image)
    return (image[..., None] if image.ndim == 2 else image)[..., :3]


def random_crops(
    images: Sequence[np.ndarray], n: int, crop_size: int, scale: Sequence[float], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded random square crops of uint8 ``[H, W, C]`` ``images`` (equal C), resized to ``crop_size``.

    A flat crop (one colour everywhere) is drawn again from a generator of its own (``seed``, crop index,
    attempt), so every other crop is the one the main generator gives: flat crops carry nothing of their
    image, and a black or white square would equal the flat images of other sets.

    Returns:
        uint8 ``[n, crop_size, crop_size, C]`` crops and int64 ``[n]`` indices of the image each came from.
    """
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {list(scale)}")
    rng = np.random.default_rng(seed)
    which = rng.integers(len(images), size=n)
    crops = np.empty((n, crop_size, crop_size, images[0].shape[2]), dtype=np.uint8)
    for i, k in enumerate(which):
        crops[i] = _crop(images[k], crop_size, scale, rng)
        for attempt in range(_FLAT_REDRAWS):  # flat: one colour, nothing of its image (e.g. black sky)
            if (crops[i] != crops[i, :1, :1]).any():
                break
            crops[i] = _crop(images[k], crop_size, scale, np.random.default_rng([seed, i, attempt]))
        else:
            raise ValueError(
                f"image {k} of {len(images)} gave only flat (single-colour) crops in {_FLAT_REDRAWS + 1} "
                f"draws; raise the crop scale (got {list(scale)}) or leave the image out"
            )
    return crops, which.astype(np.int64)


def _crop(image: np.ndarray, crop_size: int, scale: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """One random square crop of uint8 ``[H, W, C]`` ``image``, resized to ``crop_size``."""
    height, width = image.shape[:2]
    short = min(height, width)
    side = max(int(rng.uniform(scale[0], scale[1]) * short), min(crop_size, short))
    top, left = rng.integers(height - side + 1), rng.integers(width - side + 1)
    patch = image[top : top + side, left : left + side]
    patch = Image.fromarray(patch[..., 0] if patch.shape[2] == 1 else patch)
    return np.asarray(patch.resize((crop_size, crop_size), Image.BILINEAR)).reshape(crop_size, crop_size, -1)


def _crop_source(names: tuple[str, ...]) -> Callable[..., RawSet]:
    def build(
        n: int = 2000, crop_size: int = 32, scale: tuple[float, float] = (0.1, 0.5), seed: int = 0
    ) -> RawSet:
        images = [_skimage_image(name) for name in names]
        if len({im.shape[2] for im in images}) > 1:  # mixed grey and RGB: make every image RGB
            images = [np.repeat(im, 3, axis=2) if im.shape[2] == 1 else im for im in images]
        crops, labels = random_crops(images, n, crop_size, scale, seed)
        return RawSet(crops, labels, names)

    build.__doc__ = f"Seeded random crops of scikit-image's {', '.join(names)}; labelled by source image."
    return build


textures = _crop_source(TEXTURE_IMAGES)
photos = _crop_source(PHOTO_IMAGES)
aux_photos = _crop_source(AUX_IMAGES)


def gaussian(n: int = 2000, size: int = 32, channels: int = 3, seed: int = 0) -> RawSet:
    """``n`` images of i.i.d. N(127.5, 64²) pixels, clipped to [0, 255]; unlabelled."""
    pixels = np.random.default_rng(seed).normal(127.5, 64.0, size=(n, size, size, channels))
    return RawSet(np.rint(pixels.clip(0, 255)).astype(np.uint8), np.full(n, -1, dtype=np.int64))


def uniform(n: int = 2000, size: int = 32, channels: int = 3, seed: int = 0) -> RawSet:
    """``n`` images of i.i.d. pixels uniform on {0, ..., 255}; unlabelled."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    return RawSet(pixels, np.full(n, -1, dtype=np.int64))
