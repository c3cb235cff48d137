"""Heatmap decoder maths against independent references: shapes, the loss and the score written out by hand, the
exact nearest-neighbour targets against brute force, and the held-out split of the auxiliary outliers."""

import itertools

import numpy as np
import pytest
import torch

from lightning_ood.data.datasets import ImageDataset
from lightning_ood.data.outliers import split_outliers
from lightning_ood.detectors.knn import nearest_euclidean
from lightning_ood.methods.heatmap_search import NO_ROW, merge_nearest, nearest_in_share, same_class_nearest
from lightning_ood.methods.heatmap_targets import (
    CACHE_LIMIT_BYTES,
    OutlierTargets,
    cache_outputs,
    id_image_reader,
    pixel_keys,
)
from lightning_ood.nets.heatmap_decoder import (
    HeatmapDecoder,
    heatmap_loss,
    heatmap_score,
    to_unit_range,
    upsampling_plan,
)


@pytest.mark.parametrize(("size", "channels"), [(28, 1), (32, 3), (16, 1), (27, 3), (5, 1), (64, 3)])
def test_decoder_output_has_the_input_size_and_channels(size: int, channels: int) -> None:
    decoder = HeatmapDecoder(12, 4, size, channels, latent_dim=8, width=4).eval()
    h = decoder(torch.rand(3, 12), torch.tensor([0, 3, 1]))
    assert h.shape == (3, channels, size, size)
    assert h.abs().max() < 1  # tanh
    start, ups = upsampling_plan(size)
    assert start * 2**ups >= size and (ups == 0 or start >= 4)


def test_decoder_reads_the_class() -> None:
    torch.manual_seed(0)
    decoder = HeatmapDecoder(6, 3, 8, 1, latent_dim=8, width=4).eval()
    z = torch.rand(1, 6).repeat(3, 1)
    h = decoder(z, torch.tensor([0, 1, 2]))
    assert not torch.allclose(h[0], h[1]) and not torch.allclose(h[1], h[2])


def test_loss_equals_the_formula_written_out() -> None:
    """sum over pixels of (1 + 5|t|)(x + h - t)^2 per image, element by element."""
    gen = torch.Generator().manual_seed(0)
    x, h, t = (torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64) * 2 - 1 for _ in range(3))
    expected = []
    for b in range(2):
        total = 0.0
        for c, i, j in itertools.product(range(3), range(4), range(5)):
            xv, hv, tv = float(x[b, c, i, j]), float(h[b, c, i, j]), float(t[b, c, i, j])
            total += (1 + 5 * abs(tv)) * (xv + hv - tv) ** 2
        expected.append(total)
    assert torch.allclose(heatmap_loss(x, h, t), torch.tensor(expected, dtype=torch.float64), rtol=1e-12)
    assert heatmap_loss(t, torch.zeros_like(t), t).abs().max() == 0  # an ID image with a zero heatmap


def test_score_is_the_pixel_mean_of_the_channel_max_magnitude() -> None:
    h = np.random.default_rng(0).uniform(-1, 1, size=(4, 3, 6, 7))
    expected = [np.mean([[max(abs(h[b, c, i, j]) for c in range(3)) for j in range(7)] for i in range(6)])
                for b in range(4)]  # fmt: skip
    np.testing.assert_allclose(heatmap_score(torch.from_numpy(h)).numpy(), expected, rtol=1e-12)


def test_unit_range_from_any_normalisation() -> None:
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    normalised = (pixels - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    assert torch.allclose(to_unit_range(normalised, mean, std), pixels * 2 - 1, atol=1e-6)


def _brute_force_nearest(q: np.ndarray, bank: np.ndarray) -> np.ndarray:
    d = ((q[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
    return d.argmin(axis=1)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_nearest_euclidean_is_exact(chunk: int) -> None:
    rng = np.random.default_rng(1)
    q, bank = rng.normal(size=(33, 5)), rng.normal(size=(50, 5))
    got = nearest_euclidean(torch.from_numpy(q).float(), torch.from_numpy(bank).float(), chunk)
    np.testing.assert_array_equal(
        got.numpy(), _brute_force_nearest(q.astype(np.float32), bank.astype(np.float32))
    )


def test_nearest_euclidean_ties_go_to_the_lowest_row() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    got = nearest_euclidean(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]]), bank, chunk_size=2)
    assert got.tolist() == [0, 3, 0]


@pytest.mark.parametrize("chunk", [3, 8192])
def test_same_class_nearest_matches_brute_force(chunk: int) -> None:
    """Each outlier's target: the nearest ID row among those predicted as the outlier's predicted class."""
    rng = np.random.default_rng(2)
    bank, bank_cls = rng.normal(size=(60, 4)), rng.integers(0, 3, size=60)
    q, q_cls = rng.normal(size=(25, 4)), rng.integers(0, 3, size=25)
    got = same_class_nearest(
        torch.from_numpy(q),
        torch.from_numpy(q_cls),
        torch.from_numpy(bank),
        torch.from_numpy(bank_cls),
        chunk,
    )
    for i in range(25):
        rows = np.flatnonzero(bank_cls == q_cls[i])
        assert got[i] == rows[_brute_force_nearest(q[i : i + 1], bank[rows])[0]]
        assert bank_cls[got[i]] == q_cls[i]


def test_a_class_without_id_images_falls_back_to_every_class() -> None:
    bank, bank_cls = torch.tensor([[0.0], [5.0]]), torch.tensor([0, 0])
    with pytest.warns(UserWarning, match=r"class\(es\) \[1\]"):
        got = same_class_nearest(torch.tensor([[4.0]]), torch.tensor([1]), bank, bank_cls)
    assert got.tolist() == [1]


def test_merge_takes_the_least_distance_and_ties_go_to_the_lowest_dataset_row() -> None:
    inf = float("inf")
    distances = torch.tensor([[1.0, 2, inf, 0], [1, 1, 3, 0], [0.5, 2, 3, 0]], dtype=torch.float64)
    indices = torch.tensor([[9, 4, NO_ROW, 7], [3, 8, 5, 2], [20, 1, 6, 11]])  # [W = 3 shares, Q = 4 queries]
    assert merge_nearest(distances, indices).tolist() == [20, 8, 5, 2]
    gen = torch.Generator().manual_seed(0)  # many ties: small integer distances, rows dealt to the shares
    distances = torch.randint(0, 3, (4, 50), generator=gen).double()
    indices = torch.randperm(200, generator=gen).view(4, 50)
    expected = [min(zip(distances[:, q].tolist(), indices[:, q].tolist(), strict=True))[1] for q in range(50)]
    assert merge_nearest(distances, indices).tolist() == expected
    with pytest.raises(RuntimeError, match="no ID training image on any rank"):
        merge_nearest(torch.full((2, 1), inf, dtype=torch.float64), torch.full((2, 1), NO_ROW))


@pytest.mark.parametrize("chunk", [2, 8192])
def test_searching_shares_and_merging_equals_the_whole_bank(chunk: int) -> None:
    """The search as DDP ranks run it, here in one process: the bank dealt to 4 shares (one empty), each
    searched, merged; with exact ties (rows duplicated on other shares, ties to the lower row) and a class that
    no bank row has (any class)."""
    gen = torch.Generator().manual_seed(3)
    bank = torch.randint(0, 4, (40, 3), generator=gen).double()
    bank[20:] = bank[:20]  # rows j and j + 20 on other shares: ties go to j
    bank_cls = torch.randint(0, 3, (20,), generator=gen).repeat(2)
    queries = torch.cat([bank[20:30], torch.randint(0, 4, (15, 3), generator=gen).double()])
    query_cls = torch.cat(
        [bank_cls[20:30], torch.randint(0, 4, (15,), generator=gen)]
    )  # class 3: no bank row
    with pytest.warns(UserWarning, match=r"class\(es\) \[3\]"):
        whole = same_class_nearest(queries, query_cls, bank, bank_cls, chunk)
    assert (whole[:10] == torch.arange(10)).all() and (query_cls == 3).any()
    present, parts = bank_cls.unique(), []
    shares = [torch.arange(0, 40, 4), torch.arange(1, 40, 4), torch.arange(2, 40, 4).repeat_interleave(2)]
    shares[2][1::2] += 1  # 2, 3, 6, 7, ...: ascending rows, not interleaved
    for rows in [*shares, torch.zeros(0, dtype=torch.long)]:  # and an empty share
        parts.append(nearest_in_share(queries, query_cls, bank[rows], bank_cls[rows], rows, present, chunk))
    merged = merge_nearest(torch.stack([d for d, _ in parts]), torch.stack([i for _, i in parts]))
    assert merged.tolist() == whole.tolist()


def test_the_output_cache_is_automatic_below_the_limit(caplog) -> None:
    assert cache_outputs(None, 100, 20, 512, 10) and cache_outputs(True, 10**7, 10**5, 2048, 1000)
    assert not cache_outputs(False, 100, 20, 512, 10)
    n = CACHE_LIMIT_BYTES // (4 * 3000)  # (n + m) x (D + K) x 4 bytes just at, then above, the limit
    assert cache_outputs(None, n - 10, 10, 2000, 1000)
    with caplog.at_level("INFO"):
        assert not cache_outputs(None, n - 10, 11, 2000, 1000)
    assert "not caching the classifier's outputs" in caplog.text and str(n - 10) in caplog.text


def test_targets_are_looked_up_by_content() -> None:
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    uint8 = torch.randint(0, 256, (4, 1, 3, 3), dtype=torch.uint8)
    normalised = (uint8.float() / 255 - mean) / std
    id_train = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 3, 3)
    targets = OutlierTargets(
        rows=torch.tensor([7, 3, 9, 3]),  # outlier i's target: ID training image rows[i]
        index={k: i for i, k in enumerate(pixel_keys(normalised, mean, std))},
        read=id_image_reader(id_train),
    )
    picked = targets.lookup(
        pixel_keys(normalised[[2, 0, 3]].half(), mean, std)
    )  # any precision gives the same keys
    assert picked.shape == (3, 1, 3, 3) and picked[:, 0, 0, 0].tolist() == [9, 7, 3]
    shifted = normalised.roll(1, dims=-1)  # an augmented outlier is not among the precomputed ones
    with pytest.raises(RuntimeError, match="aux_transforms: \\[\\]"):
        targets.lookup(pixel_keys(shifted[:1], mean, std))


def test_target_images_are_read_from_files_as_from_memory(tmp_path) -> None:
    """A file-backed ID training set gives the target images a tensor of the same images gives (decoded per
    batch instead of kept)."""
    from PIL import Image

    from lightning_ood.data.datasets import LazyImages

    images = torch.randint(
        0, 256, (5, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(image[0].numpy(), mode="L").save(files[-1])
    rows = torch.tensor([4, 0, 4, 2])
    from_files = id_image_reader(LazyImages(files, channels=1, size=6))(rows)
    assert torch.equal(from_files, images[rows]) and torch.equal(id_image_reader(images)(rows), images[rows])


def test_held_out_outliers_are_disjoint_from_training_outliers() -> None:
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    aux = ImageDataset(images, torch.full((40,), -1), augment=lambda x: x + 100)
    parts = split_outliers(aux, 0.25, seed=0)
    train = {int(parts["aux"][i][0]) - 100 for i in range(len(parts["aux"]))}  # augmented
    val = {int(parts["aux_val"][i][0]) for i in range(len(parts["aux_val"]))}  # not augmented
    assert len(val) == 10 and len(train) == 30 and not train & val and train | val == set(range(40))
    assert [int(parts["aux_all"][i][0]) for i in range(40)] == list(range(40))
    assert split_outliers(aux, 0.25, seed=0)["aux_val"].indices == parts["aux_val"].indices  # seeded
    assert len(split_outliers(aux, 0.0, seed=0)["aux_val"]) == 0
