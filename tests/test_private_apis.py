"""Every private attribute of a dependency the package touches lives in one named function that
says the version it was checked against; each test here fails when its workaround stops holding
(a dependency upgrade renamed or changed the attribute), before a user's run does. Ray's
loopback switch (`sweep.cluster._loopback_node`) is checked by
tests/test_sweep.py::test_the_sweeps_own_ray_listens_on_loopback_only."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1] / "mlic_dist"
# module -> the functions allowed to touch a private attribute of a dependency
OWNERS = {
    "data/normalize.py": {"storage_use_count"},
    "data/transforms.py": {"_bilinear_into"},
    "train/distributed.py": {"reset_accelerate_state", "compiled_original"},
    "train/optim.py": {"_scale_last_lr"},
    "train/scoring.py": {"_plain_forward"},
    "tracking/tracker.py": {"open_store"},
    "sweep/cluster.py": {"_loopback_node"},
}
PRIVATE_OF_DEPENDENCIES = {"_storage_Use_Count", "_cdata", "_nn", "_upsample_bilinear2d_aa", "_reset_state",
                           "_orig_mod", "_last_lr", "_original_forward", "_tracking_client", "_private",
                           "_max_workers", "_threads"}


def test_private_attributes_are_touched_only_in_their_named_functions():
    wrong = []
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text())
        owner_of = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    owner_of.setdefault(id(node), fn.name)
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else (
                node.module.rpartition(".")[2] if isinstance(node, ast.ImportFrom) and node.module else None)
            if isinstance(node, ast.Constant) and node.value in PRIVATE_OF_DEPENDENCIES:
                name = node.value   # getattr(x, "_private", ...)
            if name in PRIVATE_OF_DEPENDENCIES and owner_of.get(id(node)) not in OWNERS.get(rel, set()):
                wrong.append(f"{rel}:{node.lineno} {name} in {owner_of.get(id(node), 'module level')}")
    assert not wrong, "\n".join(wrong)


def test_storage_use_count_counts_the_views_that_hold_a_buffer():
    from mlic_dist.data.normalize import BufferPool, storage_use_count

    buf = torch.empty(8)
    alone = storage_use_count(buf)
    assert alone is not None, "torch no longer has _storage_Use_Count: BufferPool stops reusing buffers"
    view = buf.view(2, 4)
    assert storage_use_count(buf) == alone + 1
    del view
    assert storage_use_count(buf) == alone
    pool = BufferPool()
    first = pool.empty(torch.Size((4, 4)), torch.float32)
    ptr = first.data_ptr()
    assert pool.empty(torch.Size((4, 4)), torch.float32).data_ptr() != ptr   # still held: a new one
    del first
    assert pool.empty(torch.Size((4, 4)), torch.float32).data_ptr() == ptr   # dropped: reused


@pytest.mark.parametrize("antialias", [True, False])
def test_the_out_resize_kernel_is_f_interpolate(antialias):
    from mlic_dist.data.transforms import _bilinear_into

    src = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = torch.empty((2, 3, 24, 24), dtype=torch.uint8)
    _bilinear_into(src, 24, antialias, out)   # raises if the private overload went away
    ref = F.interpolate(src, size=(24, 24), mode="bilinear", antialias=antialias, align_corners=False)
    assert torch.equal(out, ref)


def test_accelerate_state_reset_lets_the_next_run_pick_its_precision():
    from accelerate import Accelerator

    from mlic_dist.train.distributed import reset_accelerate_state

    reset_accelerate_state()
    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    reset_accelerate_state()
    assert Accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"
    reset_accelerate_state()


def test_prepared_models_keep_their_original_forward_where_scoring_finds_it():
    from accelerate import Accelerator

    from mlic_dist.train.distributed import reset_accelerate_state
    from mlic_dist.train.scoring import _plain_forward

    reset_accelerate_state()
    model = Accelerator(mixed_precision="bf16", cpu=True).prepare(torch.nn.Linear(4, 2))
    assert "_original_forward" in vars(model), "accelerate no longer wraps forward this way"
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    exact = torch.nn.functional.linear(x, model.weight, model.bias)
    with _plain_forward(model), torch.no_grad():
        assert torch.equal(model(x), exact)                        # fp32 inside: autocast is off
    with torch.no_grad():
        assert not torch.equal(model(x), exact)                    # bf16-rounded again after
    reset_accelerate_state()


def test_compiled_models_are_unwrapped():
    from mlic_dist.train.distributed import compiled_original

    net = torch.nn.Linear(2, 2)
    assert compiled_original(torch.compile(net)) is net


def test_last_lr_follows_a_rescale():
    from mlic_dist.train.optim import _scale_last_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    _scale_last_lr(sched, 0, 0.5)
    assert sched.get_last_lr() == [pytest.approx(0.05)]


def test_an_unknown_tracking_scheme_fails_when_the_store_opens():
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mlic_dist.tracking.tracker import open_store

    with pytest.raises(MlflowException, match="URI|tracking store"):
        open_store(MlflowClient(tracking_uri="nosuchscheme://x"))
