"""lightning_ood.data.file_checks through the ``imagefolder`` source: every file is decoded once (in
``prepare_data``, or by ``setup`` when nothing is remembered), later builds only list the folder, a changed
folder or a damaged cache file is checked again, and unreadable files are still named."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from data_helpers import tiny  # tests/data_helpers.py
from PIL import Image

from lightning_ood.data import OODSetSpec, file_checks, sources_torchvision


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test only, so its files can be listed and damaged."""
    monkeypatch.setenv("LIGHTNING_OOD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "file_checks"


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every file PIL opens from now on (the check's decodes included), by path."""
    calls: list[str] = []
    real_open = Image.open

    def counting(fp, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(os.fspath(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return calls


def _folder(folder: Path, n: int = 4) -> list[Path]:
    rng = np.random.default_rng(n)
    files = [folder / f"img{i}.png" for i in range(n)]
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(f)
    return files


def _data(folder: Path, skip: bool = False):  # type: ignore[no-untyped-def]
    options = {"path": str(folder), "skip_unreadable": skip}
    return tiny(ood_sets=[OODSetSpec("mine", "imagefolder", "far", options=options)])


def test_prepare_data_decodes_each_file_once_and_setup_none(
    tmp_path: Path, cache: Path, opened: list[str]
) -> None:
    files = _folder(tmp_path / "images")
    dm = _data(tmp_path / "images")
    dm.prepare_data()
    assert sorted(opened) == sorted(map(str, files))  # each file once
    assert len(list(cache.glob("*.json"))) == 1
    opened.clear()
    dm.setup()
    assert opened == []  # setup lists the folder and reads the remembered result
    _data(tmp_path / "images").setup()  # a second start (another data module): nothing decoded either
    assert opened == [] and len(dm.test_dataloader()[1].dataset) == 4
    assert not sources_torchvision.check_imagefolder(str(tmp_path / "images"))  # remembered
    assert opened == []


def test_setup_without_prepare_data_checks_once(tmp_path: Path, cache: Path, opened: list[str]) -> None:
    files = _folder(tmp_path / "images")
    raw = sources_torchvision.imagefolder(str(tmp_path / "images"))  # no Trainer: the build checks itself
    assert sorted(opened) == sorted(map(str, files)) and raw.images == files
    opened.clear()
    assert sources_torchvision.imagefolder(str(tmp_path / "images")).images == files
    assert opened == []


def test_unreadable_files_are_named_from_the_remembered_result(
    tmp_path: Path, cache: Path, opened: list[str]
) -> None:
    files = _folder(tmp_path / "images")
    files[1].write_bytes(files[1].read_bytes()[:60])  # truncated
    dm = _data(tmp_path / "images")
    dm.prepare_data()  # records the failure; does not raise on local rank 0 alone
    opened.clear()
    for _ in range(2):  # every rank's setup, and a later start, fail alike without decoding anything
        with pytest.raises(
            OSError, match=r"(?s)1 of 4 image files cannot be read:.*img1\.png.*skip_unreadable"
        ):
            _data(tmp_path / "images").setup()
    assert opened == []
    with pytest.warns(UserWarning, match=r"(?s)left out 1 of 4 .*img1\.png"):
        raw = sources_torchvision.imagefolder(str(tmp_path / "images"), skip_unreadable=True)
    assert raw.images == [files[0], *files[2:]] and opened == []


@pytest.mark.parametrize("change", ["new file", "modified file", "removed file"])
def test_a_changed_folder_is_checked_again(
    tmp_path: Path, cache: Path, opened: list[str], change: str
) -> None:
    files = _folder(tmp_path / "images")
    sources_torchvision.imagefolder(str(tmp_path / "images"))
    opened.clear()
    if change == "new file":
        (tmp_path / "images" / "new.png").write_bytes(b"")
    elif change == "modified file":
        files[2].write_bytes(b"not a png")
    else:
        files[3].unlink()
    if change == "removed file":
        assert len(sources_torchvision.imagefolder(str(tmp_path / "images"))) == 3
        assert sorted(opened) == sorted(map(str, files[:3]))
        return
    name = "new.png" if change == "new file" else "img2.png"
    with pytest.raises(OSError, match=rf"(?s)1 of \d image files cannot be read:.*{name}"):
        sources_torchvision.imagefolder(str(tmp_path / "images"))
    assert str(tmp_path / "images" / name) in opened


def _damage(path: Path, how: str) -> None:
    record = json.loads(path.read_text())
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:25])
    elif how == "not json":
        path.write_bytes(b"\x00\xff garbage")
    elif how == "row out of range":  # the right key and count, but no such file
        path.write_text(json.dumps({**record, "problems": [[99, "bad"]]}))
    else:  # another set's result
        path.write_text(json.dumps({**record, "key": "0" * 40}))


@pytest.mark.parametrize("how", ["truncated", "not json", "row out of range", "another key"])
def test_a_damaged_cache_file_is_ignored_and_rewritten(
    tmp_path: Path, cache: Path, opened: list[str], how: str
) -> None:
    files = _folder(tmp_path / "images")
    sources_torchvision.imagefolder(str(tmp_path / "images"))
    (path,) = cache.glob("*.json")
    _damage(path, how)
    opened.clear()
    assert sources_torchvision.imagefolder(str(tmp_path / "images")).images == files  # not trusted: checked
    assert sorted(opened) == sorted(map(str, files))
    assert json.loads(path.read_text())["problems"] == []  # and rewritten, whole
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    opened.clear()
    sources_torchvision.imagefolder(str(tmp_path / "images"))
    assert opened == []


def test_a_failed_cache_write_warns_and_the_next_build_checks_again(
    tmp_path: Path, cache: Path, opened: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _folder(tmp_path / "images")

    def refuse(*args: object) -> None:
        raise OSError("read-only file system")

    monkeypatch.setattr(file_checks.os, "replace", refuse)
    for _ in range(2):
        with pytest.warns(UserWarning, match="not remembered .*read-only"):
            sources_torchvision.imagefolder(str(tmp_path / "images"))
    assert len(opened) == 2 * len(files) and not list(cache.glob("*"))  # no temporary file left


def test_ranks_that_list_other_files_fail_together(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _folder(tmp_path / "images")
    monkeypatch.setattr(file_checks, "distributed_world", lambda: (0, 3))
    monkeypatch.setattr(
        file_checks, "all_gather_objects", lambda mine: [mine, mine, ("another listing", None)]
    )
    with pytest.raises(
        RuntimeError, match=r"image folder .*images: ranks \[2\] list other files than rank 0"
    ):
        sources_torchvision.imagefolder(str(tmp_path / "images"))
