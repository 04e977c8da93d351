"""Linear separability: logistic-regression probes on pooled image-token features, per layer.

Why probes rather than t-SNE pictures: the paper shows that SGT separates confusable classes in the
understanding features; a linear probe with a fixed budget, trained on some scenes and tested on
held-out scenes, turns that into a number per layer that can be compared across runs and seeds.

Features (`extract_features`): for each scene the understanding prefix `<bos> <img> [V] </img>` is
run once with hidden states on; the image-token positions are mean-pooled at every ViT block output
(`vit_0` = patch embeddings ... `vit_k`) and at every LLM residual-stream layer (`llm_0` = the
spliced adapter outputs ... `llm_D`). Image positions only see `<bos> <img>` before them (causal), so
no question text leaks into the features.

Labels (`probe_labels`): `shape` and `color` of the largest visible object, and `count` (number of
objects). The probe (`fit_probe`) is multinomial logistic regression on standardised features with
an L2 penalty, fitted full-batch by a fixed number of L-BFGS iterations (a jitted `lax` loop), so
every run gets exactly the same budget.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sgt_jax.data import shapes_world as sw

PROBE_TARGETS: tuple[str, ...] = ("shape", "color", "count")


# ---------------------------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------------------------
def probe_labels(scenes: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Per-scene integer labels: shape / colour index of the largest visible object, object count."""
    colors = tuple(sw.COLORS)
    shape, color, count = [], [], []
    for scene in scenes:
        objs = sw.scene_objects(scene)
        big = max(objs, key=lambda o: (int(o["area"]), -objs.index(o)))
        shape.append(sw.SHAPES.index(big["shape"]))
        color.append(colors.index(big["color"]))
        count.append(len(objs))
    return {"shape": np.asarray(shape, np.int32), "color": np.asarray(color, np.int32),
            "count": np.asarray(count, np.int32)}


# One class count for every target (shape 8, colour 10, count <= 15): classes without training
# labels are simply never predicted, and all probes of one feature width share one compilation.
PROBE_NUM_CLASSES = max(len(sw.SHAPES), len(sw.COLORS), sw.INSTANCE_PALETTE_SIZE)


# ---------------------------------------------------------------------------------------------
# the probe
# ---------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x, y, num_classes: int, l2: float, steps: int):
    d = x.shape[1]
    params = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}

    def loss_fn(p):
        logits = x @ p["w"] + p["b"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + 0.5 * l2 * jnp.sum(jnp.square(p["w"]))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)

    def body(_, carry):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss_fn)
        return optax.apply_updates(p, updates), state

    params, _ = jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))
    return params, loss_fn(params)


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
              num_classes: int | None = None, l2: float = 1e-3, steps: int = 100) -> dict[str, float]:
    """Fit a multinomial logistic regression on (x_train, y_train); report accuracy on both sets.

    Features are standardised with the training statistics. `chance` is the accuracy of always
    predicting the most frequent training class, evaluated on the test labels (what a probe that
    learned nothing from the features scores)."""
    x_train = np.asarray(x_train, np.float64)
    x_test = np.asarray(x_test, np.float64)
    y_train, y_test = np.asarray(y_train, np.int32), np.asarray(y_test, np.int32)
    if x_train.ndim != 2 or x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise ValueError(f"probe needs x [n, d] with one label per row; got x_train {x_train.shape}, "
                         f"y_train {y_train.shape}, x_test {x_test.shape}, y_test {y_test.shape}")
    k = int(num_classes or max(int(y_train.max()), int(y_test.max())) + 1)
    mean = x_train.mean(0)
    std = x_train.std(0)
    std = np.where(std > 1e-8, std, 1.0)
    xt = ((x_train - mean) / std).astype(np.float32)
    xv = ((x_test - mean) / std).astype(np.float32)
    params, loss = _fit(jnp.asarray(xt), jnp.asarray(y_train), k, float(l2), int(steps))
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    train_acc = float(np.mean(np.argmax(xt @ w + b, -1) == y_train))
    test_acc = float(np.mean(np.argmax(xv @ w + b, -1) == y_test))
    majority = int(np.bincount(y_train, minlength=k).argmax())
    return {"train_acc": train_acc, "test_acc": test_acc, "chance": float(np.mean(y_test == majority)),
            "loss": float(loss)}


def probe_layers(train_feats: Mapping[str, np.ndarray], train_labels: Mapping[str, np.ndarray],
                 test_feats: Mapping[str, np.ndarray], test_labels: Mapping[str, np.ndarray], *,
                 targets: Sequence[str] = PROBE_TARGETS, l2: float = 1e-3, steps: int = 100) -> dict:
    """One probe per (target, layer): {layers: [...], <target>: {test_acc: [...], train_acc: [...],
    chance: float}} with the per-layer lists in `layers` order."""
    layers = list(train_feats)
    out: dict[str, Any] = {"layers": layers}
    for t in targets:
        res = [fit_probe(train_feats[name], train_labels[t], test_feats[name], test_labels[t],
                         num_classes=PROBE_NUM_CLASSES, l2=l2, steps=steps) for name in layers]
        out[t] = {"test_acc": [r["test_acc"] for r in res], "train_acc": [r["train_acc"] for r in res],
                  "chance": res[0]["chance"] if res else float("nan")}
    return out


# ---------------------------------------------------------------------------------------------
# features from a UMM
# ---------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=0, static_argnames=("span",))
def _pooled(model, params, inputs, span: tuple[int, int]):
    """Mean over the image-token span: ViT [B, blocks+1, Dv] and LLM residual stream [B, depth+1, D]."""
    start, n = span
    out = model.apply({"params": params}, inputs, return_hidden=True, return_vit_hidden=True)
    llm = out["hidden"][:, :, start:start + n].astype(jnp.float32).mean(2)  # [depth+1, B, D]
    vit = out["vit_hidden"].astype(jnp.float32).mean(2)  # [blocks+1, B, Dv]
    return jnp.swapaxes(vit, 0, 1), jnp.swapaxes(llm, 0, 1)


def extract_features(run, scenes: Sequence[Mapping[str, Any]], batch_size: int = 16) -> dict[str, np.ndarray]:
    """Mean-pooled image-token features per layer: {"vit_i": [n, Dv], "llm_j": [n, D]}.

    `run` is a `sgt_jax.eval.umm_run.UMMRun` (model, params, sequence builder)."""
    b = run.builder
    ids = [b.ids.bos] + b.vit_span()
    n_vit = b.layout.num_vit_tokens
    vit_start = 2

    def rows(chunk):
        images = np.stack([np.asarray(s["image"], np.uint8) for s in chunk])
        return {"tokens": np.tile(np.asarray(ids, np.int32), (len(chunk), 1)),
                "attn_mask": np.ones((len(chunk), len(ids)), np.int32),
                "vit_images": run.vit_pixels(images),
                "vit_start": np.full((len(chunk),), vit_start, np.int32)}

    fn = partial(_pooled, run.model, span=(vit_start, n_vit))
    vit, llm = run.map_batches(fn, rows, list(scenes), batch_size)
    feats = {f"vit_{i}": vit[:, i] for i in range(vit.shape[1])}
    feats.update({f"llm_{i}": llm[:, i] for i in range(llm.shape[1])})
    return feats
