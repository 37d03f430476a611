"""A table of malformed configurations, each given to the trainer's command line as a user would:
every one must stop with status 2 and ONE line naming the key (or file) at fault, before any
training. A traceback, a second line, or a silent acceptance fails the row. Rows marked
(found) are the 19 that fault injection got through before (issue 19)."""
from __future__ import annotations

from pathlib import Path

import pytest

from shard_fixtures import build_small_shards, tiny_run_overrides

# (overrides, words the one line must contain)
BAD_OVERRIDES = [
    # non-finite numbers: NaN compares false both ways, so range checks alone let it through
    (["optim.lr=nan"], "optim.lr"),                       # (found) traceback
    (["optim.lr=inf"], "optim.lr"),                       # (found) failed after an epoch
    (["optim.lr=-inf"], "optim.lr"),
    (["optim.head_lr=nan"], "optim.head_lr"),             # (found) failed after an epoch
    (["optim.grad_clip=nan"], "optim.grad_clip"),         # (found) failed after an epoch
    (["optim.warmup_epochs=nan"], "optim.warmup_epochs"),  # (found) traceback
    (["optim.weight_decay=nan"], "optim.weight_decay"),
    (["optim.momentum=nan"], "optim.momentum"),
    (["tracking.flush_timeout_s=nan"], "tracking.flush_timeout_s"),   # (found) accepted
    (["loss.gamma=nan"], "loss.gamma"),
    (["loss.clip=inf"], "loss.clip"),
    (["train.ema_decay=nan"], "train.ema_decay"),
    (["schedule.gamma=nan"], "schedule.gamma"),
    (["schedule.plateau_factor=inf"], "schedule.plateau_factor"),
    (["data.cutout_p=nan"], "data.cutout_p"),
    (["data.rrc_scale=[nan,1.0]"], "data.rrc_scale"),
    (["model.dropout=nan"], "model.dropout"),
    # out of range
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-0.1"], "optim.lr"),
    (["optim.head_lr=-1"], "optim.head_lr"),
    (["optim.momentum=-5"], "optim.momentum"),            # (found) accepted
    (["optim.momentum=1.5"], "optim.momentum"),
    (["optim.betas=[2,3]"], "optim.betas"),               # (found) traceback
    (["optim.betas=[0.9]"], "optim.betas"),
    (["optim.warmup_epochs=-1"], "optim.warmup_epochs"),
    (["optim.base_batch_size=-16"], "optim.base_batch_size"),
    (["seed=-1"], "seed"),                                # (found) traceback
    (["data.size=0"], "data.size"),
    (["data.size=8"], "data.size"),
    (["data.batch_size_per_gpu=0"], "data.batch_size_per_gpu"),
    (["data.batch_size_per_gpu=-4"], "data.batch_size_per_gpu"),
    (["data.eval_batch_size_per_gpu=-1"], "data.eval_batch_size_per_gpu"),
    (["data.num_workers=-2"], "data.num_workers"),
    (["data.shuffle_buffer=0"], "data.shuffle_buffer"),   # (found) accepted
    (["data.shuffle_buffer=-5"], "data.shuffle_buffer"),  # (found) accepted
    (["data.rrc_scale=[0.5,0.1]"], "data.rrc_scale"),
    (["data.rrc_scale=[0,1]"], "data.rrc_scale"),
    (["data.rrc_ratio=[2,1]"], "data.rrc_ratio"),
    (["data.randaugment_ops=0"], "data.randaugment_ops"),
    (["data.randaugment_magnitude=31"], "data.randaugment_magnitude"),
    (["data.cutout_p=1.5"], "data.cutout_p"),
    (["data.cutout_scale=[0.2,1.0]"], "data.cutout_scale"),
    (["model.dropout=1"], "model.dropout"),
    (["model.dropout=-0.1"], "model.dropout"),
    (["loss.clip=1"], "loss.clip"),
    (["loss.alpha=2"], "loss.alpha"),
    (["loss.gamma_neg=-1"], "loss.gamma_neg"),
    (["schedule.step_epochs=0"], "schedule.step_epochs"),
    (["schedule.gamma=0"], "schedule.gamma"),
    (["schedule.gamma=2"], "schedule.gamma"),
    (["schedule.plateau_factor=1"], "schedule.plateau_factor"),
    (["schedule.plateau_patience=-1"], "schedule.plateau_patience"),   # (found) accepted
    (["train.epochs=0"], "train.epochs"),
    (["train.early_stopping=-1"], "train.early_stopping"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (["train.log_every_steps=0"], "train.log_every_steps"),
    (["train.max_nonfinite_steps=0"], "train.max_nonfinite_steps"),
    (["train.ema_decay=1"], "train.ema_decay"),
    (["tracking.flush_timeout_s=-1"], "tracking.flush_timeout_s"),
    # wrong types and unknown choices
    (["data.size=big"], "data.size"),
    (["data.size=[1,2]"], "data.size"),
    (["data.size=true"], "data.size"),
    (["optim.lr=fast"], "optim.lr"),
    (["train.eval_test=maybe"], "train.eval_test"),
    (["data.augment=M9"], "data.augment"),
    (["data.loader=ffcv"], "data.loader"),
    (["data.normalize=zscore"], "data.normalize"),
    (["data.difficult=sometimes"], "data.difficult"),
    (["optim.name=lion"], "optim.name"),
    (["optim.lr_scaling=sqrt"], "optim.lr_scaling"),
    (["loss.name=hinge"], "loss.name"),
    (["schedule.name=cosine"], "schedule.name"),
    (["train.select_metric=val_f1"], "train.select_metric"),
    (["train.mixed_precision=fp8"], "train.mixed_precision"),
    (["data.sizee=448"], "data.sizee"),
    (["nosuch.key=1"], "nosuch"),
    (["data=5"], "data"),
    (["data.size"], "data.size"),                         # no '='
    # splits: model selection never on the training or the test split
    (["data.val_split=train"], "data.val_split"),         # (found) accepted
    (["data.val_split=test"], "data.val_split"),
    (["data.train_split="], "data.train_split"),
]
# need the shards (checked against the manifest before anything trains)
BAD_SPLITS = [
    (["data.test_split=nosuch"], "data.test_split"),      # (found) accepted: no test scores, no word
    (["data.val_split=nosuch"], "'nosuch'"),
    (["data.train_split=nosuch"], "'nosuch'"),
]
# config files: (file name, content as bytes, words)
BAD_FILES = [
    ("syntax.yaml", b"data: {size: 448\noptim: [\n", "not valid YAML at line"),   # (found) 7 lines
    ("binary.yaml", bytes(range(256)) * 4, "binary.yaml"),                       # (found) traceback
    ("cycle.yaml", b"base: cycle.yaml\n", "its own base"),                        # (found) RecursionError
    ("basetype.yaml", b"base: [base.yaml, 5]\n", "base:"),                        # (found) traceback
    ("list.yaml", b"- 1\n- 2\n", "must hold a mapping"),
    ("missingbase.yaml", b"base: nowhere.yaml\n", "nowhere.yaml"),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_small_shards(tmp_path_factory.mktemp("shards"), n_train=16, n_val=6, n_test=6, num_classes=3,
                              samples_per_shard=8)


def _refused(argv, capsys, words):
    from mlic_dist.train.__main__ import main

    status = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert status == 2, f"{argv}: exit {status}, accepted or failed otherwise:\n{err[-2000:]}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], f"{argv}:\n{err[-2000:]}"
    assert "Traceback" not in err


def test_the_table_covers_what_fault_injection_found():
    assert len(BAD_OVERRIDES) + len(BAD_SPLITS) + len(BAD_FILES) >= 69


@pytest.mark.parametrize("overrides,words", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_a_bad_value_is_one_line_naming_its_key(overrides, words, capsys):
    _refused(["--print-config", *overrides], capsys, words)


@pytest.mark.parametrize("overrides,words", BAD_SPLITS, ids=[" ".join(o) for o, _ in BAD_SPLITS])
def test_a_split_the_shards_lack_is_refused_before_training(overrides, words, shards, tmp_path, capsys):
    out = tmp_path / "run"
    _refused([*tiny_run_overrides(shards, out, **{"tracking.enabled": False}), *overrides], capsys, words)
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("name,content,words", BAD_FILES, ids=[f for f, _, _ in BAD_FILES])
def test_a_bad_config_file_is_one_line_naming_it(name, content, words, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    _refused(["--config", path, "--print-config"], capsys, words)


def test_good_values_at_the_edges_still_pass(capsys):
    from mlic_dist.train.__main__ import main

    assert main(["--print-config", "optim.momentum=0", "optim.betas=[0,0.999]", "data.shuffle_buffer=1",
                 "schedule.plateau_patience=0", "seed=0", "data.test_split=", "data.size=16.0"]) == 0
