"""Whether the shard files on disk are whole and readable, and which file and sample are at fault.

The readers' own errors name no sample: DALI says "nvImageCodec failure" or blames the index of a
truncated tar, webdataset hands back a sample without its .jpg, libjpeg says "Not a JPEG file".
Everything here names the tar, the sample key and the fix, through one exception type,
`ShardDataError`, that the trainer prints as one line:
- `check_shard_size(shard)`: cheap (a stat and the small .idx, no hashing), run by `read_manifest`
  for every shard: the tar is as long as the manifest recorded (`"bytes"`) or, for manifests
  written before that field, at least as long as its index says.
- `read_index`, `tar_members`, `index_mismatch`: the wds2idx index agrees with the tar.
- `decode_problem(jpeg)`: the loaders' strict decoder (torchvision's libjpeg-turbo `decode_jpeg`,
  which rejects some streams DALI's decoder tolerates: a superset of what breaks training).
- `find_bad_samples(shards, lo, hi)`: all of the above over an id range; `DaliLoader` runs it on
  its rank's range when the pipeline fails, to turn DALI's error into a named sample.
`python -m mlic_dist.shard verify DIR --decode` (mlic_dist/shard/verify.py) runs them over a
whole shard directory.
"""
from __future__ import annotations

import tarfile
import warnings
from pathlib import Path
from typing import Collection, Iterator, Optional, Sequence

from ..errors import ShardDataError  # noqa: F401 (raised here; defined with the other error kinds)

REQUIRED_EXTS = ("jpg", "lbl", "id")   # what the loaders read (docs/contracts.md "Shards")


def verify_hint(root) -> str:
    return f"`python -m mlic_dist.shard verify {root} --decode` lists every bad sample"


def sample_error(tar, key, sample_id, what: str) -> ShardDataError:
    """The one wording both loaders use for a bad sample."""
    sid = "" if sample_id is None else f" (id {sample_id})"
    return ShardDataError(
        f"{tar}: sample {key!r}{sid} {what}. The shard is corrupt: {verify_hint(Path(tar).parent)}; "
        "restore the file from a good copy or re-run `python -m mlic_dist.shard` for the dataset")


# --------------------------------------------------------------------------------------------
# sizes and the wds2idx index

def split_name(name: str) -> tuple[str, str]:
    """("dir/key", "ext"): webdataset and wds2idx split a member name at the first dot of its
    basename."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def read_index(idx) -> tuple[int, list[tuple[str, dict]]]:
    """Parse a wds2idx index: (declared sample count, [(key, {ext: (offset, size)})] in tar order).

    Format (DALI tools/wds2idx.py): a "v1.2 N" line, then one line per sample of
    "ext offset size name" groups (v1.1: "ext offset size", no name)."""
    idx = Path(idx)
    try:
        lines = idx.read_text().splitlines()
        version, count = lines[0].split()
        count = int(count)
    except (OSError, UnicodeDecodeError, ValueError, IndexError) as e:
        raise ShardDataError(f"index {idx} is unreadable or malformed ({type(e).__name__}: {e}); re-run "
                             "`python -m mlic_dist.shard` (or rebuild it: wds2idx TAR IDX)") from None
    step = 3 if version == "v1.1" else 4
    entries = []
    for lineno, line in enumerate(lines[1:], start=2):
        parts = line.split()
        try:
            if not parts or len(parts) % step:
                raise ValueError(f"{len(parts)} fields")
            comps = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), step)}
        except ValueError as e:
            raise ShardDataError(f"index {idx} line {lineno} is malformed ({e}); re-run "
                                 "`python -m mlic_dist.shard` (or rebuild it: wds2idx TAR IDX)") from None
        key = split_name(parts[3])[0] if step == 4 else f"#{lineno - 2}"
        entries.append((key, comps))
    return count, entries


def size_problem(shard) -> Optional[str]:
    """Why `shard` (a manifest.ShardInfo) cannot be whole, judged by its length; None if it can.
    Compares with the manifest's "bytes" when recorded, else with the extent its index implies."""
    try:
        size = shard.path.stat().st_size
    except OSError as e:
        return f"cannot be read ({e})"
    if shard.bytes is not None:
        if size == shard.bytes:
            return None
        how = "truncated" if size < shard.bytes else "changed since it was written"
        return (f"is {size} bytes on disk but the manifest recorded {shard.bytes} bytes: the file is "
                f"{how} (an interrupted copy or download?)")
    _, entries = read_index(shard.index_path)
    extent = max((off + n for _, comps in entries for off, n in comps.values()), default=0)
    if size < extent:
        return (f"is {size} bytes on disk but its index {shard.index_path.name} places data up to byte "
                f"{extent}: the file is truncated (an interrupted copy or download?)")
    return None


def shard_size_error(shard, problem: str) -> ShardDataError:
    return ShardDataError(
        f"shard {shard.path} {problem}. Copy it again from the original, or re-run "
        f"`python -m mlic_dist.shard` for the dataset; `python -m mlic_dist.shard verify "
        f"{shard.path.parent}` checks every shard")


def check_shard_size(shard) -> None:
    """Raise ShardDataError when `shard` is truncated or changed; also checks that its index
    declares the manifest's sample count (a stale index misplaces every sample)."""
    problem = size_problem(shard)
    if problem:
        raise shard_size_error(shard, problem)
    with open(shard.index_path, encoding="utf-8", errors="replace") as f:
        head = f.readline(200).split()
    if len(head) != 2 or not head[1].isdigit() or int(head[1]) != shard.num_samples:
        raise ShardDataError(
            f"index {shard.index_path} declares {' '.join(head) or 'nothing'!r} but the manifest says "
            f"{shard.path.name} holds {shard.num_samples} samples: the index does not belong to this "
            "tar; re-run `python -m mlic_dist.shard` (or rebuild it: wds2idx TAR IDX)")


# --------------------------------------------------------------------------------------------
# the tar itself

def tar_members(tar) -> list[tuple[str, str, int, int]]:
    """[(key, ext, data offset, size)] of the regular files in `tar`, in order (headers only).
    tarfile stops quietly at a header boundary of a truncated tar: compare with the index."""
    out = []
    with tarfile.open(tar, "r:") as t:
        for m in t:
            if m.isfile():
                key, ext = split_name(m.name)
                out.append((key, ext, m.offset_data, m.size))
    return out


def index_mismatch(entries: list[tuple[str, dict]], members: list[tuple[str, str, int, int]]) -> Optional[str]:
    """The first disagreement between an index and the tar's members, or None."""
    by_sample: list[tuple[str, dict]] = []
    for key, ext, off, size in members:
        if not key or key.endswith("/"):
            continue   # wds2idx skips hidden files the same way
        if not by_sample or by_sample[-1][0] != key:
            by_sample.append((key, {}))
        by_sample[-1][1][ext] = (off, size)
    if len(entries) != len(by_sample):
        return f"the index lists {len(entries)} samples, the tar holds {len(by_sample)}"
    for i, ((ikey, icomps), (tkey, tcomps)) in enumerate(zip(entries, by_sample)):
        if not ikey.startswith("#") and ikey != tkey:
            return f"index entry {i} is sample {ikey!r}, the tar's is {tkey!r}"
        if icomps != tcomps:
            return f"sample {tkey!r}: the index has {icomps}, the tar {tcomps}"
    return None


def iter_samples(tar, read: Optional[Collection[str]] = None) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) for each sample of `tar` in written order; parts whose extension is
    not in `read` (None = all) map to None, unread (labels need no JPEG bytes). ShardDataError
    when the tar cannot be read to its end (a member cut short, a broken header)."""
    key, comps = None, {}
    try:
        size = Path(tar).stat().st_size
        with tarfile.open(tar, "r:") as t:
            for m in t:
                if not m.isfile():
                    continue
                k, ext = split_name(m.name)
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError(f"member {m.name} ends at byte {m.offset_data + m.size}, "
                                            f"past the end of the {size}-byte file")
                data = t.extractfile(m).read() if read is None or ext in read else None
                if k != key:
                    if key is not None:
                        yield key, comps
                    key, comps = k, {}
                comps[ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardDataError(f"{tar}: unreadable after sample {key!r} ({type(e).__name__}: {e}): the "
                             f"file is truncated or corrupt; {verify_hint(Path(tar).parent)}") from None
    if key is not None:
        yield key, comps


def decode_problem(jpeg: bytes) -> Optional[str]:
    """None when `jpeg` decodes with the loaders' CPU decoder, else libjpeg's reason."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with warnings.catch_warnings():   # torchvision 0.29 deprecates its decoders: not our news
            warnings.simplefilter("ignore")
            decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        return f"cannot be decoded as a JPEG ({decoder_reason(e)})"
    return None


def decoder_reason(err: BaseException) -> str:
    """libjpeg's words without torchvision's "decode_jpeg, FILE.cpp:LINE, " prefix."""
    return str(err).rsplit(".cpp:", 1)[-1].split(", ", 1)[-1].strip() or type(err).__name__


# --------------------------------------------------------------------------------------------
# an id range, for a loader whose reader failed

def _file_problem(shard) -> Optional[str]:
    """A truncated tar or an index that disagrees with its tar (one line), or None."""
    problem = size_problem(shard)
    if problem:
        return f"{shard.path} {problem}"
    try:
        mismatch = index_mismatch(read_index(shard.index_path)[1], tar_members(shard.path))
    except (ShardDataError, tarfile.TarError, OSError) as e:
        mismatch = str(e)
    if mismatch:
        return (f"{shard.path}: its index {shard.index_path.name} disagrees with it "
                f"({mismatch}); re-run `python -m mlic_dist.shard`")
    return None


def file_problems(shards: Sequence, limit: int = 20) -> list[str]:
    """Truncated tars and index/tar disagreements among `shards`, without decoding anything (a
    reader that fails before it reads a sample: which tar it was at is unknown)."""
    return [p for p in map(_file_problem, shards) if p][:limit]


def find_bad_samples(shards: Sequence, lo: int, hi: int, limit: int = 20) -> list[str]:
    """Problems (one line each, "TAR: ...") in the samples with ids in [lo, hi) of `shards`
    (manifest.ShardInfo, in id order): truncated tars, index/tar disagreements, missing parts,
    wrong ids, undecodable images. Reads and decodes that range on the CPU."""
    problems: list[str] = []
    for shard in shards:
        if shard.first_id >= hi or shard.first_id + shard.num_samples <= lo:
            continue
        problem = _file_problem(shard)
        if problem:
            problems.append(problem)
            continue
        try:
            for pos, (key, comps) in enumerate(iter_samples(shard.path)):
                sid = shard.first_id + pos
                if sid >= hi:
                    break
                if sid < lo:
                    continue
                what = sample_problem(comps, sid)
                if what:
                    problems.append(f"{shard.path}: sample {key!r} (id {sid}) {what}")
                if len(problems) >= limit:
                    return problems
        except (ShardDataError, tarfile.TarError, OSError) as e:
            problems.append(str(e) if isinstance(e, ShardDataError) else f"{shard.path}: {e}")
    return problems[:limit]


def sample_problem(comps: dict, expected_id: Optional[int], decode: bool = True) -> Optional[str]:
    """What is wrong with one sample's parts ({ext: bytes}), or None."""
    missing = [e for e in REQUIRED_EXTS if e not in comps]
    if missing:
        return "lacks " + ", ".join(f".{e}" for e in missing)
    if len(comps["id"]) != 8:
        return f"has a {len(comps['id'])}-byte .id (expected 8: int64 little-endian)"
    sid = int.from_bytes(comps["id"], "little", signed=True)
    if expected_id is not None and sid != expected_id:
        return f"has .id {sid} but sits at position {expected_id} of its split"
    return decode_problem(comps["jpg"]) if decode else None
