"""Shard discovery, shard indexes and header-only tar access.

A shard is a WebDataset tar: members ``<key>.<ext>`` grouped into samples by key (the path up to the first dot of the
basename).  Local shards are read with random access: one pass over the tar headers (no payload is read) gives every
member's offset and size, so a sample can be read, or skipped, without touching the others.  Remote shards
(``pipe:``, ``http://`` ...) are read as a stream through ``webdataset.gopen``.

Two more local shard kinds read the same way: a plain video/image file (one sample) and a file list (a CSV in
Open-Sora's layout or a JSONL, ``datamodules/filelist.py``): its rows are the samples, in row order, each a file on
disk plus the small members (caption, metadata, class) its row gives.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import tarfile
from collections import OrderedDict
from typing import Iterator, Sequence

import braceexpand

from .filelist import is_file_list, list_samples

INDEX_NAME = "index.json"
INDEX_FORMAT = "vidgen-shards/1"
VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov", "m4v")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


class ShardError(ValueError):
    """Shard patterns that match nothing or unreadable indexes."""


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(spec: str | Sequence[str], *, what: str = "shards") -> list[str]:
    """Brace patterns, globs, directories (every ``*.tar`` inside) or lists of these -> sorted unique shard urls."""
    items = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for n, item in enumerate(items):
        entry = what if isinstance(spec, str) else f"{what}[{n}]"
        for pattern in braceexpand.braceexpand(str(item)):
            if is_remote(pattern):
                urls.append(pattern)
            elif os.path.isdir(pattern):
                found = sorted(glob.glob(os.path.join(pattern, "*.tar")))
                if not found:
                    raise ShardError(f"{entry}: directory {pattern!r} holds no *.tar shards; build some with `vidgen shards`")
                urls.extend(found)
            elif any(c in pattern for c in "*?["):
                found = sorted(glob.glob(pattern))
                if not found:  # every entry must match something: a typo beside a good entry is not ignored
                    raise ShardError(f"{entry}: pattern {pattern!r} matches no files; fix the path or drop the entry")
                urls.extend(found)
            else:
                urls.append(pattern)
    missing = [u for u in urls if not is_remote(u) and not os.path.isfile(u)]
    if missing:
        raise ShardError(
            f"{what}: {len(missing)} shard(s) do not exist, e.g. {missing[0]!r}. "
            "Check the path/brace pattern, or run `vidgen demo-data` for the demo shards."
        )
    if not urls:
        raise ShardError(f"{what}: pattern {spec!r} matches no files; give a brace pattern, a directory or a list of .tar files")
    return list(OrderedDict.fromkeys(urls))


def read_index(url: str) -> dict | None:
    """The ``index.json`` beside a local shard, or None."""
    if is_remote(url):
        return None
    path = os.path.join(os.path.dirname(os.path.abspath(url)), INDEX_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"shard index {path} is unreadable ({e}); rebuild it with `vidgen shards --reindex`") from e
    if "shards" not in index:
        raise ShardError(f"shard index {path} has no 'shards' table (format {INDEX_FORMAT} expected)")
    return index


def split_member(name: str) -> tuple[str, str] | None:
    """``dir/0001.mp4`` -> (``dir/0001``, ``mp4``); WebDataset's rule: the extension starts at the basename's first dot."""
    dirname, base = os.path.split(name)
    if base.startswith(".") or base.startswith("__") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (os.path.join(dirname, stem) if dirname else stem), ext.lower()


@dataclasses.dataclass
class SampleRef:
    """Where one sample's members live inside a local tar: ext -> (offset, size). A file list's row has its media
    member in ``file`` (the whole file) and its small members in ``inline``."""

    key: str
    members: dict[str, tuple[int, int]]
    file: str | None = None
    inline: dict[str, bytes] | None = None


@dataclasses.dataclass
class ShardListing:
    url: str
    samples: list[SampleRef]
    truncated: bool = False  # the tar ended early; samples listed are the complete ones before the cut
    incomplete: int = 0  # samples cut by the truncation (0 or 1): counted as bad, not listed
    labelled: int | None = None  # samples that carry a label, where known without reading them (file lists)


#: the member a file-list sample gets instead of its media when the file cannot be read any more (``decode`` counts
#: the sample as ``unreadable``; the other rows of the list go on)
READ_ERROR = "__read_error__"
_LISTS: "OrderedDict[tuple, ShardListing]" = OrderedDict()


def is_media_file(url: str) -> bool:
    """A plain video/image file given where shards are expected: a source of one sample (e.g. a clip to predict)."""
    return not is_remote(url) and url.rsplit(".", 1)[-1].lower() in VIDEO_EXTS + IMAGE_EXTS


def list_listing(url: str) -> ShardListing:
    """The samples of a file list (``filelist.list_samples``), parsed once per process and file version; raises
    ``filelist.FileListError`` for a list that cannot be used as written."""
    st = os.stat(url)
    ck = (os.path.abspath(url), st.st_mtime_ns, st.st_size)
    if ck not in _LISTS:
        rows, labelled = list_samples(url)
        samples = [SampleRef(key, {path.rsplit(".", 1)[-1].lower(): (0, size)}, file=path, inline=members)
                   for key, path, size, members in rows]
        _LISTS[ck] = ShardListing(url, samples, labelled=labelled)
        while len(_LISTS) > 8:
            _LISTS.popitem(last=False)
    return _LISTS[ck]


def scan_local(url: str) -> ShardListing:
    """Read only the tar headers of a local shard and group members into samples (tar order)."""
    if is_file_list(url):
        return list_listing(url)
    size = os.path.getsize(url)
    if is_media_file(url):
        stem, ext = os.path.basename(url).rsplit(".", 1)
        return ShardListing(url, [SampleRef(stem, {ext.lower(): (0, size)})])
    groups: "OrderedDict[str, dict[str, tuple[int, int]]]" = OrderedDict()
    truncated, cut_key = False, None
    with open(url, "rb") as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except tarfile.TarError:
            return ShardListing(url, [], truncated=True)
        while True:
            header_at = tf.offset
            try:
                m = tf.next()
            except (tarfile.TarError, EOFError, OSError):
                truncated, cut_key = True, _key_at(f, header_at)  # cut inside a header
                break
            if m is None:
                # a complete tar ends with two zero blocks; less than that left means it was cut between members
                if size - tf.offset < 2 * tarfile.BLOCKSIZE:
                    truncated, cut_key = True, _key_at(f, tf.offset)  # a header cut short reads as the end
                break
            if not m.isfile():
                continue
            parts = split_member(m.name)
            if m.offset_data + m.size > size:  # cut inside this member's data
                truncated, cut_key = True, parts[0] if parts else None
                break
            if parts is None:
                continue
            key, ext = parts
            groups.setdefault(key, {})[ext] = (m.offset_data, m.size)
            tf.members = []  # keep memory flat on big shards
    incomplete = 0
    if truncated and cut_key is not None:
        incomplete = 1  # the sample whose member was cut is bad; the complete samples before it are kept
        if groups and next(reversed(groups)) == cut_key:
            groups.popitem(last=True)  # it lost members (caption, metadata): drop what it had
    return ShardListing(url, [SampleRef(k, v) for k, v in groups.items()], truncated, incomplete)


def _key_at(f, offset: int) -> str | None:
    """The sample key named by a (possibly cut) tar header at ``offset``, or None when too little of it is left."""
    f.seek(offset)
    raw = f.read(100)  # the member name field
    name = raw.split(b"\0", 1)[0].decode("utf-8", "replace") if b"\0" in raw or len(raw) == 100 else ""
    parts = split_member(name) if name else None
    return parts[0] if parts else None


def read_sample(url: str, ref: SampleRef, fh=None) -> dict[str, bytes]:
    if ref.file is not None:  # a file list's row: its file, and the members its row gave
        out = dict(ref.inline or {})
        try:
            with open(ref.file, "rb") as f:
                out[next(iter(ref.members))] = f.read()
        except OSError as e:
            out[READ_ERROR] = f"{ref.file}: {e.strerror or e}".encode("utf-8", "replace")
        return out
    own = fh is None
    f = open(url, "rb") if own else fh
    try:
        out = {}
        for ext, (off, size) in ref.members.items():
            f.seek(off)
            out[ext] = f.read(size)
        return out
    finally:
        if own:
            f.close()


def iter_stream(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Sequential reading of any url WebDataset can open (pipe:, http, local); yields (key, {ext: bytes}).

    A truncated stream ends the shard early (the caller counts it)."""
    import webdataset as wds

    stream = wds.gopen(url, "rb")
    try:
        tf = tarfile.open(fileobj=stream, mode="r|*")
        cur_key, cur = None, {}
        for m in tf:
            if not m.isfile():
                continue
            parts = split_member(m.name)
            if parts is None:
                continue
            key, ext = parts
            data = tf.extractfile(m).read()
            if cur_key is not None and key != cur_key:
                yield cur_key, cur
                cur = {}
            cur_key = key
            cur[ext] = data
        if cur_key is not None:
            yield cur_key, cur
    finally:
        stream.close()


def count_samples(urls: Sequence[str]) -> tuple[dict[str, int], list[str]]:
    """Sample count per shard: from ``index.json`` where present, else by a header scan. Returns (counts, scanned)."""
    counts: dict[str, int] = {}
    scanned: list[str] = []
    indexes: dict[str, dict | None] = {}
    for url in urls:
        d = os.path.dirname(os.path.abspath(url)) if not is_remote(url) else None
        if d not in indexes:
            indexes[d] = read_index(url) if d else None
        idx = indexes[d]
        entry = idx["shards"].get(os.path.basename(url)) if idx else None
        if entry is not None:
            counts[url] = int(entry["num_samples"])
        elif is_media_file(url):
            counts[url] = 1
        elif is_file_list(url):
            counts[url] = len(list_listing(url).samples)  # rows are counted by reading the list, never "scanned"
        elif not is_remote(url):
            counts[url] = len(scan_local(url).samples)
            scanned.append(url)
        else:
            counts[url] = sum(1 for _ in iter_stream(url))
            scanned.append(url)
    return counts, scanned


def make_index(shards: dict[str, dict], skipped: list[dict] | None = None, **extra) -> dict:
    """The ``index.json`` document: ``shards`` maps a tar basename to ``{"num_samples": n, "bytes": b}``."""
    index = {
        "format": INDEX_FORMAT,
        "num_samples": int(sum(int(s["num_samples"]) for s in shards.values())),
        "shards": dict(sorted(shards.items())),
    }
    if skipped is not None:
        index["skipped"] = skipped
    index.update(extra)
    return index


def write_index(shard_dir: str, index: dict) -> str:
    """Write ``index.json`` into ``shard_dir`` atomically (temp file + rename)."""
    path = os.path.join(shard_dir, INDEX_NAME)
    tmp = os.path.join(shard_dir, f".{INDEX_NAME}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


def index_entry(url: str) -> dict:
    """Index entry of one local shard by a header scan; a truncated shard counts its complete samples and notes
    the cut one (``"truncated": true, "incomplete_samples": n``)."""
    lst = scan_local(url)
    entry = {"num_samples": len(lst.samples), "bytes": os.path.getsize(url)}
    if lst.truncated:
        entry.update(truncated=True, incomplete_samples=lst.incomplete)
    return entry


def bytes_io(b: bytes) -> io.BytesIO:
    return io.BytesIO(b)
