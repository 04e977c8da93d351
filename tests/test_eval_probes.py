"""Linear probes and attention-share arithmetic on synthetic inputs (no model)."""
import jax
import jax.numpy as jnp
import numpy as np

from sgt_jax.data import shapes_world as sw
from sgt_jax.eval import attention, probes

# Every probe here has the same shapes (N_TRAIN x D, same step count) so they share one compilation.
N_TRAIN, N_TEST, D, STEPS = 240, 120, 16, 40


def _fit(x, y):
    return probes.fit_probe(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], num_classes=probes.PROBE_NUM_CLASSES,
                            steps=STEPS)


def test_probe_separable_features_reach_high_accuracy():
    rng = np.random.default_rng(0)
    k = 4
    centers = rng.normal(size=(k, D)) * 3.0
    y = rng.integers(0, k, N_TRAIN + N_TEST)
    x = centers[y] + rng.normal(size=(len(y), D))
    res = _fit(x, y)
    assert res["test_acc"] >= 0.95 and res["train_acc"] >= 0.95
    assert res["chance"] < 0.5


def test_probe_random_labels_stay_at_chance():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, N_TRAIN + N_TEST)
    x = rng.normal(size=(len(y), D))
    res = _fit(x, y)
    assert abs(res["test_acc"] - 0.25) < 0.1  # nothing to learn: held-out accuracy is chance
    assert res["train_acc"] > res["test_acc"]  # while the training set is partly memorised


def test_probe_layers_and_labels():
    world = sw.WorldConfig(image_size=32, max_objects=3)
    scenes = [sw.generate_scene(i, world, "train") for i in range(6)]
    labels = probes.probe_labels(scenes)
    for i, s in enumerate(scenes):
        big = max(s["objects"], key=lambda o: o["area"])
        assert sw.SHAPES[labels["shape"][i]] == big["shape"]
        assert list(sw.COLORS)[labels["color"][i]] == big["color"]
        assert labels["count"][i] == len(s["objects"])
    # a layer that carries the label one-hot separates it; a noise layer does not
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, N_TRAIN + N_TEST)
    noise = rng.normal(size=(len(y), D))
    good = noise.copy()
    good[:, :3] = 3.0 * np.eye(3)[y] + 0.1 * rng.normal(size=(len(y), 3))
    feats = {"good": good, "noise": noise}
    out = probes.probe_layers({k: v[:N_TRAIN] for k, v in feats.items()}, {"shape": y[:N_TRAIN]},
                              {k: v[N_TRAIN:] for k, v in feats.items()}, {"shape": y[N_TRAIN:]},
                              targets=("shape",), steps=STEPS)
    assert out["layers"] == ["good", "noise"]
    acc_good, acc_noise = out["shape"]["test_acc"]
    assert acc_good >= 0.95 and acc_noise < 0.6


def test_group_mass_shares_sum_to_one():
    rng = np.random.default_rng(3)
    d, b, h, length = 2, 3, 2, 7
    logits = rng.normal(size=(d, b, h, length, length))
    causal = np.tril(np.ones((length, length), bool))
    probs = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
    qmask = np.zeros((b, length), np.int32)
    qmask[:, -2:] = 1
    groups = np.tile(np.array([2, 2, 0, 0, 0, 1, 1]), (b, 1))  # special, image, question
    mass = np.asarray(attention.group_mass(probs, jnp.asarray(qmask), jnp.asarray(groups), 3))
    assert mass.shape == (b, d, 3)
    np.testing.assert_allclose(mass.sum(-1), 2.0, rtol=1e-5)  # 2 queries per row, each sums to 1
    # exact value for one entry: image keys 2..4, queries 5..6, averaged over heads
    want = np.asarray(probs)[1, 0][:, 5:7, 2:5].sum() / h
    np.testing.assert_allclose(mass[0, 1, 0], want, rtol=1e-5)
    groups[:, 0] = -1  # an uncounted key drops out of the mass
    mass2 = np.asarray(attention.group_mass(probs, jnp.asarray(qmask), jnp.asarray(groups), 3))
    assert (mass2.sum(-1) < 2.0).all()


def test_word_kinds():
    kinds = [attention.word_kind(w, p) for p, w in zip([None, "a", "photo", "of", "two", "red", "stars", "left"],
                                                        ["a", "photo", "of", "two", "red", "stars", "left", "of"], strict=True)]
    assert kinds == ["other", "other", "other", "count", "color", "object", "position", "position"]
