"""The demo's dataset: multi-label "scenes" composed offline from scikit-image's bundled photographs.

Each scene (320x240 JPEG) is a crop of a texture photograph (brick, grass, gravel, moon, Hubble
deep field, immunohistochemistry) with 1-4 objects pasted in, cut from the photographs that ship
inside the scikit-image wheel (no pooch download): a cat, an astronaut, the space shuttle, the
flag and the helmet of the astronaut photo, a rocket, a coffee cup, coins, a clock, a cameraman,
a motorcycle (two stereo views), a face (100 LFW faces), a cell, a retina, chalk text and a
printed page. 16 classes. The task is kept hard on purpose (a pretrained MobileNetV2 must not
saturate it): objects are small, partial views (a random sub-window of the object), rotated,
recoloured, partly outside the frame and partly hidden under other objects and under clutter
(patches cut from the texture photographs). A label is given iff at least `min_visible` of
the object's pixels stay visible; objects that would end up more hidden are not pasted, so every
pasted object is labelled and every label is visible.

Scene j of a split is drawn from `np.random.default_rng([seed, split_code, j])`: the same seed
gives the same bytes whatever the worker count, and val/test do not change with n_train.

    python -m mlic_dist.demo.scenes data/scenes --n-train 800 --n-val 200 --n-test 200 [--workers 2]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import replace_with
from ..cli import entry_point

# Bumped whenever the drawing changes, so a cached build of an older version is rebuilt.
GENERATOR_VERSION = 3
SPLITS = ("train", "val", "test")

# class -> (skimage.data function, (left, top, right, bottom) crop, mask shape). Crops never
# contain another class's object (the astronaut photo gives four disjoint classes).
OBJECTS = {
    "cat": ("chelsea", (60, 20, 330, 290), "rect"),
    "astronaut": ("astronaut", (100, 10, 350, 320), "rect"),
    "shuttle": ("astronaut", (352, 0, 475, 285), "rect"),
    "flag": ("astronaut", (0, 0, 90, 240), "rect"),
    "helmet": ("astronaut", (280, 340, 512, 512), "ellipse"),
    "rocket": ("rocket", (280, 120, 362, 410), "rect"),
    "coffee": ("coffee", (70, 10, 490, 395), "rect"),
    "coins": ("coins", (0, 0, 384, 303), "rect"),
    "clock": ("clock", (110, 60, 310, 250), "ellipse"),
    "cameraman": ("camera", (0, 50, 410, 512), "rect"),
    "motorcycle": ("stereo_motorcycle", (90, 90, 690, 455), "rect"),
    "face": ("lfw_subset", None, "rect"),
    "cell": ("cell", (335, 285, 515, 465), "ellipse"),
    "retina": ("retina", (0, 0, 1411, 1411), "ellipse"),
    "text": ("text", (0, 0, 448, 172), "rect"),
    "page": ("page", (0, 0, 384, 191), "rect"),
}
CLASSES = list(OBJECTS)
# Photographs with none of the classes in them: scene backgrounds and clutter patches.
TEXTURES = ("brick", "grass", "gravel", "moon", "hubble_deep_field", "immunohistochemistry")
CLUTTER_ONLY = ("microaneurysms",)
MAX_SOURCE_SIDE = 192   # sources are shrunk once to this (objects never get larger)


@dataclass(frozen=True)
class SceneSpec:
    """How hard the scenes are. Lengths are fractions of the scene height unless said otherwise."""
    size: tuple[int, int] = (320, 240)          # (width, height) of a scene in px
    objects: tuple[int, int] = (1, 4)           # objects per scene (inclusive range)
    object_side: tuple[float, float] = (0.25, 0.55)   # longest side of a pasted object
    sub_window: float = 0.8                     # an object shows a random window of >= this x its crop
    rotation_deg: float = 20.0                  # rotation in [-r, r]
    colour_jitter: float = 0.25                 # per-channel gain / brightness / contrast spread
    grayscale_p: float = 0.1                    # chance an object or texture loses its colour
    max_outside: float = 0.3                    # fraction of an object's width/height that may leave the frame
    min_visible: float = 0.55                   # fraction of an object's pixels that must stay visible
    clutter: tuple[int, int] = (1, 4)           # clutter patches per scene (inclusive range)
    clutter_side: tuple[float, float] = (0.15, 0.45)
    clutter_over_p: float = 0.35                # chance a clutter patch goes over the objects
    quality: int = 90                           # JPEG quality


@dataclass
class Placed:
    """One pasted object (what the tests check labels and pixels against)."""
    name: str
    variant: int                # which source photo of the class (faces: 0..99)
    box: tuple[int, int, int, int]   # (x, y, w, h) of the pasted patch, may extend past the frame
    area: int                   # opaque pixels of the patch, inside the frame or not
    visible: int = 0            # of those, pixels in the frame not covered by later patches
    flip: bool = False
    angle: float = 0.0


@dataclass
class Layout:
    owner: np.ndarray                       # (H, W) int8: index into objects, -1 background/clutter
    objects: list[Placed] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# sources


def _rgb(a: np.ndarray) -> np.ndarray:
    """(H, W[, C]) bool/float/uint8 -> (H, W, 3) uint8."""
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        a = np.clip(a * 255 if a.max() <= 1.0 else a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


def _shrink(im: Image.Image, side: int) -> Image.Image:
    scale = side / max(im.size)
    if scale >= 1:
        return im
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)


def _with_mask(im: Image.Image, shape: str) -> Image.Image:
    """RGBA: opaque rectangle, or the inscribed ellipse (round objects: retina, clock, cell)."""

    alpha = Image.new("L", im.size, 255 if shape == "rect" else 0)
    if shape == "ellipse":
        ImageDraw.Draw(alpha).ellipse((0, 0, im.width - 1, im.height - 1), fill=255)
    out = im.convert("RGBA")
    out.putalpha(alpha)
    return out


def _sources() -> tuple[list[Image.Image], dict[str, list[Image.Image]]]:
    """(textures as RGB, class -> its RGBA object photos). Only files inside the wheel."""
    import skimage.data as d

    cache: dict = {}

    def load(name):   # the astronaut photo serves four classes: read it once
        if name not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # lfw_subset / stereo_motorcycle precision notes
                cache[name] = getattr(d, name)()
        return cache[name]

    textures = [_shrink(Image.fromarray(_rgb(load(n))), 512) for n in TEXTURES + CLUTTER_ONLY]
    objects: dict[str, list[Image.Image]] = {}
    for name, (fn, box, shape) in OBJECTS.items():
        if fn == "lfw_subset":
            # (200, 25, 25): the first 100 are faces, the rest background patches (some show
            # parts of faces), which are no use as either class or clutter
            photos = [Image.fromarray(_rgb(f)) for f in load(fn)[:100]]
        elif fn == "stereo_motorcycle":
            left, right, _ = load(fn)                                          # two views
            photos = [Image.fromarray(_rgb(v)).crop(box) for v in (left, right)]
        else:
            photos = [Image.fromarray(_rgb(load(fn))).crop(box)]
        objects[name] = [_with_mask(_shrink(p, MAX_SOURCE_SIDE), shape) for p in photos]
    return textures, objects


# --------------------------------------------------------------------------------------------
# drawing


def _jitter(rgb: np.ndarray, rng: np.random.Generator, spec: SceneSpec) -> np.ndarray:
    """Recolour (h, w, 3) float32: grayscale sometimes, then contrast, brightness and a colour cast."""
    j = spec.colour_jitter
    if rng.random() < spec.grayscale_p:
        rgb = np.repeat(rgb.mean(-1, keepdims=True), 3, -1)
    # ((x - mean) * contrast + mean) * gain, as one multiply-add: (3,) scale and offset per channel
    gain = rng.uniform(1 - j / 2, 1 + j / 2, 3) * rng.uniform(1 - j, 1 + j)   # colour cast x brightness
    contrast = rng.uniform(1 - j, 1 + j)
    scale = (contrast * gain).astype(np.float32)
    offset = (float(rgb.mean()) * (1 - contrast) * gain).astype(np.float32)
    out = rgb * scale
    out += offset
    return np.clip(out, 0, 255, out=out)


def _patch(src: Image.Image, side_px: float, rng: np.random.Generator, spec: SceneSpec,
           window: float) -> tuple[np.ndarray, np.ndarray, bool, float]:
    """A random view of `src`: sub-window, scale to `side_px`, flip, rotate, recolour.
    Returns rgb (h, w, 3) float32, alpha (h, w) float32 in [0, 1], flip, angle."""
    w, h = src.size
    fw, fh = rng.uniform(window, 1.0, 2)
    cw, ch = max(1, int(w * fw)), max(1, int(h * fh))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = src.crop((x0, y0, x0 + cw, y0 + ch))
    scale = side_px / max(cw, ch)
    im = im.resize((max(4, round(cw * scale)), max(4, round(ch * scale))), Image.BILINEAR)
    flip = bool(rng.random() < 0.5)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-spec.rotation_deg, spec.rotation_deg)) if spec.rotation_deg else 0.0
    if angle:
        im = im.rotate(angle, Image.BILINEAR, expand=True)
    a = np.asarray(im, dtype=np.float32)
    return _jitter(a[..., :3], rng, spec), a[..., 3] / 255.0, flip, angle


def _clip(x: int, y: int, w: int, h: int, size: tuple[int, int]):
    """Frame slice and patch slice of a patch at (x, y); None when nothing is in the frame."""
    W, H = size
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x0 >= x1 or y0 >= y1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))


def _composite(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, frame, part) -> None:
    a = alpha[part][..., None]            # (h', w', 1)
    canvas[frame] = canvas[frame] * (1 - a) + rgb[part] * a


def _background(textures, rng, spec: SceneSpec) -> np.ndarray:
    """(H, W, 3) float32: a random 4:3 window of a texture photo, recoloured."""
    tex = textures[rng.integers(len(TEXTURES))]
    W, H = spec.size
    side = rng.uniform(0.35, 1.0) * min(tex.width / W, tex.height / H)
    cw, ch = max(8, int(W * side)), max(8, int(H * side))
    x, y = int(rng.integers(0, tex.width - cw + 1)), int(rng.integers(0, tex.height - ch + 1))
    bg = tex.crop((x, y, x + cw, y + ch)).resize(spec.size, Image.BILINEAR)
    return _jitter(np.asarray(bg, dtype=np.float32), rng, spec)


def _clutter(canvas, layout: Layout, textures, rng, spec: SceneSpec, guard: bool) -> None:
    """Paste one texture patch (rect or ellipse); over objects (`guard`) only where it leaves
    every object at least min_visible (else the patch is dropped)."""
    tex = textures[rng.integers(len(textures))]
    H = spec.size[1]
    side = rng.uniform(*spec.clutter_side) * H
    src_side = min(int(side * rng.uniform(1.0, 3.0)), tex.width, tex.height)   # texture px cut
    x, y = int(rng.integers(0, tex.width - src_side + 1)), int(rng.integers(0, tex.height - src_side + 1))
    src = _with_mask(tex.crop((x, y, x + src_side, y + src_side)), "rect" if rng.random() < 0.5 else "ellipse")
    rgb, alpha, _, _ = _patch(src, side, rng, spec, window=0.5)
    h, w = alpha.shape
    x = int(rng.integers(-w // 3, spec.size[0] - 2 * w // 3 + 1))
    y = int(rng.integers(-h // 3, H - 2 * h // 3 + 1))
    clip = _clip(x, y, w, h, spec.size)
    if clip is None:
        return
    frame, part = clip
    covered = alpha[part] > 0.5
    if guard and not _keeps_visible(layout, layout.owner[frame][covered], spec):
        return
    layout.owner[frame][covered] = -1
    _recount(layout)
    _composite(canvas, rgb, alpha, frame, part)


def _keeps_visible(layout: Layout, covered_owner: np.ndarray, spec: SceneSpec) -> bool:
    """Would covering these owner pixels leave every placed object >= min_visible?"""
    if not layout.objects:
        return True
    lost = np.bincount(covered_owner[covered_owner >= 0], minlength=len(layout.objects))
    return all(o.visible - n >= spec.min_visible * o.area for o, n in zip(layout.objects, lost))


def _recount(layout: Layout) -> None:
    """Each object's visible pixels = its cells of the owner map."""
    if layout.objects:
        counts = np.bincount(layout.owner[layout.owner >= 0], minlength=len(layout.objects))
        for o, n in zip(layout.objects, counts):
            o.visible = int(n)


def _place(canvas, layout: Layout, name: str, objects, rng, spec: SceneSpec, must: bool) -> None:
    """Paste one object of class `name` where it and every earlier object stay >= min_visible;
    8 random positions, then (must: the scene's first object, pasted on no other) the centre,
    which always fits; else the object is left out."""
    W, H = spec.size
    variant = int(rng.integers(len(objects[name])))
    side = rng.uniform(*spec.object_side) * H
    rgb, alpha, flip, angle = _patch(objects[name][variant], side, rng, spec, spec.sub_window)
    h, w = alpha.shape
    opaque = alpha > 0.5
    area = int(opaque.sum())
    mx, my = int(w * spec.max_outside), int(h * spec.max_outside)
    positions = [(int(rng.integers(-mx, W - w + mx + 1)), int(rng.integers(-my, H - h + my + 1)))
                 for _ in range(8)]
    if must:
        positions.append(((W - w) // 2, (H - h) // 2))
    for x, y in positions:
        clip = _clip(x, y, w, h, spec.size)
        if clip is None:
            continue
        frame, part = clip
        covered = opaque[part]
        if covered.sum() < spec.min_visible * area or not _keeps_visible(layout, layout.owner[frame][covered], spec):
            continue
        layout.objects.append(Placed(name, variant, (x, y, w, h), area, flip=flip, angle=angle))
        layout.owner[frame][covered] = len(layout.objects) - 1
        _recount(layout)
        _composite(canvas, rgb, alpha, frame, part)
        return


def make_scene(rng: np.random.Generator, backgrounds, objects, first: str | None = None,
               spec: SceneSpec = SceneSpec()) -> tuple[Image.Image, list[str], Layout]:
    """One scene: (RGB image of spec.size, sorted labels, layout). `backgrounds`, `objects` come
    from `_sources()`; `first` (a class) is always pasted (build_scenes cycles it through the
    classes so every split has every class)."""
    W, H = spec.size
    canvas = _background(backgrounds, rng, spec)                   # (H, W, 3) float32
    layout = Layout(np.full((H, W), -1, np.int8))
    n_clutter = int(rng.integers(spec.clutter[0], spec.clutter[1] + 1))
    over = rng.random(n_clutter) < spec.clutter_over_p
    for _ in range(int((~over).sum())):                               # under the objects
        _clutter(canvas, layout, backgrounds, rng, spec, guard=False)
    n = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
    first = first if first is not None else CLASSES[rng.integers(len(CLASSES))]
    others = [c for c in CLASSES if c != first]
    names = [first, *rng.choice(others, size=n - 1, replace=False)]
    for i, name in enumerate(names):
        _place(canvas, layout, str(name), objects, rng, spec, must=(i == 0))
    for _ in range(int(over.sum())):                                  # over them, guarded
        _clutter(canvas, layout, backgrounds, rng, spec, guard=True)
    image = Image.fromarray(np.rint(canvas).astype(np.uint8))
    return image, sorted(o.name for o in layout.objects), layout


# --------------------------------------------------------------------------------------------
# building a dataset


_WORKER: dict = {}


def _init_worker() -> None:
    _WORKER["sources"] = _sources()


def _render(job: tuple[Path, int, str, int, SceneSpec]) -> tuple[str, list[str]]:
    """Draw and write one scene; returns (relative path, labels). Runs in a worker."""
    root, seed, split, j, spec = job
    if "sources" not in _WORKER:
        _init_worker()
    backgrounds, objects = _WORKER["sources"]
    rng = np.random.default_rng([seed, SPLITS.index(split), j])
    image, names, _ = make_scene(rng, backgrounds, objects, first=CLASSES[j % len(CLASSES)], spec=spec)
    rel = f"images/{split}_{j:06d}.jpg"
    image.save(root / rel, quality=spec.quality)
    return rel, names


def build_scenes(root: str | Path, n_train: int = 800, n_val: int = 200, n_test: int = 200,
                 seed: int = 0, workers: int = 0, spec: SceneSpec = SceneSpec()) -> Path:
    """Write ROOT/images/{split}_NNNNNN.jpg, ROOT/labels.csv (image, labels, split) and
    ROOT/scenes.json (what was built); returns the CSV. A build with the same arguments is
    reused; any other build in ROOT is replaced. workers: processes (0 = min(2, CPUs))."""
    root = Path(root)
    csv_path, info_path = root / "labels.csv", root / "scenes.json"
    info = {"generator_version": GENERATOR_VERSION, "seed": seed, "classes": CLASSES,
            "counts": {"train": n_train, "val": n_val, "test": n_test}, "spec": asdict(spec)}
    info = json.loads(json.dumps(info))     # tuples -> lists, as read back
    if csv_path.is_file() and info_path.is_file() and json.loads(info_path.read_text()) == info:
        return csv_path
    images = root / "images"
    csv_path.unlink(missing_ok=True)         # the CSV's presence marks a complete build
    if images.is_dir():
        for old in images.glob("*.jpg"):
            old.unlink()
    images.mkdir(parents=True, exist_ok=True)
    jobs = [(root, seed, split, j, spec) for split, n in zip(SPLITS, (n_train, n_val, n_test))
            for j in range(n)]
    workers = workers or min(2, os.cpu_count() or 1)
    if workers == 1 or len(jobs) < 64:
        rows = [_render(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker) as pool:
            rows = list(pool.map(_render, jobs, chunksize=32))
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    with replace_with(csv_path) as tmp, open(tmp, "w", newline="") as f:   # last: the CSV marks a whole build
        writer = csv.writer(f)
        writer.writerow(["image", "labels", "split"])
        for (rel, names), job in zip(rows, jobs):
            writer.writerow([rel, "|".join(names), job[2]])
    return csv_path


@entry_point
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.demo.scenes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="output directory (images/, labels.csv, scenes.json)")
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes; 0 = min(2, CPUs)")
    args = p.parse_args(argv)
    print(build_scenes(args.root, args.n_train, args.n_val, args.n_test, args.seed, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
