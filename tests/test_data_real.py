"""Real-data builders (SAM-SGT, COCO panoptic, LLaVA-OneVision) on fixtures written here in each
released layout: built to ArrayRecord, read back without TensorFlow, targets exact, bad items
skipped and counted with their key."""
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from sgt_jax.data import real_images, render
from sgt_jax.data.mixture import Mixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 32  # stored side
RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(arr) -> bytes:
    return real_images.encode_jpeg(np.asarray(arr, np.uint8))


def _photo(seed, h=S, w=S):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def sam_mask(seed):
    """16 x 16 RGB mask (half the image resolution): three flat instances of distinct areas."""
    m = np.zeros((16, 16, 3), np.uint8)
    m[0:8, 0:8] = RED  # 64 px
    m[8:16, 4:16] = GREEN  # 96 px (largest -> id 1)
    m[0:6, 10:15] = BLUE  # 30 px
    if seed % 2:
        m[0:8, 0:8] = m[8:16, 4:16] = (0, 0, 0)  # only blue left
    return m


def expected_sam_ids(mask):
    """What the builder must produce at S from a 16 px mask: ids by area, nearest x2 upsampling."""
    seg = real_images.colour_mask_to_segments(mask)
    ids, _ = real_images.order_instances(seg)
    return np.kron(ids, np.ones((2, 2), np.uint8))


@pytest.fixture(scope="session")
def sam_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam")
    (root / "a" / "sam_selection").mkdir(parents=True)
    (root / "a" / "sam_mask").mkdir(parents=True)
    (root / "file_names").mkdir()
    lines = []
    for i in range(3):
        (root / "a" / "sam_selection" / f"img{i}.jpg").write_bytes(_jpg(_photo(i)))
        (root / "a" / "sam_mask" / f"img{i}.png").write_bytes(_png(sam_mask(i)))
        lines.append(f"a/sam_selection/img{i}.jpg")
    (root / "a" / "sam_selection" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "a" / "sam_mask" / "broken.png").write_bytes(_png(sam_mask(0)))
    (root / "a" / "sam_selection" / "empty.jpg").write_bytes(_jpg(_photo(9)))
    (root / "a" / "sam_mask" / "empty.png").write_bytes(_png(np.zeros((16, 16, 3))))
    lines += ["a/sam_selection/broken.jpg", "a/sam_selection/empty.jpg", "a/sam_selection/missing.jpg"]
    (root / "file_names" / "part0.txt").write_text("\n".join(lines) + "\n")
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        t0_mask = np.zeros((12, 20, 3), np.uint8)
        t0_mask[2:10, 3:9] = RED
        for key, data in (("t0.jpg", _jpg(_photo(5, 24, 40))), ("t0.png", _png(t0_mask)),
                          ("t1.jpg", _jpg(_photo(6))), ("t1.png", _png(sam_mask(2)))):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(root)


COCO_CATS = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
             {"id": 184, "name": "sky", "isthing": 0}]


def coco_segments():
    """32 x 32 panoptic map: sky (stuff), a car (id 300: R=44, G=1), two people, a crowd of people."""
    seg = np.zeros((S, S), np.int64)
    seg[0:10, :] = 7  # sky
    seg[12:30, 0:12] = 300  # car, 216 px
    seg[12:20, 14:20] = 11  # person, 48 px
    seg[22:32, 14:24] = 12  # person, 100 px
    seg[24:32, 26:32] = 13  # crowd
    infos = [{"id": 7, "category_id": 184, "iscrowd": 0}, {"id": 300, "category_id": 3, "iscrowd": 0},
             {"id": 11, "category_id": 1, "iscrowd": 0}, {"id": 12, "category_id": 1, "iscrowd": 0},
             {"id": 13, "category_id": 1, "iscrowd": 1}]
    return seg, infos


@pytest.fixture(scope="session")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    for d in ("annotations/panoptic_val2017", "val2017"):
        (root / d).mkdir(parents=True)
    seg, infos = coco_segments()
    rgb = np.stack([seg % 256, (seg // 256) % 256, seg // 65536], -1)
    (root / "annotations/panoptic_val2017/000000000001.png").write_bytes(_png(rgb))
    (root / "val2017/000000000001.jpg").write_bytes(_jpg(_photo(1)))
    only_sky = np.where(seg == 7, 7, 0)
    (root / "annotations/panoptic_val2017/000000000002.png").write_bytes(
        _png(np.stack([only_sky % 256, only_sky // 256, 0 * only_sky], -1)))
    (root / "val2017/000000000002.jpg").write_bytes(_jpg(_photo(2)))
    ann = {"categories": COCO_CATS,
           "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
           "annotations": [{"image_id": 1, "file_name": "000000000001.png", "segments_info": infos},
                           {"image_id": 2, "file_name": "000000000002.png", "segments_info": infos[:1]}]}
    (root / "annotations/panoptic_val2017.json").write_text(json.dumps(ann))
    return str(root)


LLAVA_ROWS = [
    {"id": "m0", "image": {"bytes": None, "path": None}, "data_source": "s", "conversations": [
        {"from": "human", "value": "text only?"}, {"from": "gpt", "value": "yes"}]},
    {"id": "m1", "data_source": "s", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]},
    {"id": "m2", "data_source": "s", "conversations": [{"from": "human", "value": "<image>"}]},
    {"id": "m3", "image": {"bytes": b"\x00garbage", "path": "x.jpg"}, "data_source": "s", "conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
]


@pytest.fixture(scope="session")
def llava_root(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("llava")
    (root / "subset_a").mkdir()
    rows = [dict(r) for r in LLAVA_ROWS]
    rows[1]["image"] = {"bytes": _jpg(_photo(3, 20, 30)), "path": "m1.jpg"}
    rows[2]["image"] = {"bytes": _jpg(_photo(4)), "path": "m2.jpg"}
    pq.write_table(pa.Table.from_pylist(rows), root / "subset_a" / "train-00000-of-00001.parquet")
    (root / "export" / "images").mkdir(parents=True)
    (root / "export" / "images" / "j0.jpg").write_bytes(_jpg(_photo(7)))
    (root / "export" / "data.json").write_text(json.dumps([
        {"id": "j0", "image": "images/j0.jpg", "conversations": [
            {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "Two."}]}]))
    return str(root)


@pytest.fixture(scope="session")
def built(tmp_path_factory, sam_root, coco_root, llava_root):
    from sgt_jax.data import tfds_real

    data_dir = str(tmp_path_factory.mktemp("real_data"))
    builders = {name: tfds_real.prepare(name, S, data_dir, root)
                for name, root in (("sam_sgt", sam_root), ("coco_panoptic", coco_root), ("llava_onevision", llava_root))}
    return data_dir, builders


def test_builds_count_skips_with_keys(built):
    _, b = built
    sam = b["sam_sgt"]
    assert sam.info.splits["train"].num_examples == 5  # img0..img2 from the list file, t0 and t1 from the tar
    skipped = {it["key"]: it["reason"].split(":")[0] for it in sam.skipped["train"]}
    assert skipped == {"a/sam_selection/broken": "undecodable", "a/sam_selection/empty": "no_instance",
                       "a/sam_selection/missing": "missing_file"}
    with open(os.path.join(sam.data_dir, "skipped.json")) as f:
        assert json.load(f)["skip_counts"]["train"]["total"] == 3
    coco = b["coco_panoptic"]
    assert list(coco.info.splits) == ["validation"] and coco.info.splits["validation"].num_examples == 1
    assert [it["key"] for it in coco.skipped["validation"]] == ["val2017/000000000002"]
    llava = b["llava_onevision"]
    assert llava.info.splits["train"].num_examples == 2  # m1 (parquet) + j0 (JSON layout)
    reasons = {it["key"]: it["reason"].split(":")[0] for it in llava.skipped["train"]}
    assert reasons == {"subset_a/m0": "no_image", "subset_a/m2": "empty_conversation",
                       "subset_a/m3": "undecodable"}


_READER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from sgt_jax.config import default_config
    from sgt_jax.data import datasets
    data_dir, size = sys.argv[1], int(sys.argv[2])
    cfg = default_config()
    cfg.stage = "umm"
    cfg.data.data_dir, cfg.data.image_size, cfg.data.tokenizer_dir = data_dir, size, "unused"
    cfg.model.umm.vit.image_size = size
    cfg.data.mixture = {"proxy_segmentation": 2.0, "proxy_semantic": 1.0, "understanding": 1.0}
    out = {}
    for name, task, split in (("sam_sgt", "proxy_segmentation", "train"), ("coco_panoptic", "proxy_segmentation", "validation"),
                              ("coco_panoptic", "proxy_semantic", "validation"), ("llava_onevision", "understanding", "train")):
        src = datasets.open_real_source(cfg, name, task, split)
        recs = [src.decode(src.raw[i], str(i)) for i in range(len(src))]
        out[name + "/" + task] = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()
                                   if k != "image"} | {"image_shape": list(r["image"].shape)} for r in recs]
    out["tf_loaded"] = "tensorflow" in sys.modules
    print("RESULT" + json.dumps(out))
""")


@pytest.fixture(scope="session")
def read_back(built):
    data_dir, _ = built
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _READER, data_dir, str(S)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def test_read_back_without_tensorflow(read_back):
    assert read_back["tf_loaded"] is False
    for recs in read_back.values():
        if isinstance(recs, list):
            assert all(r["image_shape"] == [S, S, 3] for r in recs)


def test_sam_targets_match_source_masks_exactly(read_back):
    recs = {r["key"]: r for r in read_back["sam_sgt/proxy_segmentation"]}
    assert sorted(recs) == ["a/sam_selection/img0", "a/sam_selection/img1", "a/sam_selection/img2",
                            "shard-000/t0", "shard-000/t1"]
    for i in range(3):
        want = expected_sam_ids(sam_mask(i))
        r = recs[f"a/sam_selection/img{i}"]
        assert np.array_equal(np.asarray(r["instance"]), want)
        assert np.array_equal(np.asarray(r["target"], np.uint8), render.INSTANCE_PALETTE[want])
    ids = np.asarray(recs["a/sam_selection/img0"]["instance"])
    assert (ids[16:, 8:] == 1).all() and (ids[:16, :16] == 2).all()  # green (96 px) before red (64 px)
    assert np.array_equal(np.asarray(recs["shard-000/t1"]["instance"]), expected_sam_ids(sam_mask(2)))
    # 24 x 40 image, 12 x 20 mask: letterboxed to 32 x 32 (scale 0.8 -> 19 x 32, top pad 6); the
    # mask goes to the image's resolution (x2) and then the same geometry, nearest-neighbour only.
    t0 = np.asarray(recs["shard-000/t0"]["instance"])
    assert set(np.unique(t0)) == {0, 1}
    assert (t0[:6] == 0).all() and (t0[6 + 19:] == 0).all()
    full = np.zeros((24, 40), np.uint8)
    full[4:20, 6:18] = 1
    want = real_images.letterbox(full, S, nearest=True, pad_value=0)
    assert np.array_equal(t0, want)


def test_coco_instances_by_area_stuff_background_and_classes(read_back):
    seg, _ = coco_segments()
    (inst,) = read_back["coco_panoptic/proxy_segmentation"]
    ids = np.asarray(inst["instance"])
    want = np.zeros_like(ids)
    want[seg == 300], want[seg == 12], want[seg == 11] = 1, 2, 3  # things by area; sky and crowd: background
    assert np.array_equal(ids, want)
    assert np.array_equal(np.asarray(inst["target"], np.uint8), render.INSTANCE_PALETTE[want])
    (sem,) = read_back["coco_panoptic/proxy_semantic"]
    classes = np.zeros_like(ids)
    classes[seg == 7], classes[seg == 300] = 3, 2  # category index in id order + 1
    classes[np.isin(seg, [11, 12, 13])] = 1
    assert np.array_equal(np.asarray(sem["target"], np.uint8), real_images.CATEGORY_PALETTE[classes])
    assert np.array_equal(real_images.rgb_to_category(np.asarray(sem["target"], np.uint8), 3), classes)


def test_llava_turns(read_back):
    recs = {r["key"]: r for r in read_back["llava_onevision/understanding"]}
    assert recs["subset_a/m1"]["turns"] == [["What is it?", "A cat."], ["Colour?", "Black."]]
    assert recs["export/data/j0"]["turns"] == [["How many?", "Two."]]


def test_nearest_resize_never_blends_mask_colours():
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[:, :4] = RED
    mask[:, 4:] = GREEN
    ids, _ = real_images.order_instances(real_images.colour_mask_to_segments(mask, min_pixels=1))
    big = real_images.letterbox(ids, 20, nearest=True, pad_value=0)
    assert set(np.unique(big)) <= {0, 1, 2}
    # blended edge colours (what a bicubic resize leaves) snap back to the major colours
    blurred = mask.copy()
    blurred[:, 3] = (115, 115, 30)
    seg = real_images.colour_mask_to_segments(blurred)
    assert len(np.unique(seg)) == 2


def test_corrupt_records_are_skipped_and_counted_by_the_pipeline(built):
    from sgt_jax.config import default_config
    from sgt_jax.data import datasets, pipeline
    from sgt_jax.data.pipeline import RecordSource

    data_dir, _ = built
    cfg = default_config()
    cfg.data.data_dir, cfg.data.image_size, cfg.data.tokenizer_dir = data_dir, S, "unused"
    cfg.model.umm.vit.image_size = S
    cfg.data.mixture = {"proxy_segmentation": 1.0}
    src = datasets.open_real_source(cfg, "sam_sgt", "proxy_segmentation", "train")
    raw = [src.raw[i] for i in range(len(src))]
    raw[1] = raw[1][: len(raw[1]) // 2]  # truncated bytes
    bad = RecordSource(raw=raw, deserialize=src.deserialize, name="sam_sgt/train", decode=src.decode)
    it = pipeline.make_iterator(cfg, "train", lambda r, rng: {"target": r["target"]}, sources=bad,
                                process_index=0, process_count=1, batch_size=3, training=False, num_workers=0)
    batch = next(it)
    assert batch["target"].shape == (3, S, S, 3)
    assert pipeline.skip_counts(it)["undecodable"] == 1


# ---------------------------------------------------------------------------------------------
# the 2 : 1 mixture of real sources (configs/umm_1b.py:data=real)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_cfg(tmp_path_factory, sam_root, llava_root):
    from sgt_jax.checks import prepare as validate  # finalize + every rule
    from sgt_jax.config import config_module
    from sgt_jax.data import datasets
    from sgt_jax.data import tokenizer as tok_lib

    root = tmp_path_factory.mktemp("mix")
    tok_dir = str(root / "tok")
    cfg = config_module(os.path.join(REPO, "configs", "umm_1b.py")).get_config(
        f"smoke,data=real,sam={sam_root},llava={llava_root},tokenizer={tok_dir}")
    cfg.data.data_dir = str(root / "data")
    validate(cfg)
    tok_lib.build_shapes_tokenizer(tok_dir, cfg, vocab_size=400, num_scenes=12)
    datasets.ensure_dataset(cfg)  # builds both real datasets from their manual_dirs
    return cfg


def test_umm_1b_real_option_names_sources_and_rejects_bad_values():
    from sgt_jax.config import config_module

    m = config_module(os.path.join(REPO, "configs", "umm_1b.py"))
    c = m.get_config("data=real,seg=coco_panoptic,coco=/c,llava=/l")
    assert dict(c.data.sources) == {"proxy_segmentation": "coco_panoptic", "understanding": "llava_onevision"}
    assert dict(c.data.mixture) == {"proxy_segmentation": 2.0, "understanding": 1.0}
    with pytest.raises(ValueError, match="option 'seg'"):
        m.get_config("data=real,seg=imagenet")
    from sgt_jax.data import datasets

    c.data.tokenizer_dir = ""
    with pytest.raises(ValueError, match="data.tokenizer_dir"):
        datasets.real_sources(c)
    c.data.tokenizer_dir = "/t"
    c.data.sources = {"understanding": "sam_sgt"}
    with pytest.raises(ValueError, match="cannot feed task"):
        datasets.real_sources(c)


def test_mixture_two_to_one_sharded_and_resumable(real_cfg):
    from sgt_jax.data import datasets, pipeline, sequences
    from sgt_jax.data import tokenizer as tok_lib

    cfg = real_cfg
    tok = tok_lib.load_tokenizer(cfg.data.tokenizer_dir)
    transforms = sequences.make_task_transforms(cfg, tok)
    sources = datasets.open_source(cfg, "train")
    assert sorted(sources) == ["proxy_segmentation", "understanding"]
    it = pipeline.make_iterator(cfg, "train", transforms, process_index=0, process_count=1, batch_size=6,
                                num_workers=0)
    batches = [next(it) for _ in range(5)]
    tasks = np.concatenate([b["task"] for b in batches])
    seg, und = sequences.task_id("proxy_segmentation"), sequences.task_id("understanding")
    assert (tasks == seg).sum() == 20 and (tasks == und).sum() == 10  # 2 : 1 by example
    b = batches[0]
    assert b["target_image"].shape == (6, 32, 32, 3) and b["vit_image"].shape == (6, 32, 32, 3)
    for row in range(6):
        if b["task"][row] == seg:  # proxy targets are palette colours only
            colours = {tuple(c) for c in b["target_image"][row].reshape(-1, 3)}
            assert colours <= {tuple(int(x) for x in c) for c in render.INSTANCE_PALETTE}
    state = it.get_state()
    after = [next(it) for _ in range(2)]
    it.set_state(state)
    again = [next(it) for _ in range(2)]
    for x, y in zip(after, again, strict=True):
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_per_host_shards_are_disjoint(real_cfg):
    import zlib

    from sgt_jax.data import pipeline

    def key_of(record, rng):
        return {"key": np.int64(zlib.crc32(record["key"].encode()))}

    seen = []
    for p in range(2):
        it = pipeline.make_iterator(real_cfg, "train", Mixture.from_config(
            real_cfg, {"proxy_segmentation": key_of, "understanding": key_of}),
                                    process_index=p, process_count=2, batch_size=1, training=False, num_workers=0)
        seen.append({int(b["key"][0]) for b in it})
    assert seen[0] and seen[1] and not (seen[0] & seen[1])


def test_conversation_row_has_loss_on_every_answer_only():
    from sgt_jax.data import sequences

    lay = sequences.Layout(max_seq_len=40, num_vit_tokens=4, vit_image_size=16, num_codes=4, image_size=16)
    ids = sequences.SpecialIds(bos=1, eos=2, pad=0, img=3, img_end=4, boi=5, eoi=6)
    enc = lambda t: [100 + ord(ch) % 50 for ch in t]  # noqa: E731  one id per character
    b = sequences.SequenceBuilder(lay, ids, enc)
    image = np.zeros((16, 16, 3), np.uint8)
    one = b.conversation(image, [("ab", "c")])
    assert all(np.array_equal(one[k], v) for k, v in b.understanding(image, "ab", "c").items())
    row = b.conversation(image, [("ab", "c"), ("de", "fg")])
    n = 3 + 4  # <bos> <img> [4] </img>
    # tokens: q1 (2) + " c" (2) + eos, q2 (2) + " fg" (3) + eos
    answer_pos = list(range(n + 2, n + 5)) + list(range(n + 7, n + 11))
    scored = np.nonzero(row["text_loss_weight"])[0] + 1  # weight at p scores token p + 1
    assert scored.tolist() == answer_pos
    assert row["tokens"][n + 4] == 2 and row["tokens"][n + 10] == 2 and row["truncated"] == 0
    long = b.conversation(image, [("ab", "c")] + [("x" * 10, "y" * 10)] * 3)
    assert long["truncated"] == 1 and long["attn_mask"].sum() <= 40


def test_real_and_shapes_world_sources_mix(real_cfg):
    """A task that data.sources does not name keeps reading Shapes World."""
    from sgt_jax.data import datasets, pipeline, sequences
    from sgt_jax.data import tokenizer as tok_lib
    from sgt_jax.data.pipeline import RecordSource

    cfg = real_cfg.copy_and_resolve_references()
    cfg.data.sources = {"proxy_segmentation": "sam_sgt"}
    cfg.data.train_size, cfg.data.validation_size, cfg.data.test_size, cfg.data.heldout_size = 8, 0, 0, 0
    datasets.ensure_dataset(cfg)
    sources = datasets.open_source(cfg, "train")
    assert sources["proxy_segmentation"].name == "sam_sgt/train"
    assert isinstance(sources["understanding"], RecordSource) and sources["understanding"].decode is None
    transforms = sequences.make_task_transforms(cfg, tok_lib.load_tokenizer(cfg.data.tokenizer_dir))
    batch = next(pipeline.make_iterator(cfg, "train", transforms, process_index=0, process_count=1, batch_size=6,
                                        num_workers=0))
    assert sorted(set(batch["task"].tolist())) == sorted(
        [sequences.task_id("proxy_segmentation"), sequences.task_id("understanding")])


def test_parallel_build_writes_the_same_records(built, sam_root, tmp_path):
    from sgt_jax.data import tfds_real

    _, b = built
    par = tfds_real.prepare("sam_sgt", S, str(tmp_path), sam_root, num_workers=2)
    assert par.skipped == b["sam_sgt"].skipped
    one, two = b["sam_sgt"].as_data_source("train"), par.as_data_source("train")
    assert len(one) == len(two) == 5
    for i in range(5):
        x, y = one[i], two[i]
        assert x["key"] == y["key"] and x["image"] == y["image"] and np.array_equal(x["instance"], y["instance"])


def test_build_tool_builds_and_rejects_a_missing_manual_dir(sam_root, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tool = os.path.join(REPO, "tools", "build_dataset.py")
    bad = subprocess.run([sys.executable, tool, "--dataset=sam_sgt", f"--manual_dir={tmp_path / 'nope'}",
                          f"--data_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "nope" in bad.stderr
    good = subprocess.run([sys.executable, tool, "--dataset=sam_sgt", f"--manual_dir={sam_root}", f"--store_size={S}",
                           f"--data_dir={tmp_path}"], capture_output=True, text=True, env=env, timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]
    assert "splits: {'train': 5}" in good.stdout and "'total': 3" in good.stdout
