"""Reading the released on-disk layouts of SAM-SGT, COCO panoptic and LLaVA-OneVision.

Each reader yields raw items `(key, fields)` with undecoded bytes, in a fixed order (sorted files,
file order within them), so a build is reproducible. A malformed item is yielded with an `error`
string instead of raising; the builders skip it and count it with its key. A layout that is not
there at all raises FileNotFoundError naming the directory and what was expected.

Layouts:
  sam_sgt          <root>/file_names/*.txt (one image path per line, absolute or relative to <root>),
                   images .../sam_selection/<id>.jpg, masks at the same path with sam_selection ->
                   sam_mask and .jpg -> .png; and/or webdataset tar shards <root>/**/*.tar holding
                   <key>.jpg + <key>.png.
  coco_panoptic    <root>/annotations/panoptic_{train,val}2017.json, the PNGs in
                   <root>/annotations/panoptic_{train,val}2017/ (or <root>/panoptic_{split}2017/),
                   images <root>/{train,val}2017/<file_name>.jpg.
  llava_onevision  <root>/<subset>/*.parquet (columns id, image {bytes, path}, conversations
                   [{from, value}], data_source) and/or <root>/**/*.json[l] records {id, image,
                   conversations} with image paths relative to the JSON file's folder (or <root>).
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Any, Iterator

Item = tuple[str, dict[str, Any]]

COCO_SPLITS = {"train": "train2017", "validation": "val2017"}


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# SAM-SGT
# ---------------------------------------------------------------------------------------------
def sam_mask_path(image_path: str) -> str:
    """The mask next to a SAM-SGT image: sam_selection -> sam_mask, .jpg -> .png."""
    head, name = os.path.split(image_path)
    parts = head.split(os.sep)
    parts = ["sam_mask" if p == "sam_selection" else p for p in parts]
    return os.path.join(os.sep.join(parts), os.path.splitext(name)[0] + ".png")


def sam_list_files(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "file_names", "*.txt")))


def sam_tar_shards(root: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "**", "*.tar"), recursive=True))


def iter_sam_sgt(root: str) -> Iterator[Item]:
    """(key, {image, mask} bytes) from list files, then from tar shards."""
    lists, shards = sam_list_files(root), sam_tar_shards(root)
    if not lists and not shards:
        raise FileNotFoundError(f"sam_sgt: no list files {root}/file_names/*.txt and no tar shards "
                                f"{root}/**/*.tar; manual_dir must hold the SGT release")
    for list_file in lists:
        with open(list_file) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
        for line in lines:
            path = line if os.path.isabs(line) else os.path.join(root, line)
            key = os.path.splitext(os.path.relpath(path, root) if not os.path.isabs(line) else line)[0]
            mask = sam_mask_path(path)
            try:
                yield key, {"image": _read(path), "mask": _read(mask)}
            except OSError as e:
                yield key, {"error": f"missing_file: {type(e).__name__}: {e}"}
    for shard in shards:
        yield from _iter_tar_pairs(shard, root)


def _iter_tar_pairs(shard: str, root: str) -> Iterator[Item]:
    """webdataset convention: members sharing a key (name up to the first dot of the basename)."""
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                d, base = os.path.split(member.name)
                stem, _, ext = base.partition(".")
                key = os.path.join(d, stem)
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as e:
        yield os.path.relpath(shard, root), {"error": f"undecodable: tar shard unreadable: {e}"}
    prefix = os.path.splitext(os.path.relpath(shard, root))[0]
    for key in order:
        g = groups[key]
        image = g.get("jpg", g.get("jpeg"))
        full = f"{prefix}/{key}"
        if image is None or "png" not in g:
            yield full, {"error": f"missing_file: tar pair needs <key>.jpg + <key>.png, has {sorted(g)}"}
        else:
            yield full, {"image": image, "mask": g["png"]}


# ---------------------------------------------------------------------------------------------
# COCO panoptic
# ---------------------------------------------------------------------------------------------
def coco_annotation_file(root: str, split: str) -> str:
    return os.path.join(root, "annotations", f"panoptic_{COCO_SPLITS[split]}.json")


def coco_splits(root: str) -> list[str]:
    found = [s for s in COCO_SPLITS if os.path.exists(coco_annotation_file(root, s))]
    if not found:
        raise FileNotFoundError(f"coco_panoptic: no {root}/annotations/panoptic_{{train,val}}2017.json; "
                                "manual_dir must hold the COCO panoptic release")
    return found


def coco_categories(root: str, split: str) -> list[dict]:
    with open(coco_annotation_file(root, split)) as f:
        return sorted(json.load(f)["categories"], key=lambda c: int(c["id"]))


def iter_coco_panoptic(root: str, split: str) -> Iterator[Item]:
    """(key, {image, panoptic bytes, segments_info}) per annotation, in annotation-file order."""
    with open(coco_annotation_file(root, split)) as f:
        data = json.load(f)
    folder = COCO_SPLITS[split]
    png_dirs = [os.path.join(root, "annotations", f"panoptic_{folder}"), os.path.join(root, f"panoptic_{folder}")]
    images = {int(im["id"]): im for im in data.get("images", [])}
    for ann in data["annotations"]:
        im = images.get(int(ann["image_id"]), {})
        file_name = im.get("file_name") or os.path.splitext(ann["file_name"])[0] + ".jpg"
        key = f"{folder}/{os.path.splitext(file_name)[0]}"
        try:
            image = _read(os.path.join(root, folder, file_name))
            png = next((p for p in (os.path.join(d, ann["file_name"]) for d in png_dirs) if os.path.exists(p)), None)
            if png is None:
                raise FileNotFoundError(f"panoptic PNG {ann['file_name']} not in {png_dirs}")
            yield key, {"image": image, "panoptic": _read(png), "segments_info": ann["segments_info"]}
        except OSError as e:
            yield key, {"error": f"missing_file: {type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------
# LLaVA-OneVision
# ---------------------------------------------------------------------------------------------
def llava_files(root: str) -> tuple[list[str], list[str]]:
    parquets = sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))
    jsons = sorted(glob.glob(os.path.join(root, "**", "*.json"), recursive=True)
                   + glob.glob(os.path.join(root, "**", "*.jsonl"), recursive=True))
    if not parquets and not jsons:
        raise FileNotFoundError(f"llava_onevision: no {root}/<subset>/*.parquet and no {root}/**/*.json[l]; "
                                "manual_dir must hold LLaVA-OneVision-Data or the SGT JSON export")
    return parquets, jsons


def iter_llava_onevision(root: str) -> Iterator[Item]:
    """(key, {image bytes or None, conversations, data_source}) from parquet files, then JSON files.
    Keys are `<subset>/<id>`; the TFDS key adds the file and row so repeated ids stay distinct."""
    parquets, jsons = llava_files(root)
    for path in parquets:
        yield from _iter_parquet(path, root)
    for path in jsons:
        yield from _iter_json(path, root)


def _iter_parquet(path: str, root: str) -> Iterator[Item]:
    import pyarrow.parquet as pq

    subset = os.path.relpath(os.path.dirname(path), root)
    subset = os.path.basename(os.path.splitext(path)[0]) if subset == "." else subset
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 (any pyarrow error means the file is unreadable)
        yield f"{subset}/{os.path.basename(path)}", {"error": f"undecodable: parquet unreadable: {e}"}
        return
    cols = [c for c in ("id", "image", "conversations", "data_source") if c in pf.schema_arrow.names]
    row = 0
    for batch in pf.iter_batches(batch_size=64, columns=cols):
        for rec in batch.to_pylist():
            image = rec.get("image")
            data = None
            if isinstance(image, dict):
                data = image.get("bytes")
                if data is None and image.get("path"):
                    p = image["path"] if os.path.isabs(image["path"]) else os.path.join(os.path.dirname(path), image["path"])
                    data = _read(p) if os.path.exists(p) else None
            yield f"{subset}/{rec.get('id', row)}", {
                "uid": f"{os.path.relpath(path, root)}:{row}", "image": data,
                "conversations": rec.get("conversations"), "data_source": str(rec.get("data_source") or subset)}
            row += 1


def _iter_json(path: str, root: str) -> Iterator[Item]:
    try:
        with open(path) as f:
            records = [json.loads(ln) for ln in f if ln.strip()] if path.endswith(".jsonl") else json.load(f)
    except (OSError, ValueError) as e:
        yield os.path.relpath(path, root), {"error": f"undecodable: JSON unreadable: {e}"}
        return
    if isinstance(records, dict):
        records = [records]
    subset = os.path.splitext(os.path.relpath(path, root))[0]
    for row, rec in enumerate(records):
        if not isinstance(rec, dict) or "conversations" not in rec:
            continue  # not a conversation record (e.g. some other JSON in the tree)
        data = None
        name = rec.get("image")
        if name:
            for base in (os.path.dirname(path), root):
                p = name if os.path.isabs(name) else os.path.join(base, name)
                if os.path.exists(p):
                    data = _read(p)
                    break
        yield f"{subset}/{rec.get('id', row)}", {
            "uid": f"{os.path.relpath(path, root)}:{row}", "image": data, "image_name": name,
            "conversations": rec.get("conversations"), "data_source": str(rec.get("data_source") or subset)}
