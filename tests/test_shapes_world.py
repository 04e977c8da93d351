"""Shapes World: determinism, splits, and every ground-truth map checked against the object list."""
import itertools

import numpy as np
import pytest
from scipy import ndimage

from sgt_jax.data import render
from sgt_jax.data import shapes_world as sw

CFG32 = sw.WorldConfig(image_size=32, max_objects=4)
CFG64 = sw.WorldConfig(image_size=64, max_objects=6)


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k]


def test_vocabulary_sizes_and_palette_separation():
    assert len(sw.SHAPES) >= 6 and len(sw.COLORS) >= 8 and len(sw.SIZES) >= 3
    assert set(sw.TEXTURES) >= {"flat", "stripes", "noise"}
    names = list(sw.COLORS)
    obj = np.array([sw.COLORS[c] for c in names], float)
    bg = np.array(list(sw.BACKGROUNDS.values()), float)
    d_obj = min(np.linalg.norm(a - b) for a, b in itertools.combinations(obj, 2))
    d_bg = min(np.linalg.norm(a - b) for a in obj for b in bg)
    # textures / background texture stay strictly inside each colour's nearest-neighbour cell
    assert min(d_obj, d_bg) > 2 * max(sw.TEXTURE_RADIUS, sw.BACKGROUND_RADIUS)
    pal = render.INSTANCE_PALETTE.astype(float)
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(pal, 2)) >= 127


def test_deterministic_and_splits_differ():
    for split in sw.SPLITS:
        _same(sw.generate_scene(11, CFG32, split), sw.generate_scene(11, CFG32, split))
    imgs = [sw.generate_scene(11, CFG32, s)["image"] for s in sw.SPLITS]
    for a, b in itertools.combinations(imgs, 2):
        assert not np.array_equal(a, b)
    with pytest.raises(ValueError):
        sw.generate_scene(0, CFG32, "bogus")


def test_heldout_pairs_only_in_heldout_split():
    held = set(sw.HELDOUT_PAIRS)
    assert len(held) == len(sw.SHAPES)
    for split in ("train", "validation", "test"):
        for seed in range(150):
            for o in sw.generate_scene(seed, CFG32, split)["objects"]:
                assert (o["color"], o["shape"]) not in held
    for seed in range(40):
        objs = sw.generate_scene(seed, CFG32, "heldout")["objects"]
        assert any((o["color"], o["shape"]) in held for o in objs)


@pytest.mark.parametrize("cfg", [CFG32, CFG64, sw.WorldConfig(image_size=128, max_objects=3, textured_background=False)])
def test_ground_truth_maps_match_object_list(cfg):
    s = cfg.image_size
    seen_textures, n_objects = set(), []
    for seed in range(25):
        sc = sw.generate_scene(seed, cfg)
        img, inst, sem, dep, edg, objs = (sc[k] for k in ("image", "instance", "semantic", "depth", "edges", "objects"))
        assert img.shape == (s, s, 3) and img.dtype == np.uint8
        for m in (inst, sem, dep, edg):
            assert m.shape == (s, s) and m.dtype == np.uint8
        assert cfg.min_objects <= len(objs) <= cfg.max_objects
        n_objects.append(len(objs))
        assert set(np.unique(inst)) <= set(range(len(objs) + 1))
        pairs = [(o["color"], o["shape"]) for o in objs]
        assert len(set(pairs)) == len(pairs)
        # painted far -> near: instance ids follow decreasing depth
        depths = [o["depth"] for o in objs]
        assert depths == sorted(depths, reverse=True)
        for k, o in enumerate(objs, start=1):
            m = inst == k
            ys, xs = np.nonzero(m)
            assert o["area"] == m.sum() >= max(cfg.min_pixels, cfg.min_visible_fraction * o["full_area"])
            assert o["bbox"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            np.testing.assert_allclose(o["centroid"], [xs.mean() + 0.5, ys.mean() + 0.5])
            assert ndimage.label(m)[1] == 1  # one visible piece
            assert (sem[m] == sw.SHAPES.index(o["shape"]) + 1).all()
            assert (dep[m] == sw.depth_level(o["depth"])).all()
            # every object pixel is within the texture radius of its named colour
            dist = np.linalg.norm(img[m].astype(float) - sw.COLORS[o["color"]], axis=-1)
            assert dist.max() <= sw.TEXTURE_RADIUS + 1
            seen_textures.add(o["texture"])
        assert (sem[inst == 0] == 0).all() and (dep[inst == 0] == 255).all()
        bgd = np.linalg.norm(img[inst == 0].astype(float) - sw.BACKGROUNDS[sc["background"]], axis=-1)
        assert bgd.max() <= sw.BACKGROUND_RADIUS + 1
        # edges: exactly the pixels with a 4-neighbour of another instance id
        p = np.pad(inst.astype(int), 1, mode="edge")
        nb = [p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]
        expect = np.any([n != inst for n in nb], axis=0)
        np.testing.assert_array_equal(edg.astype(bool), expect)
        # occlusion respects depth: where object j's full shape is hidden by k, k is nearer
        for k, o in enumerate(objs, start=1):
            rs, cs, full = sw._raster(o["shape"], (o["center"][0] - sw.half_extents(o["shape"], o["radius"])[0],
                                                   o["center"][1] - sw.half_extents(o["shape"], o["radius"])[1],
                                                   o["center"][0] + sw.half_extents(o["shape"], o["radius"])[0],
                                                   o["center"][1] + sw.half_extents(o["shape"], o["radius"])[1]), s)
            assert full.sum() == o["full_area"]
            cover = inst[rs, cs][full]
            assert (cover >= k).all()  # only nearer (later-painted) objects cover it
    assert len(seen_textures) >= 2 and max(n_objects) > 1


def test_render_targets_and_inverses():
    rng = np.random.default_rng(0)
    sc = sw.generate_scene(3, CFG64)
    for proxy in render.PROXIES:
        inp, tgt = render.render_target(sc, proxy, rng)
        assert inp.shape == tgt.shape == sc["image"].shape and inp.dtype == tgt.dtype == np.uint8
    _, seg = render.render_target(sc, "segmentation", rng)
    np.testing.assert_array_equal(render.rgb_to_instance(seg), sc["instance"])
    assert (seg[sc["instance"] == 0] == render.INSTANCE_PALETTE[0]).all()
    _, sem = render.render_target(sc, "semantic", rng)
    np.testing.assert_array_equal(render.rgb_to_semantic(sem), sc["semantic"])
    _, dep = render.render_target(sc, "depth", rng)
    back = render.rgb_to_depth(dep).astype(int)
    assert (back[sc["instance"] == 0] == 255).all()
    assert np.abs(back - sc["depth"]).max() <= 1
    assert dep[sc["instance"] > 0].min() >= 56 and dep[sc["instance"] == 0].max() == 0
    _, edg = render.render_target(sc, "edge", rng)
    np.testing.assert_array_equal(render.rgb_to_edges(edg), sc["edges"])
    inp, rec = render.render_target(sc, "reconstruction", rng)
    np.testing.assert_array_equal(inp, sc["image"])
    np.testing.assert_array_equal(rec, sc["image"])
    inp, full = render.render_target(sc, "mae", rng)
    np.testing.assert_array_equal(full, sc["image"])
    masked = (inp != sc["image"]).any(-1)
    assert 0.3 < render.mae_mask(64, np.random.default_rng(1)).mean() < 0.7 and masked.any()
    # nearest-palette decoding survives blur-like noise
    noisy = np.clip(seg.astype(int) + np.random.default_rng(2).integers(-50, 51, seg.shape), 0, 255)
    np.testing.assert_array_equal(render.rgb_to_instance(noisy.astype(np.uint8)), sc["instance"])
    with pytest.raises(ValueError):
        render.render_target(sc, "nope", rng)


def test_scene_objects_accepts_record_layouts():
    import json

    sc = sw.generate_scene(4, CFG32)
    objs = sc["objects"]
    assert sw.scene_objects({"objects": json.dumps(objs).encode()}) == json.loads(json.dumps(objs))
    cols = {f"objects/{k}": np.array([o[k] for o in objs]) for k in ("shape", "color", "depth")}
    got = sw.scene_objects(cols)
    assert [g["shape"] for g in got] == [o["shape"] for o in objs]
    assert [g["depth"] for g in got] == pytest.approx([o["depth"] for o in objs])


def test_config_validation():
    with pytest.raises(ValueError):
        sw.WorldConfig(max_objects=20)
    with pytest.raises(ValueError):
        sw.WorldConfig(shapes=("blob",))
    import ml_collections

    c = ml_collections.ConfigDict({"data": {"image_size": 32, "min_objects": 2, "max_objects": 3}})
    wc = sw.WorldConfig.from_config(c)
    assert (wc.image_size, wc.min_objects, wc.max_objects) == (32, 2, 3)
    hash(wc)
