"""mlic_dist.data: both loaders on tiny shards (CPU; DALI with device_id=None)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mlic_dist.config import DataConfig
from mlic_dist.data import ShardDataError, build_loader, read_manifest
from mlic_dist.config.choices import MEAN_STD
from mlic_dist.data.batch import labels_to_targets
from mlic_dist.data.labels import read_split_labels
from mlic_dist.data.mixup import mixup_pairs, or_mixup
from mlic_dist.config.choices import NAMES as PRESET_NAMES
from shard_fixtures import build_small_shards, garble_sample, truncate_shard

LOADERS = ["dali", "torch"]
SIZE = 32


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    # train shards 7,7,7,7,7,5 (uneven), val/test 7,5; some -1 labels
    return build_small_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def one_shard(tmp_path_factory):
    # a single shard per split: fewer shards than ranks x workers
    return build_small_shards(tmp_path_factory.mktemp("data1"), samples_per_shard=1000)


@pytest.fixture(scope="session")
def labels(shards):
    return {s: read_split_labels(shards, s)[1] for s in ("train", "val")}


def cfg(shards, loader, **kw):
    base = dict(shards=str(shards), size=SIZE, loader=loader, batch_size_per_gpu=4,
                eval_batch_size_per_gpu=5, num_workers=2, shuffle_buffer=64)
    base.update(kw)
    return DataConfig(**base)


def run_epoch(c, split, train, rank=0, world=1, epoch=0, seed=0):
    loader = build_loader(c, split, train=train, rank=rank, world_size=world, device="cpu", seed=seed)
    loader.set_epoch(epoch)
    return loader, list(loader)


def by_id(batches):
    out = {}
    for b in batches:
        for k, i in enumerate(b.ids.tolist()):
            if i >= 0:
                out[i] = (b.images[k], b.targets[k], b.mask[k])
    return out


# ----------------------------------------------------------------------------- manifest

def test_read_manifest(shards, tmp_path):
    m = read_manifest(shards)
    assert m.classes == ("c0", "c1", "c2", "c3")
    tr = m.split("train")
    assert tr.num_samples == 40 and [s.num_samples for s in tr.shards] == [7, 7, 7, 7, 7, 5]
    assert [s.first_id for s in tr.shards] == [0, 7, 14, 21, 28, 35]
    with pytest.raises(ValueError, match="'nope'.*\\['test', 'train', 'val'\\]"):
        m.split("nope")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "val-000001.idx").unlink()
    with pytest.raises(FileNotFoundError, match="val-000001.idx.*'val'"):
        read_manifest(broken)


# ----------------------------------------------------------------------------- presets

@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("augment", PRESET_NAMES)
def test_preset_batches(shards, loader, augment):
    c = cfg(shards, loader, augment=augment)
    lo, hi = [(0 - m) / s for m, s in zip(*MEAN_STD["imagenet"])], [(255 - m) / s for m, s in zip(*MEAN_STD["imagenet"])]
    for epoch in (0, 1):
        ld, batches = run_epoch(c, "train", True, epoch=epoch)
        assert len(batches) == len(ld) == 10 and ld.num_samples == 40
        for b in batches:
            assert b.images.shape == (4, 3, SIZE, SIZE) and b.images.dtype == torch.float32
            assert b.images.is_contiguous(memory_format=torch.channels_last)
            assert b.targets.shape == b.mask.shape == (4, 4) and b.targets.dtype == b.mask.dtype == torch.float32
            assert b.ids.dtype == torch.int64 and ((b.ids >= 0) & (b.ids < 40)).all()
            assert set(b.targets.unique().tolist()) <= {0.0, 1.0} and set(b.mask.unique().tolist()) <= {0.0, 1.0}
            for ch in range(3):
                assert b.images[:, ch].min() >= lo[ch] - 1e-4 and b.images[:, ch].max() <= hi[ch] + 1e-4
        ids = torch.cat([b.ids for b in batches])
        assert len(set(ids.tolist())) == 40   # one rank, 40 samples, 10 full batches: each once


def test_half_normalisation(shards):
    _, batches = run_epoch(cfg(shards, "dali", normalize="half"), "val", False)
    x = torch.cat([b.images for b in batches])
    assert x.min() >= -1 - 1e-6 and x.max() <= 1 + 1e-6 and x.min() < -0.3 and x.max() > 0.3


@pytest.mark.parametrize("loader", LOADERS)
def test_m0_train_is_the_eval_squash(shards, loader):
    """M0 = squash resize only: a train image equals the eval image of the same id."""
    _, tr = run_epoch(cfg(shards, loader, augment="M0"), "train", True)
    _, ev = run_epoch(cfg(shards, loader, augment="M0"), "train", False)
    a, b = by_id(tr), by_id(ev)
    for i in list(a)[:12]:
        assert torch.equal(a[i][0], b[i][0])


@pytest.mark.parametrize("loader", LOADERS)
def test_m2_augments_and_differs_per_epoch(shards, loader):
    c = cfg(shards, loader, augment="M2")
    e0 = by_id(run_epoch(c, "train", True, epoch=0)[1])
    e2 = by_id(run_epoch(c, "train", True, epoch=2)[1])
    ev = by_id(run_epoch(c, "train", False)[1])
    diff_eval = np.mean([(e0[i][0] - ev[i][0]).abs().mean().item() for i in e0])
    diff_epoch = np.mean([(e0[i][0] - e2[i][0]).abs().mean().item() for i in e0 if i in e2])
    assert diff_eval > 0.05 and diff_epoch > 0.05


def test_augment_choices_come_from_the_preset_table():
    from mlic_dist.config import ConfigError
    from mlic_dist.config.reference import describe

    assert PRESET_NAMES == ("M0", "M1", "M2", "M3", "RA", "CO")
    with pytest.raises(ConfigError, match=r"data.augment='M9'.*\['M0', 'M1', 'M2', 'M3', 'RA', 'CO'\]"):
        DataConfig(augment="M9")
    (doc,) = [d for k, _, d in describe() if k == "data.augment"]
    assert all(f"{name} = " in doc for name in PRESET_NAMES)   # the README row names every preset


def _fill_pixels(images: torch.Tensor, normalize="imagenet") -> torch.Tensor:
    """(B, S, S) bool: pixels whose 3 channels equal Cutout's fill after normalisation."""
    from mlic_dist.data.augment import fill_value

    mean, std = MEAN_STD[normalize]
    want = torch.tensor([(f - m) / s for f, m, s in zip(fill_value(normalize), mean, std)])
    return ((images - want.view(1, 3, 1, 1)).abs() < 1e-4).all(1)


def _is_one_rectangle(on: torch.Tensor) -> bool:
    """(S, S) bool: True where the True pixels fill their bounding box exactly."""
    rows, cols = on.any(1).nonzero().flatten(), on.any(0).nonzero().flatten()
    if len(rows) == 0:
        return False
    box = on[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return bool(box.all()) and int(on.sum()) == box.numel()


@pytest.mark.parametrize("loader", LOADERS)
def test_cutout_erases_one_rectangle_with_the_mean(shards, loader):
    """CO, cutout_p=1: every training image holds exactly one rectangle of the fill colour (0 after
    normalisation), of an area in cutout_scale; evaluation is untouched."""
    c = cfg(shards, loader, augment="CO", cutout_p=1.0, cutout_scale=(0.1, 0.2))
    _, batches = run_epoch(c, "train", True, epoch=1)
    x = torch.cat([b.images for b in batches])
    fill = _fill_pixels(x)
    # rounding h, w to pixels (torchvision) or to the normalised anchor grid (DALI) moves the area a little
    frac = fill.float().mean((1, 2))
    assert ((frac > 0.07) & (frac < 0.26)).all(), frac
    assert all(_is_one_rectangle(f) for f in fill)
    ev = torch.cat([b.images for b in run_epoch(c, "train", False)[1]])
    assert _fill_pixels(ev).float().mean((1, 2)).max() < 0.05


def test_dali_cpu_cutout_changes_only_the_rectangle_and_p0_is_m2(shards):
    """On the DALI CPU path, Cutout runs after the torch resize without touching the other draws:
    cutout_p=0 gives M2's images bit for bit, cutout_p=1 differs from them only inside the
    erased rectangle."""
    m2 = by_id(run_epoch(cfg(shards, "dali", augment="M2"), "train", True, epoch=2)[1])
    off = by_id(run_epoch(cfg(shards, "dali", augment="CO", cutout_p=0.0), "train", True, epoch=2)[1])
    on = by_id(run_epoch(cfg(shards, "dali", augment="CO", cutout_p=1.0), "train", True, epoch=2)[1])
    assert set(m2) == set(off) == set(on)
    for i in m2:
        assert torch.equal(m2[i][0], off[i][0])
        changed = (m2[i][0] != on[i][0]).any(0)                       # (S, S)
        erased = _fill_pixels(on[i][0][None])[0]
        assert changed.any() and not (changed & ~erased).any()        # changes lie inside the fill


@pytest.mark.parametrize("loader", LOADERS)
def test_randaugment_changes_images_replays_and_keeps_the_global_rng(shards, loader):
    c_m2, c_ra = cfg(shards, loader, augment="M2"), cfg(shards, loader, augment="RA", randaugment_magnitude=15)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ra = by_id(run_epoch(c_ra, "train", True, epoch=1)[1])
    assert torch.equal(torch.get_rng_state(), before)   # the trainer's stream (dropout) is untouched
    m2 = by_id(run_epoch(c_m2, "train", True, epoch=1)[1])
    diffs = [(ra[i][0] - m2[i][0]).abs().mean().item() for i in ra]
    assert np.median(diffs) > 0.05, diffs
    if loader == "dali":   # same crop and flip draws: only RandAugment differs
        assert sum(d == 0 for d in diffs) < len(diffs) // 4


def test_dali_graph_extras_on_the_cpu(tmp_path):
    """The operators the GPU pipeline runs for RA / CO (augment.dali_extras), here on DALI's CPU
    backend: shapes and dtype kept, Cutout (p=1) erases one rectangle with the fill, a seed replays."""
    from nvidia.dali import fn, pipeline_def, types

    from mlic_dist.config.choices import get_preset
    from mlic_dist.data.augment import dali_extras, fill_value

    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for _ in range(6)]

    @pipeline_def(enable_conditionals=True)
    def pipe(augment):
        images = fn.external_source(source=lambda: batch, batch=True, layout="HWC", dtype=types.UINT8)
        return images, dali_extras(images, get_preset(augment),
                                   DataConfig(augment=augment, cutout_p=1.0, cutout_scale=(0.1, 0.2)), 48)

    def run(augment, seed):
        p = pipe(augment, batch_size=6, num_threads=1, device_id=None, seed=seed)
        p.build()
        src, out = p.run()
        return [np.array(src[k]) for k in range(6)], [np.array(out[k]) for k in range(6)]

    src, co = run("CO", 1)
    for a, b in zip(src, co):
        assert b.shape == a.shape and b.dtype == np.uint8
        changed = (a != b).any(-1)
        filled = (b == np.array(fill_value("imagenet"), np.uint8)).all(-1)
        assert changed.any() and not (changed & ~filled).any()
        assert _is_one_rectangle(torch.from_numpy(filled))   # random source pixels never hit the fill
        assert 0.05 < filled.mean() < 0.3
    src, ra = run("RA", 1)
    assert all(b.shape == a.shape for a, b in zip(src, ra))
    assert sum(not np.array_equal(a, b) for a, b in zip(src, ra)) >= 4
    assert all(np.array_equal(x, y) for x, y in zip(ra, run("RA", 1)[1]))


# ----------------------------------------------------------------------------- labels

@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("difficult", ["positive", "ignore"])
def test_label_semantics(shards, labels, loader, difficult):
    lab = labels["train"]
    assert (lab == -1).any()
    for train in (False, True):
        _, batches = run_epoch(cfg(shards, loader, difficult=difficult, augment="M2"), "train", train)
        got = by_id(batches)
        assert len(got) == 40
        for i, (_, t, m) in got.items():
            exp_t = (lab[i] != 0) if difficult == "positive" else (lab[i] == 1)
            exp_m = np.ones(4, bool) if difficult == "positive" else (lab[i] != -1)
            assert t.numpy().astype(bool).tolist() == exp_t.tolist()
            assert m.numpy().astype(bool).tolist() == exp_m.tolist()


def test_labels_to_targets():
    lab = torch.tensor([[1, 0, -1]], dtype=torch.int8)
    t, m = labels_to_targets(lab, "positive")
    assert t.tolist() == [[1, 0, 1]] and m.tolist() == [[1, 1, 1]]
    t, m = labels_to_targets(lab, "ignore")
    assert t.tolist() == [[1, 0, 0]] and m.tolist() == [[1, 1, 0]]


def test_or_mixup_rule():
    # rows: i = (pos, neg, ign, neg, ign), j = (neg, ign, ign, neg, pos)  (difficult=ignore coding)
    t = torch.tensor([[1., 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    m = torch.tensor([[1., 1, 0, 1, 0], [1, 0, 0, 1, 1]])
    x = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)]).contiguous(memory_format=torch.channels_last)
    partner = torch.tensor([1, 0])
    xm, tm, mm = or_mixup(x, t, m, partner)
    assert torch.allclose(xm, torch.full_like(xm, 0.5)) and xm.is_contiguous(memory_format=torch.channels_last)
    assert tm[0].tolist() == [1, 0, 0, 0, 1]     # OR
    assert mm[0].tolist() == [1, 0, 0, 1, 1]     # ignore unless the other is a positive
    assert torch.equal(tm[0], tm[1]) and torch.equal(mm[0], mm[1])
    p = mixup_pairs(16, torch.Generator().manual_seed(0))
    assert sorted(p.tolist()) == list(range(16)) and not (p == torch.arange(16)).any()


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("difficult", ["positive", "ignore"])
def test_m3_mixup_only_on_odd_epochs(shards, labels, loader, difficult):
    lab = torch.from_numpy(labels["train"])
    c = cfg(shards, loader, augment="M3", difficult=difficult)
    for epoch in (0, 1, 2, 3):
        _, batches = run_epoch(c, "train", True, epoch=epoch)
        mixed_rows = 0
        for b in batches:
            own_t, own_m = labels_to_targets(lab[b.ids], difficult)
            if epoch % 2 == 0:
                assert torch.equal(b.targets, own_t) and torch.equal(b.mask, own_m)
                continue
            for k in range(len(b.ids)):   # some partner j != k explains row k by the OR rule
                ok = [j for j in range(len(b.ids)) if j != k
                      and torch.equal(b.targets[k], torch.maximum(own_t[k], own_t[j]))
                      and torch.equal(b.mask[k], torch.maximum(b.targets[k], own_m[k] * own_m[j]))]
                assert ok, (epoch, k)
            mixed_rows += int((b.targets != own_t).any(1).sum())
        if epoch % 2 == 1:
            assert mixed_rows > 0


# ----------------------------------------------------------------------------- ranks

@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("fixture", ["shards", "one_shard"])
def test_ranks_equal_batches_and_eval_ids_once(request, loader, world, fixture):
    root = request.getfixturevalue(fixture)
    c = cfg(root, loader)
    for split, n in (("train", 40), ("val", 12)):
        for train in ((True, False) if split == "train" else (False,)):
            counts, ids, shapes = [], [], set()
            for r in range(world):
                ld, batches = run_epoch(c, split, train, rank=r, world=world, epoch=1)
                counts.append((len(ld), len(batches)))
                shapes |= {tuple(b.images.shape) for b in batches}
                ids += [i for b in batches for i in b.ids.tolist()]
            assert len({x for pair in counts for x in pair}) == 1, counts   # equal and == len()
            if not train:
                real = [i for i in ids if i >= 0]
                assert sorted(real) == list(range(n)), (split, world)       # every sample once
                assert len(shapes) == 1                                     # gatherable
            else:
                assert counts[0][0] == -(-n // world) // 4


@pytest.mark.parametrize("loader", LOADERS)
def test_fewer_samples_than_ranks_is_an_error(shards, loader):
    with pytest.raises(ValueError, match=r"'val' has 12 samples.*world_size=13"):
        build_loader(cfg(shards, loader), "val", train=False, rank=0, world_size=13, device="cpu", seed=0)
    with pytest.raises(ValueError, match="batch_size_per_gpu"):
        build_loader(cfg(shards, loader, batch_size_per_gpu=32), "train", train=True, rank=0,
                     world_size=2, device="cpu", seed=0)


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("loader", LOADERS)
def test_eval_is_deterministic(shards, loader):
    ld = build_loader(cfg(shards, loader), "val", train=False, rank=0, world_size=1, device="cpu", seed=0)
    a, b = list(ld), list(ld)
    assert len(a) == len(b) == len(ld)
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and torch.equal(x.ids, y.ids) and torch.equal(x.targets, y.targets)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("augment", ["M3", "RA", "CO"])
def test_train_epoch_replays(shards, loader, augment):
    c = cfg(shards, loader, augment=augment)
    _, a = run_epoch(c, "train", True, rank=1, world=2, epoch=3, seed=7)
    _, b = run_epoch(c, "train", True, rank=1, world=2, epoch=3, seed=7)
    _, d = run_epoch(c, "train", True, rank=1, world=2, epoch=4, seed=7)
    for x, y in zip(a, b):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.images, y.images) and torch.equal(x.targets, y.targets)
    assert not all(torch.equal(x.ids, y.ids) for x, y in zip(a, d))


def test_dali_and_torch_eval_agree(shards):
    got = {ld: by_id(run_epoch(cfg(shards, ld), "val", False)[1]) for ld in LOADERS}
    assert set(got["dali"]) == set(got["torch"]) == set(range(12))
    diffs = []
    for i in range(12):
        a, b = got["dali"][i], got["torch"][i]
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        diffs.append((a[0] - b[0]).abs().mean().item())
    # same libjpeg-turbo decode, same resize kernel; normalised units (1 = 1 std ~ 57 grey levels)
    assert max(diffs) < 0.05, diffs


def test_buffer_pool_never_hands_out_a_held_buffer():
    from mlic_dist.data.normalize import BufferPool

    pool, shape = BufferPool(), torch.Size((4, 5))
    a = pool.empty(shape, torch.float32)
    view = a.permute(1, 0)
    del a
    b = pool.empty(shape, torch.float32)
    assert b.data_ptr() != view.data_ptr()
    del view, b
    assert pool.empty(shape, torch.float32).data_ptr() == pool.buffers[0].data_ptr()


# ----------------------------------------------------------------------------- damaged shards

@pytest.mark.parametrize("loader", LOADERS)
def test_corrupt_jpeg_is_named_by_shard_and_key(shards, tmp_path, loader):
    """Bytes of one image replaced after sharding (sizes unchanged, so read_manifest passes):
    training stops with one line naming the tar, the key and the verify command."""
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    tar, key = garble_sample(bad, "train", shard=3, sample=2)
    ld = build_loader(cfg(bad, loader, augment="M2"), "train", train=True, rank=0, world_size=1,
                      device="cpu", seed=0)
    with pytest.raises(ShardDataError) as e:
        list(ld)
    msg = str(e.value)
    assert f"{tar}: sample {key!r}" in msg and "cannot be decoded" in msg, msg
    assert f"python -m mlic_dist.shard verify {bad} --decode" in msg and "\n" not in msg
    # at world size 2 the bad sample (id 23) is read by one rank; the other's epoch is untouched
    outcomes = []
    for rank in (0, 1):
        try:
            outcomes.append(len(run_epoch(cfg(bad, loader), "train", True, rank=rank, world=2, epoch=0)[1]))
        except ShardDataError as err:
            outcomes.append(str(err))
    done = [o for o in outcomes if isinstance(o, int)]
    failed = [o for o in outcomes if isinstance(o, str)]
    assert done == [5] and len(failed) == 1 and f"sample {key!r}" in failed[0], outcomes


@pytest.mark.parametrize("loader", LOADERS)
def test_truncated_shard_is_named(shards, tmp_path, loader):
    """A tar cut short: named with its size before training (read_manifest) and, if it is cut
    after the loader was built, by the loader itself."""
    short = tmp_path / "short"
    shutil.copytree(shards, short)
    ld = build_loader(cfg(short, loader), "train", train=False, rank=0, world_size=1, device="cpu", seed=0)
    truncate_shard(short / "train-000002.tar", 0.5)
    with pytest.raises(ShardDataError, match=r"train-000002\.tar .*truncated") as e:
        list(ld)                                             # cut while training
    assert "\n" not in str(e.value)
    with pytest.raises(ShardDataError, match=r"train-000002\.tar is \d+ bytes on disk but the manifest "
                                             r"recorded \d+ bytes: the file is truncated"):
        build_loader(cfg(short, loader), "train", train=True, rank=0, world_size=1, device="cpu", seed=0)


def _dali_train(path, **kw):
    return build_loader(DataConfig(shards=str(path), size=16, loader="dali", batch_size_per_gpu=4, shuffle_buffer=8,
                                   num_workers=1, augment="M0"), "train", train=True, rank=0, world_size=1,
                        device="cpu", seed=3, **kw)


def _read_order(loader, epoch, built, n):
    runs, partly = loader._reading_order(epoch, built, 0, n, 24)
    assert not partly
    return [i for a, b in runs for i in range(a, b)]


def test_dali_training_names_a_tar_cut_while_it_trains(tmp_path):
    """The tars in DALI's own per-epoch order: the first one it reads, cut after the loader was
    built, is named (the order probe fails on it too: every tar's size and index are checked)."""
    bad = build_small_shards(tmp_path / "d", n_train=61, n_val=6, n_test=0, num_classes=4, samples_per_shard=5)
    ld = _dali_train(bad)
    first = _read_order(ld, 0, 0, 61)[0] // 5
    truncate_shard(bad / f"train-{first:06d}.tar", 0.3)
    with pytest.raises(ShardDataError, match=rf"train-{first:06d}\.tar .*truncated"):
        list(ld)


def test_dali_names_a_bad_sample_of_an_epoch_resumed_from_a_checkpoint(tmp_path):
    """A pipeline restored from a checkpoint (built at epoch 0, standing at epoch 3) fails while
    it prefetches: the scan follows the order of that pipeline, not a fresh build's."""
    n = 61
    good = build_small_shards(tmp_path / "g", n_train=n, n_val=6, n_test=0, num_classes=4, samples_per_shard=5)
    ld = _dali_train(good)
    for e in range(3):
        ld.set_epoch(e)
        list(ld)
    ld.set_epoch(3)
    state = ld.state_dict()
    assert state["epoch"] == 3 and state["build_epoch"] == 0 and state["dali"]
    resumed_order, fresh_order = _read_order(ld, 3, 0, n), _read_order(ld, 3, 3, n)
    bad_id = next(i for i in resumed_order[:4] if i not in fresh_order)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    tar, key = garble_sample(bad, "train", shard=bad_id // 5, sample=bad_id % 5)
    again = _dali_train(bad)
    again.load_state_dict(state)
    again.set_epoch(3)
    with pytest.raises(ShardDataError, match=rf"sample {key!r}"):
        list(again)


def test_truncated_shard_named_by_read_manifest_and_labels(shards, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(shards, short)
    truncate_shard(short / "val-000001.tar", 0.7)
    with pytest.raises(ShardDataError, match=r"val-000001\.tar is \d+ bytes .* truncated"):
        read_manifest(short)
    with pytest.raises(ShardDataError, match=r"val-000001\.tar .* truncated"):
        read_split_labels(short, "val")
    # a manifest written before shards recorded "bytes": the index's extent is the yardstick
    doc = json.loads((short / "manifest.json").read_text())
    for info in doc["splits"].values():
        for s in info["shards"]:
            del s["bytes"]
    (short / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ShardDataError, match=r"val-000001\.tar is \d+ bytes on disk but its index "
                                             r"val-000001\.idx places data up to byte \d+"):
        read_manifest(short)
    (short / "val-000001.tar").write_bytes((shards / "val-000001.tar").read_bytes())
    assert read_manifest(short).split("val").num_samples == 12   # whole again: accepted
    (short / "val-000001.idx").write_text("v1.2 3\n")
    with pytest.raises(ShardDataError, match=r"val-000001\.idx declares 'v1.2 3' .* 5 samples"):
        read_manifest(short)


# ----------------------------------------------------------------------------- DALI: built once


def _epoch_ids(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    return [i for b in batches for i in b.ids.tolist()], torch.cat([b.images for b in batches])


def test_dali_builds_its_pipeline_once_and_replays_any_epoch_from_a_checkpoint(shards):
    """The pipeline is reset, not rebuilt, per epoch (issue 22); each epoch reshuffles, the two
    ranks' epochs still cover the split exactly once, and the state a checkpoint keeps at an
    epoch's start replays that epoch bit for bit in a new process's loader."""
    c = cfg(shards, "dali", augment="M2")
    ranks = [build_loader(c, "train", train=True, rank=r, world_size=2, device="cpu", seed=3) for r in (0, 1)]
    epochs, states = [], []
    for e in range(3):
        states.append([ld.state_dict() for ld in ranks])   # what a checkpoint at epoch e's start holds
        per_rank = [_epoch_ids(ld, e) for ld in ranks]
        epochs.append(per_rank)
        ids = per_rank[0][0] + per_rank[1][0]
        n = ranks[0].plan.num_batches * ranks[0].batch_size
        assert len(set(per_rank[0][0])) == len(per_rank[0][0]) == n   # no sample twice within a rank
        assert not set(per_rank[0][0]) & set(per_rank[1][0]) and len(ids) == 2 * n
    assert [ld.builds for ld in ranks] == [1, 1]
    assert epochs[1][0][0] != epochs[2][0][0] and set(epochs[0][0][0]) != set(epochs[1][0][0])  # reshuffled, rotated
    assert states[2][0]["dali"] and states[2][0]["build_epoch"] == 0
    again = build_loader(c, "train", train=True, rank=0, world_size=2, device="cpu", seed=3)
    again.load_state_dict(states[2][0])
    ids, images = _epoch_ids(again, 2)
    assert ids == epochs[2][0][0] and torch.equal(images, epochs[2][0][1])


def test_dali_rebuilds_after_an_epoch_left_part_way_and_that_epoch_is_deterministic(shards):
    c = cfg(shards, "dali", augment="M1")
    loader = build_loader(c, "train", train=True, rank=0, world_size=1, device="cpu", seed=1)
    loader.set_epoch(0)
    next(iter(loader))                     # train.max_steps_per_epoch stops early
    assert loader.state_dict() == {}       # nothing to keep: the next epoch builds afresh
    first, _ = _epoch_ids(loader, 1)
    fresh = build_loader(c, "train", train=True, rank=0, world_size=1, device="cpu", seed=1)
    assert _epoch_ids(fresh, 1)[0] == first and loader.builds == 2


def test_dali_out_of_memory_goes_up_as_it_is_without_a_data_scan(shards, monkeypatch):
    from mlic_dist.data import dali

    loader = build_loader(cfg(shards, "dali"), "train", train=True, device="cpu")
    monkeypatch.setattr(dali.DaliLoader, "_bad_data_error", lambda *a: pytest.fail("scanned the data for an OOM"))

    def no_memory(self, epoch):
        raise RuntimeError("Can't allocate 402653184 bytes on device 0.")

    monkeypatch.setattr(dali.DaliLoader, "_build", no_memory)
    with pytest.raises(RuntimeError, match="Can't allocate"):
        list(loader)


def test_dali_decoder_arguments_are_dalis_own():
    """hw_decoder_load and jpeg_fancy_upsampling reach the mixed decoders under names their
    schemas know (a typo would fail only on a GPU)."""
    from nvidia.dali import backend

    from mlic_dist.config import load_config
    from mlic_dist.data.dali import decoder_args

    data = load_config(None, ["data.dali_hw_decoder_load=0.9", "data.dali_fancy_upsampling=true"]).data
    args = decoder_args(data, on_gpu=True)
    assert args == {"device": "mixed", "hw_decoder_load": 0.9, "jpeg_fancy_upsampling": True}
    for op in ("decoders__Image", "decoders__ImageRandomCrop"):
        schema = backend.GetSchema(op)
        assert all(schema.HasArgument(k) for k in args if k != "device"), op
    assert decoder_args(data, on_gpu=False) == {"device": "cpu"}
