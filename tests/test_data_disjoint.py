"""lightning_ood.data.disjoint: no auxiliary outlier equals an image of a test set, compared by content."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import tiny  # tests/data_helpers.py
from lightning.pytorch.cli import LightningArgumentParser
from PIL import Image

from lightning_ood.data import AuxSetSpec, OODDataModule, OODSetSpec, sources
from lightning_ood.data.datasets import LazyImages
from lightning_ood.data.disjoint import check_aux_disjoint

CONFIGS = Path(__file__).parents[1] / "configs" / "data"


def _images(n: int, seed: int, channels: int = 1, size: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=generator)


def test_clashes_are_counted_per_test_set_and_every_set_is_named() -> None:
    aux = torch.cat([_images(6, 0), _images(6, 0)[:1]])  # 7 aux images, the first one twice
    id_test = torch.cat([_images(4, 1), aux[:2]])
    photos = torch.cat([aux[2:3], _images(3, 2)]).numpy()  # numpy arrays are accepted too
    with pytest.raises(ValueError) as err:
        check_aux_disjoint(aux, {"id": id_test, "photos": photos, "noise": _images(5, 3)})
    message = str(err.value)
    assert "3 of the 7 aux images equal images of the ID test set" in message  # the duplicate counts
    assert "1 of the 7 aux images equal images of OOD set 'photos'" in message
    assert "noise" not in message
    with pytest.raises(ValueError, match="1 of the 7 aux images equal images of OOD set 'photos'"):
        check_aux_disjoint(list(aux), {"photos": list(torch.from_numpy(photos))})  # decoded one at a time
    check_aux_disjoint(aux, {"noise": _images(5, 3)})  # disjoint: passes
    check_aux_disjoint(aux.numpy(), {"id": _images(5, 3).numpy()})


def test_images_of_another_shape_are_an_error() -> None:
    with pytest.raises(ValueError, match=r"OOD set 'x'.*\[3, 8, 8\].*aux.*\[1, 8, 8\]"):
        check_aux_disjoint(_images(2, 0), {"x": _images(2, 0, channels=3)})
    with pytest.raises(ValueError, match="uint8"):
        check_aux_disjoint(_images(2, 0).float(), {"x": _images(2, 0)})


def _write_grey_pngs(folder: Path, images: torch.Tensor, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{prefix}{i}.png")


def test_an_aux_folder_holding_copies_of_test_images_is_rejected(tmp_path: Path) -> None:
    dm = tiny()
    dm.setup()
    id_test, faces = (dl.dataset.images for dl in dm.test_dataloader()[:2])
    _write_grey_pngs(tmp_path / "aux", id_test[:3], "id")
    _write_grey_pngs(tmp_path / "aux", faces[5:7], "faces")
    _write_grey_pngs(tmp_path / "aux", _images(2, 0), "new")
    dm = tiny(aux_set=AuxSetSpec("imagefolder", options={"path": str(tmp_path / "aux")}))
    dm.setup()  # the aux set is built (and checked) when first asked for
    with pytest.raises(ValueError) as err:
        dm.aux_dataloader()
    message = str(err.value)
    assert message.startswith("aux_set (imagefolder)")
    assert "3 of the 7 aux images equal images of the ID test set" in message
    assert "2 of the 7 aux images equal images of OOD set 'faces'" in message


def _shipped(name: str, *overrides: str) -> OODDataModule:
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(OODDataModule, "data", subclass_mode=True)
    config = parser.parse_args(["--data", str(CONFIGS / f"{name}.yaml"), *overrides])
    return parser.instantiate(config).data


def test_shipped_aux_set_is_disjoint_from_every_offline_test_set(fmnist_root: str) -> None:
    # the offline sets at their full shipped sizes; Fashion-MNIST is the small fake one (its test images are
    # flat: image i is the constant i, so a flat aux crop would clash with it)
    for dm in (_shipped("fashionmnist", f"--data.init_args.root={fmnist_root}"), _shipped("digits_tiny")):
        dm.setup()
        assert len(dm.aux_dataloader().dataset) in (2000, 64)  # raises on a clash


def test_crop_sources_redraw_flat_crops() -> None:
    images = sources.aux_photos().images.reshape(2000, -1)
    assert (images.min(axis=1) < images.max(axis=1)).all()  # e.g. the black inside of `horse`
    half = np.zeros((64, 64, 1), dtype=np.uint8)
    half[:, 32:] = np.arange(32, dtype=np.uint8)[None, :, None]  # flat on the left, a ramp on the right
    crops, _ = sources.random_crops([half], 50, crop_size=8, scale=(0.1, 0.2), seed=0)
    assert all(crop.min() < crop.max() for crop in crops)
    with pytest.raises(ValueError, match=r"image 0 of 1 .*flat"):
        sources.random_crops([np.zeros((16, 16, 1), dtype=np.uint8)], 1, crop_size=8, scale=(0.5, 1), seed=0)


def test_decoded_digests_are_parallel_once_and_remembered_by_file(tmp_path: Path, monkeypatch) -> None:
    """Pixel digests of files (the side of a file set compared with an in-memory set): decoded by threads, once,
    then read back from the disk cache; a changed file is decoded again."""
    from lightning_ood.data import disjoint
    from lightning_ood.data.datasets import LazyImages

    files = []
    for i, image in enumerate(_images(6, 4, size=8)):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image[0].numpy()).save(files[-1])
    lazy = LazyImages(files, channels=1, size=8)
    expected = [disjoint._digest(lazy[i].numpy()) for i in range(len(lazy))]  # one at a time, no cache
    decoded = []
    original = LazyImages.__getitem__
    monkeypatch.setattr(LazyImages, "__getitem__", lambda self, i: decoded.append(i) or original(self, i))
    cache = tmp_path / "cache"

    def digests(images: LazyImages) -> list[bytes]:
        return [row.tobytes() for row in disjoint.image_digests(images, workers=3, cache_dir=cache)]

    assert digests(lazy) == expected and sorted(decoded) == list(range(6))
    assert digests(LazyImages(files, channels=1, size=8)) == expected and len(decoded) == 6  # from the cache
    assert (
        len(digests(LazyImages(files, channels=3, size=8))) == 6 and len(decoded) == 12
    )  # another conversion
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(files[2])  # a changed file is decoded again
    again = digests(lazy)
    assert decoded[12:] == [2] and again[2] != expected[2] and again[:2] == expected[:2]


def _png(path: Path, image: torch.Tensor, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[0].numpy(), mode="L").save(path, **options)
    return path


def test_two_file_sets_are_compared_by_their_bytes(tmp_path: Path) -> None:
    """Folder aux vs folder test set: a byte copy of a test file is caught under any name; the same picture
    re-encoded (other bytes) is not, by design; a different picture is not flagged. An in-memory test set
    holding the same pictures is compared by pixels, so there the re-encoded copy is caught too."""
    from lightning_ood.data.file_digests import file_digests

    pictures = _images(4, 7, size=8)
    test = [_png(tmp_path / "test" / f"t{i}.png", pictures[i]) for i in range(3)]
    aux = tmp_path / "aux"
    (aux / "copy.png").parent.mkdir()
    (aux / "copy.png").write_bytes(test[0].read_bytes())  # the same bytes, another name and folder
    _png(aux / "recoded.png", pictures[1], compress_level=0)  # the same pixels, other bytes
    _png(aux / "other.png", pictures[3])
    assert (aux / "recoded.png").read_bytes() != test[1].read_bytes()
    digests = file_digests([test[0], aux / "other.png"], cache_dir=tmp_path / "cache")
    reference = [
        hashlib.blake2b(f.read_bytes(), digest_size=16).digest() for f in (test[0], aux / "other.png")
    ]
    assert [row.tobytes() for row in digests] == reference  # BLAKE2b-128 of the file bytes
    dm = tiny(
        ood_sets=[OODSetSpec("folder", "imagefolder", options={"path": str(tmp_path / "test")})],
        aux_set=AuxSetSpec("imagefolder", options={"path": str(aux)}),
        image_size=8,
    )
    dm.setup()
    with pytest.raises(ValueError) as err:
        dm.aux_dataloader()
    assert "1 of the 3 aux images equal images of OOD set 'folder' (file bytes)" in str(err.value)
    files = LazyImages(sorted(aux.iterdir()), channels=1, size=8)
    with pytest.raises(ValueError, match=r"2 of the 3 aux images equal images of OOD set 'x' \(pixels after"):
        check_aux_disjoint(files, {"x": pictures[:3]}, cache_dir=tmp_path / "cache")  # in memory: pixels
    check_aux_disjoint(
        LazyImages([aux / "other.png"], 1, 8), {"x": LazyImages(test, 1, 8)}, cache_dir=tmp_path
    )


def test_the_digest_cache_is_reused_and_a_damaged_one_never_trusted(tmp_path: Path, monkeypatch) -> None:
    from lightning_ood.data import file_digests as module

    files = [_png(tmp_path / "files" / f"{i}.png", image) for i, image in enumerate(_images(5, 8, size=8))]
    reference = [hashlib.blake2b(f.read_bytes(), digest_size=16).digest() for f in files]
    hashed = []
    original = module.bytes_digest
    monkeypatch.setattr(module, "bytes_digest", lambda path: hashed.append(Path(path).name) or original(path))
    cache = tmp_path / "cache"

    def digests() -> list[bytes]:
        return [row.tobytes() for row in module.file_digests(files, cache_dir=cache, workers=2)]

    assert digests() == reference and sorted(hashed) == sorted(f.name for f in files)
    (written,) = cache.iterdir()  # one cache file, no temporary one left behind
    assert written.suffix == ".npz"
    assert digests() == reference and len(hashed) == 5  # the second call reads the cache, hashes nothing
    stat = files[3].stat()
    os.utime(files[3], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again, alone
    assert digests() == reference and hashed[5:] == ["3.png"]
    good = written.read_bytes()
    damaged = {
        "truncated": good[: len(good) // 2],
        "garbage": b"not a cache",
        "one byte flipped": good[:200] + bytes([good[200] ^ 1]) + good[201:],  # inside a stored array
        "empty": b"",
    }
    for name, content in damaged.items():
        written.write_bytes(content)
        before = len(hashed)
        assert digests() == reference, name
        assert len(hashed) == before + 5, name  # nothing of the damaged file was used
        assert written.read_bytes() != content, name  # and it was replaced by a complete one
    other = [*files[:4], files[0]]  # another set (other paths) never reads this set's cache
    assert module._cache_key(other, "bytes") != module._cache_key(files, "bytes")
    assert module._load(written, module._cache_key(other, "bytes"), 5) is None
    assert module._load(written, module._cache_key(files, "bytes"), 5) is not None
    monkeypatch.setattr(module.os, "replace", lambda *_: (_ for _ in ()).throw(OSError("read-only")))
    written.unlink()
    with pytest.warns(UserWarning, match="not remembered"):
        assert digests() == reference
    assert list(cache.iterdir()) == []  # a failed write leaves no partial file


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    from lightning_ood.data.file_digests import file_digests

    with pytest.raises(OSError, match=r"cannot hash the aux files \(1 files\): rank 0: FileNotFoundError"):
        file_digests([tmp_path / "gone.png"], cache_dir=tmp_path, what="aux files")
