"""DALI loader: `fn.readers.webdataset` -> decode -> crop / resize / flip -> uint8 -> torch.

One `@pipeline_def` with a train and an eval branch. On a GPU: `mixed` decoding (nvJPEG,
HW decoder), GPU resize and flip; the uint8 batch comes out on the GPU. Without one
(`device_id=None`, CI): CPU decoding only -- DALI's CPU resize measured ~5 ms per 448 px image
on this project's 2-core box (slower than the decode), so there DALI decodes (only the crop
region for M2/M3, `decoders.image_random_crop`) and pads the batch, and torch's uint8 bilinear
kernel does the resize (+flip) per image in the main process (~0.4 ms).

RandAugment / Cutout (presets RA, CO; mlic_dist/data/augment.py): on a GPU they are DALI
operators in the graph (`auto_aug.rand_augment`, `fn.erase`) after the resize. On the CPU path
they run in torch after the torch resize, with the torchvision v2 transforms the torch loader
uses, one image after another in the main process (`apply_extras`, seeded per batch). Why:
they must see the final S x S image, which only exists after the torch resize, and moving the
resize back into DALI to keep them there costs more than they do. Measured at 448 px, batch 32,
demo scenes, this 2-core box under load 15 from other jobs: M2 86 img/s with DALI resizing vs
289 with torch resizing; RA 42 (DALI CPU rand_augment) vs 58 (torchvision); CO 107 vs 274.
torchvision's and DALI's RandAugment have the same 14 operations and magnitude ranges (DALI is
given torchvision's translate range and both fill with 128); Cutout follows RandomErasing's
sampling in both (DALI clamps a too-large rectangle where torchvision redraws it).

Mixed decoding takes `data.dali_hw_decoder_load` and `data.dali_fancy_upsampling` (decoder_args).

Sharding (`reader_sharding`): `shard_id=slot, num_shards=world_size, pad_last_batch=True`, a
FILL iterator: every rank gets the same number of full batches; for eval the rows past the
rank's real samples (DALI repeats the last one) get id -1. Train drops the partial last batch
(plan.RankPlan). The pipeline is built once and reset per epoch; for training the reader moves
to the next shard every epoch (stick_to_shard off) and visits the tars in a new order every epoch
(`shuffle_after_epoch`, one seed on all ranks; data.shard_shuffle=false keeps the written order),
besides its shuffle buffer. Its state at each epoch's start (DALI's checkpointing) is what a
training checkpoint keeps, so an epoch replays identically after a kill (DaliLoader).

Bad data: a DALI error names no sample ("nvImageCodec failure: '#4'", or a truncated tar's
"Malformed index file"). When the pipeline fails, `__iter__` scans this rank's id range on the
CPU (`integrity.find_bad_samples`: sizes, index vs tar, parts, a strict decode; the ids in the
order the reader took them, replayed by a reader-only pipeline when DALI ordered the tars) and raises a
`ShardDataError` naming the tar and the sample key(s); if the scan finds nothing wrong the data
is not the cause and DALI's own error goes up unchanged. An out-of-memory error (device or pinned
host memory) goes up as it is, with no scan: the data is not its cause.
"""
from __future__ import annotations

import functools

import torch

from ..config.choices import get_preset
from .augment import dali_extras, torch_extras
from .base import LoaderBase, default_workers
from .integrity import ShardDataError, file_problems, find_bad_samples, verify_hint
from .normalize import BufferPool
from .plan import mix_seed
from .transforms import squash_resize


def _pipeline_def():
    from nvidia.dali import fn, pipeline_def, types

    # enable_conditionals is passed per call (RandAugment needs it; the other presets do not)
    @pipeline_def(enable_conditionals=False)
    def mlic_pipeline(tar_paths, index_paths, *, shard_id, num_shards, train, data_cfg, shuffle_buffer,
                      on_gpu, tar_order_seed):
        preset, size = get_preset(data_cfg.augment), data_cfg.size
        jpegs, labels, ids = fn.readers.webdataset(
            paths=tar_paths, index_paths=index_paths, ext=["jpg", "lbl", "id"],
            dtypes=[types.UINT8, types.INT8, types.INT64], missing_component_behavior="error",
            random_shuffle=train, initial_fill=shuffle_buffer, name="Reader",
            **reader_sharding(shard_id, num_shards, train, tar_order_seed))
        decoder = decoder_args(data_cfg, on_gpu)
        if train and preset.crop == "rrc":              # decode only the random-resized-crop window
            images = fn.decoders.image_random_crop(
                jpegs, output_type=types.RGB, random_area=list(data_cfg.rrc_scale),
                random_aspect_ratio=list(data_cfg.rrc_ratio), num_attempts=10, **decoder)
        else:
            images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
        if on_gpu:
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR)  # squash
            if train and preset.flip:
                images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
            if train:                                    # RandAugment / Cutout on the GPU
                images = dali_extras(images, preset, data_cfg, size)
            return images, labels, ids                   # (B, S, S, 3) uint8 on the GPU
        shapes = images.shape()                          # (B, 3): H, W, C of each crop
        images = fn.pad(images, axes=[0, 1])             # to the batch's largest H, W
        return images, shapes, labels, ids

    return mlic_pipeline


def reader_sharding(shard_id: int, num_shards: int, train: bool, tar_order_seed) -> dict:
    """The reader's sharding and tar-order arguments. Evaluation: each rank on its own shard.
    Training: the reader moves to the next shard every epoch (stick_to_shard off) and, unless
    data.shard_shuffle is off (`tar_order_seed` None), visits the tars in a new order every epoch
    (`shuffle_after_epoch`, drawn from the same seed on every rank, so the ranks' shards stay
    disjoint): a shuffle buffer alone would replay the last epoch's order beyond its reach."""
    args = dict(shard_id=shard_id, num_shards=num_shards, pad_last_batch=True, stick_to_shard=not train)
    if train and tar_order_seed is not None:
        args.update(shuffle_after_epoch=True, shuffle_after_epoch_seed=tar_order_seed)
    return args


@functools.lru_cache(maxsize=None)
def _order_probe_def():
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def order_probe(tar_paths, index_paths, *, shard_id, num_shards, tar_order_seed):
        """The training reader without its shuffle buffer or anything after it: the ids in the
        order the reader takes them from the tars."""
        return fn.readers.webdataset(paths=tar_paths, index_paths=index_paths, ext=["id"],
                                     dtypes=[types.INT64], name="Reader",
                                     **reader_sharding(shard_id, num_shards, True, tar_order_seed))
    return order_probe


def id_runs(ids) -> list[tuple[int, int]]:
    """[(first, end)] runs of consecutive ids, in the order given."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1]:
            runs[-1][1] += 1
        elif not (runs and runs[-1][0] <= i < runs[-1][1]):
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def _resize_into(src: torch.Tensor, dst: torch.Tensor, size: int, antialias: bool) -> None:
    """Bilinear (1, 3, h, w) -> (1, 3, S, S) written straight into `dst` (a view of the batch
    buffer), with the shared kernel of data/transforms.py (eval: antialias, as predict does)."""
    squash_resize(src, size, antialias, out=dst)


def resize_batch(padded: torch.Tensor, shapes: torch.Tensor, size: int, flips, antialias: bool,
                 pool=None, buffers=None) -> torch.Tensor:
    """(B, Hmax, Wmax, 3) uint8 + per-image (H, W) -> (B, S, S, 3) uint8, squash bilinear, flipped
    where flips[j]. The crop is made contiguous first (the flip comes free with that copy): the
    uint8 AVX kernel needs a dense channels_last input (5x slower on the padded view)."""
    shape = torch.Size((padded.shape[0], size, size, 3))
    out = buffers.empty(shape, torch.uint8) if buffers is not None else torch.empty(shape, dtype=torch.uint8)
    hw = shapes[:, :2].tolist()

    def one(j):
        h, w = hw[j]
        src = padded[j, :h, :w]
        src = src.flip(1) if flips[j] else src.contiguous()
        _resize_into(src.permute(2, 0, 1).unsqueeze(0), out[j].permute(2, 0, 1).unsqueeze(0), size, antialias)

    list(pool.map(one, range(len(hw))) if pool is not None else map(one, range(len(hw))))
    return out


def apply_extras(images: torch.Tensor, extras, seed: int) -> None:
    """RandAugment / Cutout (torchvision v2, `augment.torch_extras`) in place on (B, S, S, 3)
    uint8, one image after another in this thread: torchvision draws from torch's global RNG,
    so it is seeded here for this batch inside `fork_rng` (the trainer's stream -- dropout --
    is left as it was, and the batch replays exactly)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for j in range(images.shape[0]):
            chw = images[j].permute(2, 0, 1)             # (3, S, S) view
            chw.copy_(extras(chw))


class _ReadError(Exception):
    """Carries an error raised by DALI's pipeline (building, prefetching, reading a batch)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def decoder_args(data_cfg, on_gpu: bool) -> dict:
    """The decoder's device and tuning: on a GPU `mixed` (nvJPEG + the hardware decoder) with
    `data.dali_hw_decoder_load` (the share of images sent to the hardware decoder) and
    `data.dali_fancy_upsampling` (the CPU decoder's chroma upsampling, so mixed and CPU decode
    agree in colour); on the CPU, DALI's CPU decoder (libjpeg-turbo, always fancy)."""
    if not on_gpu:
        return {"device": "cpu"}
    return {"device": "mixed", "hw_decoder_load": float(data_cfg.dali_hw_decoder_load),
            "jpeg_fancy_upsampling": bool(data_cfg.dali_fancy_upsampling)}


# DALI's own words for memory it could not get (device or pinned host): such an error is not the
# data's fault and goes up as it is, without the CPU scan of the samples
_OUT_OF_MEMORY = ("out of memory", "can't allocate", "cudaerrormemoryallocation", "cuda_error_out_of_memory",
                  "std::bad_alloc")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or any(w in str(error).lower() for w in _OUT_OF_MEMORY)


class DaliLoader(LoaderBase):
    """Builds its pipeline once and `reset()`s it per epoch (DALI's ResNet-50 example does the
    same; a rebuild costs index reads, a refill of the shuffle buffer and memory-pool growth).

    Epoch e of a pipeline built at epoch b: the reader on slot (rank + e) % W (DALI moves to the
    next shard every epoch: stick_to_shard off, the rank plan's rotation) of the tars in DALI's
    order for that epoch (`shuffle_after_epoch`, seeded from (seed, b) alike on every rank), its
    shuffle buffer and random operators continuing from epoch e - 1. A
    pipeline is reused only when the previous epoch was read to its end; a loop that stops early
    (train.max_steps_per_epoch, an error) drops it and the next epoch builds afresh with seed
    (seed, e, rank). Either way an epoch replays exactly after a kill: `state_dict()` is DALI's
    own checkpoint of the reader and the random operators at the start of the epoch (none for a
    fresh build, which (seed, e, rank) determines), saved in every rank's checkpoint file and
    given back to `load_state_dict` on resume."""

    def __init__(self, data_cfg, manifest, split, *, train, rank, world_size, device, seed):
        super().__init__(data_cfg, manifest, split, train=train, rank=rank, world_size=world_size,
                         device=device, seed=seed)
        self.on_gpu = self.device.type == "cuda"
        self.num_threads = default_workers(data_cfg.num_workers)
        self._u8_buffers = BufferPool(keep=2)
        self._pipe = self._it = None
        self._pipe_epoch = None     # the epoch the built pipeline stands at the start of
        self._build_epoch = None    # the epoch it was built for (its tar order, first slot, seed)
        self._state: dict = {}      # state_dict(): how to rebuild the pipeline at _pipe_epoch
        self._restore: dict = {}    # load_state_dict(): used when that epoch is first read
        self.builds = 0             # pipelines built (tests, benchmarks)

    # ------------------------------------------------------------------ state (checkpoints)

    def state_dict(self) -> dict:
        """{"epoch", "build_epoch", "dali"} for the epoch being read (or about to be), or {}."""
        return dict(self._state)

    def load_state_dict(self, state: dict | None) -> None:
        self._restore = dict(state or {})

    # ------------------------------------------------------------------ the pipeline

    def _tar_order_seed(self, built: int):
        """The seed of DALI's per-epoch tar order for a pipeline built at epoch `built` (the same
        on every rank), or None when the tars are read in written order."""
        return mix_seed(self.seed, built, 11) if self.train and self.cfg.shard_shuffle else None

    def _build(self, epoch: int):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        restore = self._restore if self._restore.get("epoch") == epoch and self._restore.get("dali") else {}
        self._restore = {}
        built = int(restore.get("build_epoch", epoch))
        device_id = None
        if self.on_gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        cfg = self.cfg
        self._build_epoch = built
        shards = self.info.shards       # written order: DALI orders them per epoch (reader_sharding)
        pipe = _pipeline_def()(
            [str(s.path) for s in shards], [str(s.index_path) for s in shards],
            shard_id=self.plan.slot(self.rank, built), num_shards=self.world_size, train=self.train,
            data_cfg=cfg, shuffle_buffer=max(1, cfg.shuffle_buffer), on_gpu=self.on_gpu,
            tar_order_seed=self._tar_order_seed(built),
            batch_size=self.batch_size, num_threads=self.num_threads, device_id=device_id,
            seed=mix_seed(self.seed, built, self.rank, 1), prefetch_queue_depth=2,
            enable_conditionals=self.on_gpu and self.train and self.preset.randaugment,
            enable_checkpointing=self.train, checkpoint=restore.get("dali"))
        names = ["images", "labels", "ids"] if self.on_gpu else ["images", "shapes", "labels", "ids"]
        it = DALIGenericIterator([pipe], names, reader_name="Reader", auto_reset=False,
                                 last_batch_policy=LastBatchPolicy.FILL, dynamic_shape=not self.on_gpu)
        self.builds += 1
        self._state = {"epoch": epoch, "build_epoch": built, "dali": restore.get("dali")}
        return pipe, it

    def _drop(self) -> None:
        self._pipe = self._it = None    # DALI's threads stop once nothing holds the pipeline
        self._pipe_epoch = self._build_epoch = None
        self._state = {}                # the next epoch builds afresh: (seed, epoch, rank) say it all

    def close(self) -> None:
        self._drop()

    def _roll_over(self, epoch: int) -> None:
        """The epoch's batches are all read: run the iterator to its end (the FILL batch a
        training epoch drops), reset it, and note DALI's state at the start of the next epoch."""
        while True:   # next(), not `for`: iter() on a DALI iterator that has been read resets it
            try:
                next(self._it)
            except StopIteration:
                break
        self._it.reset()
        self._pipe_epoch = epoch + 1
        ck = self._it.checkpoints()[0] if self.train else None
        self._state = {"epoch": epoch + 1, "build_epoch": self._build_epoch, "dali": ck}

    def __iter__(self):
        epoch = self.epoch
        slot = self.plan.slot(self.rank, epoch)
        lo, hi = self.plan.id_range(slot)
        real = hi - lo
        flip_gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, 2))
        mix_gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, self.rank, 3))
        flip = self.train and self.preset.flip
        crop = self.train and self.preset.crop == "rrc"
        extras = torch_extras(self.preset, self.cfg) if self.train and not self.on_gpu else None
        b, last = 0, len(self) - 1
        rolled = False
        try:
            try:
                if self._pipe is None or self._pipe_epoch != epoch:
                    self._drop()
                    self._pipe, self._it = self._build(epoch)   # builds and prefetches: may read bad data
                    self._pipe_epoch = epoch
            except RuntimeError as err:
                raise _ReadError(err) from None
            it = self._it
            for b in range(len(self)):
                try:
                    out = next(it)[0]
                except RuntimeError as err:   # only DALI's own reading is diagnosed (not an OOM
                    raise _ReadError(err) from None  # or a bug in the code below)
                ids = out["ids"].reshape(-1).to(torch.int64).cpu().clone()
                if not self.train:   # FILL repeats the last sample: those rows are padding
                    ids[max(0, real - b * self.batch_size):] = -1
                images = out["images"]
                if not self.on_gpu:
                    flips = (torch.rand(len(ids), generator=flip_gen) < 0.5).tolist() if flip else [False] * len(ids)
                    images = resize_batch(images, out["shapes"], self.cfg.size, flips, antialias=not crop,
                                          pool=self.pool, buffers=self._u8_buffers)
                    if extras is not None:
                        apply_extras(images, extras, mix_seed(self.seed, epoch, self.rank, 7, b))
                batch = self._finish(images, out["labels"], ids, mix_gen)   # owns its memory
                if b == last:   # before the last yield: a consumer that stops there never resumes us
                    try:
                        self._roll_over(epoch)
                    except RuntimeError:   # reset() prefetches the next epoch: its bad data is
                        self._drop()       # that epoch's to report, from a fresh build
                    rolled = True
                yield batch
        except _ReadError as read:
            # the epoch the failing pipeline was built for (set before DALI builds it: also right
            # for a pipeline restored from a checkpoint that failed while it prefetched)
            built = self._build_epoch if self._build_epoch is not None else epoch
            self._drop()
            err = read.error
            if isinstance(err, ShardDataError) or is_out_of_memory(err):
                raise err.with_traceback(None) from None
            # the reader is about a shuffle buffer and a few batches ahead of the batch that
            # failed: a CPU scan of what it had read by then (bounded: a whole rank's range can be
            # 100k images) names the bad sample; otherwise DALI's error goes up
            ahead = (b + 4) * self.batch_size + max(1, self.cfg.shuffle_buffer)
            found = self._bad_data_error(*self._reading_order(epoch, built, lo, hi, ahead))
            if found is None:
                raise err.with_traceback(None) from None
            raise found from err.with_traceback(None)   # its frames would keep the pipeline alive
        finally:
            if not rolled and self._pipe_epoch == epoch:   # stopped part-way: the next epoch rebuilds
                self._drop()

    def _reading_order(self, epoch: int, built: int, lo: int, hi: int,
                       count: int) -> tuple[list[tuple[int, int]], bool]:
        """(the first `count` ids this rank's reader takes in `epoch`, as id_runs; whether that
        order is only partly known). Written order: ids [lo, hi) of the rank's slot. DALI's
        per-epoch tar order: replayed by a reader-only pipeline with the same seed, epochs
        `built`..`epoch` (ids only, no decoding); if that reader fails too (a cut tar, a damaged
        index), the ids it got that far, and the order is partly known."""
        seed = self._tar_order_seed(built)
        if seed is None:
            return [(lo, min(hi, lo + count))], False
        ids: list[int] = []
        try:
            shards = self.info.shards
            probe = _order_probe_def()(
                [str(s.path) for s in shards], [str(s.index_path) for s in shards],
                shard_id=self.plan.slot(self.rank, built), num_shards=self.world_size,
                tar_order_seed=seed, batch_size=max(1, min(1024, count)), num_threads=1, device_id=None)
            probe.build()
            for e in range(built, epoch + 1):
                ids.clear()
                for _ in range(-(-self.plan.slots // probe.max_batch_size)):   # one shard: an epoch
                    (out,) = probe.run()
                    if e == epoch:
                        ids.extend(int(out.at(i).item()) for i in range(len(out)))
                    if e == epoch and len(ids) >= count:
                        break
            del probe
            return id_runs(ids[:count]), False
        except RuntimeError:
            return id_runs(ids[:count]), True

    def _bad_data_error(self, runs: list[tuple[int, int]], partly_known: bool = False):
        """A ShardDataError naming the bad sample(s) among the ids `runs` (id_runs) -- and, when
        the reading order is `partly_known`, any truncated tar or index of the split -- or None
        when a CPU scan of them finds nothing wrong (then the data is not what failed there)."""
        problems = file_problems(self.info.shards) if partly_known else []
        problems += [p for a, b in runs for p in find_bad_samples(self.info.shards, a, b)]
        problems = list(dict.fromkeys(problems))      # a cut tar can be found both ways
        if not problems:
            return None
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        root = self.info.shards[0].path.parent
        ids = ", ".join(f"{a}..{b - 1}" for a, b in runs) + (" and every tar's size and index" if partly_known else "")
        return ShardDataError(
            f"DALI failed reading split {self.split!r}; a CPU check of the samples it was reading (ids "
            f"{ids}) found: {problems[0]}{more}. {verify_hint(root)}; restore the files "
            "from a good copy or re-run `python -m mlic_dist.shard` for the dataset")
