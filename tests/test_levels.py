"""``max_prototypes="auto"``: the FINCH level chosen on held-out normal patches (clustering/levels.py)."""

from __future__ import annotations

import numpy as np
import pytest

from protoad_export.clustering.finch import finch, merge_to_count
from protoad_export.clustering.levels import chosen_level, conv_gflops, format_table, level_table
from protoad_export.options import AUTO_MARGIN
from protoad_export.clustering.prototypes import fit_prototypes
from protoad_export.errors import InputError


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _groups(rng, groups: int, dim: int) -> np.ndarray:
    """Well separated directions: the 'kinds of normal patch' a part has."""
    return _unit(rng.standard_normal((groups, dim)))


def _draw(rng, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    return _unit(centres[rng.integers(len(centres), size=n)] + spread * rng.standard_normal((n, centres.shape[1])))


def test_keeps_the_level_that_still_separates_the_kinds_of_normal_patch():
    # Level 0: 4 sub-prototypes per kind; level 1: one per kind (the right answer: merging sub-
    # prototypes costs little on unseen patches); level 2: pairs of kinds merged (a normal patch of
    # either kind is now far from every prototype).
    rng = np.random.default_rng(0)
    kinds = _groups(rng, 20, 32)
    fine = _unit(np.repeat(kinds, 4, axis=0) + 0.02 * rng.standard_normal((80, 32)))
    merged = _unit(kinds[0::2] + kinds[1::2])
    holdout = _draw(rng, fine, 4000, 0.1)  # unseen patches around the finest prototypes
    # floor=2: no paper's-rule floor at these sizes (it keeps levels at or finer than the first under it).
    rows = level_table([fine, kinds, merged], holdout, normalize=True, grid=(8, 8), cap=1000, margin=0.10, floor=2)
    assert [r.prototypes for r in rows] == [80, 20, 10]
    assert rows[0].excess == 0.0
    assert 0 < rows[1].excess <= 0.10 < rows[2].excess
    assert chosen_level(rows).level == 1
    assert rows[1].conv_gflops == pytest.approx(conv_gflops(20, 32, (8, 8)), abs=1e-3)
    assert sum(r.chosen for r in rows) == 1
    assert any("<- kept" in line and line.split()[1] == "20" for line in format_table(rows))

    # The cap is a hard speed budget (at most that many): with level 1 just over it, no qualifying
    # level is left and the finest within the cap is marked (its excess over the margin says so).
    assert chosen_level(level_table([fine, kinds, merged], holdout, normalize=True, grid=(8, 8), cap=20, margin=0.10,
                                    floor=2)).level == 1
    capped = level_table([fine, kinds, merged], holdout, normalize=True, grid=(8, 8), cap=19, margin=0.10, floor=2)
    assert chosen_level(capped).level == 2 and chosen_level(capped).excess > 0.10
    assert not capped[1].within_cap and capped[0].excess == 0.0  # level 0 is still the reference

    # A wider margin takes the coarser level, a zero margin the finest.
    levels = [fine, kinds, merged]
    assert chosen_level(level_table(levels, holdout, normalize=True, grid=(8, 8), margin=10.0, floor=2)).level == 2
    assert chosen_level(level_table(levels, holdout, normalize=True, grid=(8, 8), margin=0.0, floor=2)).level == 0
    # The paper's rule is the floor: never a level coarser than the first under it, however small its excess.
    assert chosen_level(level_table(levels, holdout, normalize=True, grid=(8, 8), margin=10.0, floor=50)).level == 1
    assert chosen_level(level_table(levels, holdout, normalize=True, grid=(8, 8), margin=10.0, floor=100)).level == 0


def test_auto_on_finch_stops_before_merging_distinct_kinds():
    rng = np.random.default_rng(1)
    kinds = _groups(rng, 24, 24)
    train = _draw(rng, kinds, 6000, 0.05)
    holdout = _draw(rng, kinds, 2000, 0.05)
    fit = fit_prototypes(train, "auto", normalize=True, method="exact", holdout_patches=holdout, grid=(4, 4), floor=2)
    kept = chosen_level(fit.levels)
    sizes = [r.prototypes for r in fit.levels]
    assert sizes == fit.finch.partition_sizes
    assert len(fit.prototypes) == kept.prototypes
    # Every kind keeps a prototype of its own; the next coarser level (if any) does not.
    assert kept.prototypes >= 24
    if kept.level + 1 < len(sizes):
        assert sizes[kept.level + 1] < 24 or fit.levels[kept.level + 1].excess > AUTO_MARGIN
    nearest = (holdout @ fit.prototypes.T).max(axis=1)
    assert np.mean(1 - nearest) <= (1 + AUTO_MARGIN) * fit.levels[0].mean_distance + 1e-9


def test_auto_needs_held_out_patches_and_a_sane_margin():
    rng = np.random.default_rng(2)
    x = _draw(rng, _groups(rng, 4, 8), 200, 0.1)
    with pytest.raises(InputError, match="held-out normal patches"):
        fit_prototypes(x, "auto", holdout_patches=None)
    with pytest.raises(InputError, match="'auto' or an integer"):
        fit_prototypes(x, "many")
    with pytest.raises(InputError, match="margin"):
        level_table([x[:50]], x[:10], normalize=True, grid=(1, 1), margin=float("nan"))


def test_a_build_with_auto_prints_and_records_the_level_table(tmp_path):
    from protoad_export.build.pipeline import BuildConfig, build
    from protoad_export.data.images import Preprocessing
    from protoad_export.data.synthetic import DatasetSpec, make_dataset

    data = make_dataset(tmp_path / "parts", seed=3, spec=DatasetSpec(train=12, test_good=1, test_per_defect=1, width=96, height=64))
    prep = Preprocessing(resize=64, crop=64, mode="squash")
    logged: list[str] = []
    config = BuildConfig(backbone="efficientnet_lite0", batch_size=8, preprocessing=prep, holdout=0.25)  # auto: the default
    manifest = build(data, "auto", tmp_path / "out", config, log=logged.append, progress=False).manifest
    selection = manifest["prototypes"]["selection"]
    levels = selection["levels"]
    kept = [row for row in levels if row["chosen"]]
    assert len(kept) == 1 and kept[0]["prototypes"] == manifest["prototypes"]["count"]
    assert [row["prototypes"] for row in levels] == manifest["finch"]["partition_sizes"]
    assert selection["rule"] == "auto" and selection["margin"] == AUTO_MARGIN and selection["holdout_patches"] > 0
    # The other "auto" choices, resolved and explained: one image size -> a camera's frames.
    assert manifest["choices"]["input"] == {"requested": "auto", "reason": "one image size: a camera's frames", "chosen": "frames"}
    assert manifest["choices"]["resize_mode"] == {"requested": "squash"}
    assert levels[0]["excess"] == 0.0 and all(row["conv_gflops"] >= 0 for row in levels)
    table = [line.strip() for line in logged if "<- kept" in line]
    assert len(table) == 1 and table[0].split()[1] == f"{kept[0]['prototypes']:,}"

    # Without a hold-out the paper's rule is used, and the build says so.
    logged.clear()
    config = BuildConfig(backbone="efficientnet_lite0", batch_size=8, preprocessing=prep, max_prototypes="auto", holdout=0.0)
    manifest = build(data, "paper", tmp_path / "out", config, log=logged.append, progress=False).manifest
    assert manifest["prototypes"]["selection"] == {"rule": "first partition under max_prototypes", "max_prototypes": 10_000}
    assert any(line.startswith("warning: no held-out images to choose the FINCH level on (built with --holdout 0)")
               for line in logged)


def _union_find_merge(neighbours, similarity, count):
    """The definition, one link at a time: strongest first, stop at ``count`` clusters."""
    parent = list(range(len(neighbours)))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    left = len(neighbours)
    for i in np.argsort(-similarity, kind="stable"):
        if left <= count:
            break
        a, b = root(int(i)), root(int(neighbours[i]))
        if a != b:
            parent[a] = b
            left -= 1
    return np.array([root(i) for i in range(len(neighbours))]), left


def _same_partition(a, b):
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_merge_to_count_merges_the_strongest_first_neighbour_links_first():
    # 0<->1 (0.9), 2<->3 (0.8), 5->4 (0.6), 4->3 (0.3): FINCH's next level is {0,1}, {2,3,4,5}.
    nn = np.array([1, 0, 3, 2, 3, 4])
    sim = np.array([0.9, 0.9, 0.8, 0.8, 0.3, 0.6], dtype=np.float32)
    expected = {6: [0, 1, 2, 3, 4, 5], 5: [0, 0, 1, 2, 3, 4], 4: [0, 0, 1, 1, 2, 3], 3: [0, 0, 1, 1, 2, 2],
                2: [0, 0, 1, 1, 1, 1]}
    for count, labels in expected.items():
        got, k = merge_to_count(nn, sim, count)
        assert k == count and _same_partition(got, np.array(labels)), count
    assert merge_to_count(nn, sim, 10)[1] == 6  # nothing to merge
    assert merge_to_count(nn, sim, 1)[1] == 2  # the links reach no further than the next level

    rng = np.random.default_rng(5)
    n = 400
    nn = rng.integers(n - 1, size=n)
    nn[nn >= np.arange(n)] += 1  # never a point's own neighbour
    sim = rng.random(n).astype(np.float32)
    full = merge_to_count(nn, sim, 0)
    for count in (399, 250, 120, full[1] + 1):
        got, k = merge_to_count(nn, sim, count)
        reference, left = _union_find_merge(nn, sim, count)
        assert k == left == count and _same_partition(got, reference)
        # Between the level and the next: each merged cluster lies inside one of the next level's.
        assert len(set(zip(got.tolist(), full[0].tolist()))) == k


def test_auto_uses_the_whole_cap_when_no_level_within_it_is_close_enough():
    rng = np.random.default_rng(6)
    kinds = _groups(rng, 30, 16)
    train, holdout = _draw(rng, kinds, 3000, 0.3), _draw(rng, kinds, 500, 0.3)
    sizes = finch(train, stop_below=None, method="exact").partition_sizes  # the whole hierarchy
    cap = (sizes[0] + sizes[1]) // 2
    fit = fit_prototypes(train, "auto", normalize=True, method="exact", holdout_patches=holdout, grid=(4, 4),
                         cap=cap, margin=0.0, floor=2)
    kept = chosen_level(fit.levels)
    assert kept.to_cap and kept.name == "0-1" and kept.prototypes == cap == len(fit.prototypes)
    assert [r.name for r in fit.levels][:3] == ["0", "0-1", "1"] and sum(r.chosen for r in fit.levels) == 1
    # Between the two levels, on the unseen patches too.
    assert fit.levels[0].mean_distance < kept.mean_distance < fit.levels[2].mean_distance
    # The prototypes are the (re-normalised) means of the training patches under the kept labels.
    means = np.stack([train[fit.finch.labels == c].mean(axis=0) for c in range(cap)])
    np.testing.assert_allclose(fit.prototypes, _unit(means), atol=1e-5)
    table = format_table(fit.levels)
    assert any(line.split()[0] == "0-1" and "<- kept" in line and "merged to the cap" in line for line in table)
    assert fit.levels[1].to_dict()["name"] == "0-1"
