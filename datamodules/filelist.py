"""Datasets that live as files plus a list: a CSV (Open-Sora's layout) or a JSONL with one row per file.

Columns: ``path`` (a video or image file, absolute or relative to the list's folder; required), ``text`` (the
caption; ``caption`` is read too), ``label`` (a class id, or a class name mapped through ``classes.json``), and
Open-Sora's optional metadata ``num_frames``, ``height``, ``width``, ``fps``, ``aspect_ratio``, ``resolution`` (kept
in the sample's metadata, where ``bucket_config`` reads the size). Other columns are ignored.

One reader serves both users: ``vidgen shards list.csv OUT`` packs the rows into tar shards, and ``VideoDataModule``
reads a list directly as one more shard kind (:func:`list_listing`): row ``i`` is sample position ``i``, addressed
the way a tar's samples are, so ordering, the rank/worker split and exact resume are the tar shards' own. A sample's
key is the one ``vidgen shards`` gives the same row (:func:`sample_key`), so the two stream the same samples.

Class names map to ids the way ``vidgen shards`` maps them: by a ``classes.json`` (``{"classes": [name0, ...]}``), or
else the sorted set of the names in the list (``torchvision.ImageFolder``'s order).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from typing import Any

from .media import IMAGE_EXTS, VIDEO_EXTS

CLASSES_NAME = "classes.json"
CLASSES_FORMAT = "vidgen-classes/1"
LIST_EXTS = (".csv", ".jsonl", ".ndjson")
CAPTION_COLUMNS = ("text", "caption")  # Open-Sora's name first
#: Open-Sora's metadata columns -> their type; kept in the sample json (``datamodules/buckets.py`` reads the size)
META_COLUMNS = {"num_frames": int, "height": int, "width": int, "fps": float, "aspect_ratio": float,
                "resolution": float}


class FileListError(ValueError):
    """A list file that cannot be read as written; the message names the file, the row and the fix."""


@dataclasses.dataclass
class Item:
    """One input file and its optional caption/label (plus Open-Sora's metadata columns of a list row)."""

    path: str
    caption: str | None = None
    label: int | None = None
    class_name: str | None = None  # a string label (class folder, list column); ``assign_labels`` maps it to ``label``
    meta: dict | None = None
    where: str = ""  # "list.csv:7" for messages


def is_file_list(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and url.lower().endswith(LIST_EXTS)


def sanitize_key(text: str, max_len: int = 48) -> str:
    """A WebDataset-safe key fragment: [A-Za-z0-9_-] only (no dots: the extension starts at the first dot)."""
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return s[:max_len] or "x"


def sample_key(idx: int, path: str) -> str:
    """The key of input ``idx`` (its row in a list): ``{idx:06d}_{file stem}`` (``vidgen shards`` writes the same)."""
    return f"{idx:06d}_{sanitize_key(os.path.splitext(os.path.basename(path))[0])}"


def parse_label(v: Any, where: str) -> int | str | None:
    """An int class id, a class name (str, mapped through ``classes.json``), or None (no label)."""
    if v is None or (isinstance(v, str) and v.strip() == ""):
        return None
    if isinstance(v, bool):
        raise FileListError(f"{where}: label {v!r} is a boolean; give a class id (int) or a class name (str)")
    if isinstance(v, (int, float)):
        if v != int(v) or v < 0:
            raise FileListError(f"{where}: label {v!r} is not a class id (an integer >= 0)")
        return int(v)
    text = str(v).strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    return text


def make_item(path: str, caption: str | None, label: Any, where: str, meta: dict | None = None) -> Item:
    lab = parse_label(label, where)
    return Item(path, caption, lab if isinstance(lab, int) else None, lab if isinstance(lab, str) else None,
                meta, where)


def read_class_map(path: str) -> list[str]:
    """Class names by id from a ``classes.json`` (``{"format": ..., "classes": [name0, name1, ...]}``)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise FileListError(f"class map {path}: cannot read it ({e})") from None
    names = doc.get("classes") if isinstance(doc, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise FileListError(f"class map {path}: expected {{\"classes\": [unique names, by id]}}")
    return names


def assign_labels(items: list[Item], classes: list[str] | None = None) -> list[str] | None:
    """Map class names to ids in place; returns the class map (names by id), or None when no item has a name.

    Without ``classes`` the map is the sorted set of names (the order ``torchvision.ImageFolder`` uses); a split
    built later passes the first split's map (``--class-map``, or a ``classes.json`` beside the list) so ids agree.
    Mixing names and integer ids is an error (which id would a name get?)."""
    named = [it for it in items if it.class_name is not None]
    if not named:
        if classes is not None:
            raise FileListError("a class map is given, but the input has no class names (class folders or a label "
                                "column)")
        return None
    numbered = [it for it in items if it.label is not None and it.class_name is None]
    if numbered:
        raise FileListError(f"labels mix class names ({named[0].class_name!r}) and integer ids ({numbered[0].label}); "
                            "use one kind (names are mapped to ids in classes.json)")
    names = list(classes) if classes is not None else sorted({it.class_name for it in named})
    ids = {n: i for i, n in enumerate(names)}
    unknown = sorted({it.class_name for it in named} - set(ids))
    if unknown:
        raise FileListError(f"class names {unknown[:5]} are not in the class map ({len(names)} classes)")
    for it in named:
        it.label = ids[it.class_name]
    return names


def _meta(row: dict, where: str) -> dict:
    out = {}
    for col, typ in META_COLUMNS.items():
        v = row.get(col)
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "nan", "none")):
            continue
        try:
            x = typ(float(v)) if typ is int else typ(v)
        except (TypeError, ValueError):
            raise FileListError(f"{where}: column {col!r} = {v!r} is not a number; fix the row or leave the cell "
                                "empty") from None
        out[col] = x
    return out


def read_list(source: str) -> list[Item]:
    """The rows of a CSV (header with a ``path`` column) or a JSONL (an object with ``path`` per line) as items;
    relative paths are relative to the list's folder. Existence of the files is not checked here."""
    ext = os.path.splitext(source)[1].lower()
    base = os.path.dirname(os.path.abspath(source))
    rows: list[tuple[dict, str]] = []
    try:
        f = open(source, newline="", encoding="utf-8")
    except OSError as e:
        raise FileListError(f"{source}: cannot read it ({e.strerror})") from None
    with f:
        if ext == ".csv":
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "path" not in columns:
                raise FileListError(
                    f"{source}: the CSV needs a header with a 'path' column (Open-Sora's layout: "
                    f"path,text[,num_frames,height,width,fps,aspect_ratio,label]), got {columns or 'no header'}")
            try:
                for i, row in enumerate(reader):
                    rows.append(({k.strip(): v for k, v in row.items() if k is not None}, f"{source}:{i + 2}"))
            except (csv.Error, UnicodeDecodeError) as e:
                raise FileListError(f"{source}: not a readable CSV ({e})") from None
        else:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FileListError(f"{source}:{i + 1}: not a JSON object per line ({e})") from None
                if not isinstance(row, dict) or "path" not in row:
                    raise FileListError(f"{source}:{i + 1}: each line must be an object with a 'path' key")
                rows.append((row, f"{source}:{i + 1}"))
    items = []
    for row, where in rows:
        p = str(row["path"] or "").strip()
        if not p:
            raise FileListError(f"{where}: empty path")
        if not os.path.isabs(p):
            p = os.path.join(base, p)
        cap = next((row[c] for c in CAPTION_COLUMNS if row.get(c) is not None), None)
        cap = None if cap is None or str(cap) == "" else str(cap)
        items.append(make_item(p, cap, row.get("label"), where, _meta(row, where)))
    return items


def sample_members(key: str, item: Item, info: dict, kind: str) -> tuple[dict, dict[str, bytes]]:
    """The metadata json and the small members (``txt``, ``json``, ``cls``) of one input's sample; ``info`` holds
    what is known of the media (probed by ``vidgen shards``, or the list's columns)."""
    meta = dict(info)
    meta.update(media=kind, key=key, source=os.fspath(item.path), label=-1 if item.label is None else int(item.label))
    if item.caption is not None:
        meta["caption"] = item.caption
    if item.class_name is not None:
        meta["class_name"] = item.class_name
    out = {}
    if item.caption is not None:
        out["txt"] = item.caption.encode("utf-8")
    out["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    if item.label is not None:
        out["cls"] = str(int(item.label)).encode("ascii")
    return meta, out


def media_ext(path: str) -> str | None:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext if ext in VIDEO_EXTS + IMAGE_EXTS else None


def list_samples(source: str) -> tuple[list[tuple[str, str, int, dict[str, bytes]]], int]:
    """A list as samples ``(key, media path, size, small members)`` in row order, and how many carry a label.

    Bad input is one :class:`FileListError` naming the problem and the fix: a missing ``path`` column, a row whose
    file does not exist or is not a video/image, labels that mix names and ids. Class names map through the
    ``classes.json`` beside the list when there is one, else through the sorted set of the list's names."""
    items = read_list(source)
    if not items:
        raise FileListError(f"{source}: the list has no rows")
    side = os.path.join(os.path.dirname(os.path.abspath(source)), CLASSES_NAME)
    assign_labels(items, read_class_map(side) if os.path.isfile(side) and any(it.class_name for it in items) else None)
    out, missing, labelled = [], [], 0
    for i, it in enumerate(items):
        ext = media_ext(it.path)
        if ext is None:
            raise FileListError(f"{it.where}: {it.path!r} is not a video or image file "
                                f"({', '.join(VIDEO_EXTS + IMAGE_EXTS)})")
        try:
            size = os.stat(it.path).st_size
        except OSError:
            missing.append(it)
            continue
        key = sample_key(i, it.path)
        kind = "image" if ext in IMAGE_EXTS else "video"
        _, members = sample_members(key, it, it.meta or {}, kind)
        labelled += "cls" in members
        out.append((key, it.path, size, members))
    if missing:
        raise FileListError(
            f"{source}: {len(missing)} listed file(s) do not exist, e.g. {missing[0].where} -> {missing[0].path!r} "
            "(relative paths are relative to the list's folder); fix the paths or drop those rows")
    return out, labelled
