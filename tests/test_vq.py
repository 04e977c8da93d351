"""VQ tokenizer: shapes, straight-through gradients, quantiser losses, dead-code re-init, training."""
import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgt_jax.checks import prepare
from sgt_jax.models import vq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vq_config(arg="smoke"):
    spec = importlib.util.spec_from_file_location("vq_shapes_cfg", os.path.join(ROOT, "configs", "vq_shapes.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


TINY = {
    "vit": vq.VQSpec(family="vit", image_size=16, codebook_size=32, code_dim=4, downsample=4, width=16, depth=1,
                     num_heads=2, mlp_ratio=2),
    "vit_refine": vq.VQSpec(family="vit", image_size=16, codebook_size=32, code_dim=4, downsample=8, width=16,
                            depth=1, num_heads=2, mlp_ratio=2, refine_channels=4),
    "conv": vq.VQSpec(family="conv", image_size=16, codebook_size=32, code_dim=4, downsample=4, width=4,
                      channel_mult=(1, 1, 2)),
    "llamagen": vq.VQSpec(family="llamagen", image_size=16, codebook_size=32, code_dim=4, downsample=4, width=32,
                          channel_mult=(1, 1, 2), num_res_blocks=1, z_channels=32),
}


@pytest.mark.parametrize("name", sorted(TINY))
def test_encode_decode_shapes_and_logical_axes(name):
    spec = TINY[name]
    model = vq.VQModel(spec)
    boxed = vq.init_params(model, jax.random.key(0))
    for leaf in jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        assert isinstance(leaf, nn.LogicallyPartitioned), "every parameter carries logical axis names"
        assert len(leaf.names) == leaf.value.ndim
    params = nn.meta.unbox(boxed)
    images = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)

    @jax.jit  # one compile: the inference API and the training forward side by side
    def run(p, x):
        codes = vq.encode(model, p, x)
        recon, stats = model.apply({"params": p}, x)
        return codes, vq.decode(model, p, codes), recon, stats["codes"]

    codes, out, recon, train_codes = run(params, images)
    g = 16 // spec.downsample
    assert codes.shape == (3, g, g) and codes.dtype == jnp.int32
    assert int(codes.min()) >= 0 and int(codes.max()) < spec.codebook_size
    assert out.shape == (3, 16, 16, 3) and out.dtype == jnp.float32
    # decode(encode(x)) is exactly the training forward's reconstruction
    np.testing.assert_allclose(np.asarray(recon), np.asarray(out), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(train_codes), np.asarray(codes))


def test_space_to_depth_roundtrip():
    x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
    y = vq.space_to_depth(x, 4)
    assert y.shape == (2, 2, 2, 48)
    np.testing.assert_array_equal(np.asarray(y[0, 1, 0, :3]), np.asarray(x[0, 4, 0]))
    np.testing.assert_array_equal(np.asarray(vq.depth_to_space(y, 4)), np.asarray(x))


def test_straight_through_gradient_reaches_encoder():
    spec = TINY["vit"]
    model = vq.VQModel(spec)
    params = nn.meta.unbox(vq.init_params(model, jax.random.key(0)))
    images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)

    def recon_only(p):  # no codebook/commitment terms: encoder grads can only come through the quantiser
        recon, _ = model.apply({"params": p}, images)
        return jnp.mean(jnp.square(recon - images))

    grads = jax.jit(jax.grad(recon_only))(params)
    enc_norm = optax.tree.norm(grads["encoder"])
    assert float(enc_norm) > 0.0
    # the codebook gets no gradient from the reconstruction (the STE detaches it) ...
    assert float(jnp.abs(grads["quantizer"]["codebook"]).max()) == 0.0

    def with_vq_losses(p):
        recon, st = model.apply({"params": p}, images)
        return jnp.mean(jnp.square(recon - images)) + st["codebook_loss"]

    # ... but does from the codebook loss.
    assert float(jnp.abs(jax.jit(jax.grad(with_vq_losses))(params)["quantizer"]["codebook"]).max()) > 0.0


def test_quantizer_losses_on_a_known_case():
    q = vq.Quantizer(codebook_size=2, code_dim=2)
    codebook = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    theta = 0.3
    z = jnp.array([[[np.cos(theta) * 5.0, np.sin(theta) * 5.0]], [[0.0, -2.0]]])  # [2, 1, 2]; norms don't matter
    zq, codes, st = q.apply({"params": {"codebook": codebook}}, z)
    np.testing.assert_array_equal(np.asarray(codes), [[0], [0]])  # (0,-1) is 90 deg from e0, 180 from e1
    # squared distances on the unit circle: |e0 - (cos t, sin t)|^2 = 2 - 2cos t ; |e0 - (0,-1)|^2 = 2
    expected = ((2 - 2 * np.cos(theta)) + 2.0) / 2
    np.testing.assert_allclose(float(st["codebook_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(st["commit_loss"]), expected, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(zq), np.asarray([[[1.0, 0.0]], [[1.0, 0.0]]]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(st["counts"]), [2.0, 0.0])
    np.testing.assert_allclose(float(st["perplexity"]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(st["usage"]), 0.5)


def test_dead_code_reinit_replaces_only_unused_codes():
    k, d = 8, 4
    codebook = vq.l2_normalize(jax.random.normal(jax.random.key(0), (k, d)))
    counts = jnp.array([10.0, 0, 5, 0, 0, 1, 0, 0])
    usage = vq.update_usage(jnp.zeros((k,)), counts, decay=0.0)  # frequencies of this batch
    latents = vq.l2_normalize(jax.random.normal(jax.random.key(1), (16, d)))
    new_cb, new_usage, n_dead = vq.reinit_dead_codes(codebook, usage, latents, jax.random.key(2), threshold=0.5)
    dead = np.asarray(counts) == 0
    assert int(n_dead) == dead.sum()
    np.testing.assert_array_equal(np.asarray(new_cb)[~dead], np.asarray(codebook)[~dead])
    assert not np.any(np.all(np.isclose(np.asarray(new_cb)[dead], np.asarray(codebook)[dead]), axis=-1))
    # revived codes sit (up to the small jitter) on encoder outputs
    sims = np.asarray(new_cb)[dead] @ np.asarray(latents).T
    assert np.all(sims.max(-1) > 0.99)
    np.testing.assert_allclose(np.asarray(new_usage)[dead], 1.0 / k)


def test_configs_validate():
    prepare(vq_config(None))
    prepare(vq_config("smoke"))
    c = vq_config(None)
    assert c.stage == "vq" and c.model.vq.downsample == 4


def adam_losses(stage, params, model_state, batch, steps: int) -> tuple[list[float], dict]:
    """Losses of `steps` Adam steps of a VQ stage on one fixed batch (loss_fn + post_update, as the loop
    runs them), and the final model state."""
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, model_state, i):
        (loss, (metrics, ms)), grads = jax.value_and_grad(stage.loss_fn, has_aux=True)(
            params, model_state, batch, jax.random.key(0), i)
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
        params, ms = stage.post_update(params, ms, metrics, jax.random.fold_in(jax.random.key(1), i), i)
        return params, opt, ms, loss

    losses = []
    for i in range(steps):
        params, opt, model_state, loss = step(params, opt, model_state, jnp.int32(i))
        losses.append(float(loss))
    return losses, model_state


def test_stage_smoke_training_lowers_loss():
    from sgt_jax.data import shapes_world
    from sgt_jax.train.stage import get_stage

    cfg = prepare(vq_config("smoke"))
    stage = get_stage(cfg)
    world = shapes_world.WorldConfig(image_size=cfg.data.image_size)
    transform = stage.example_transform("train")
    rng = np.random.default_rng(0)
    examples = [transform(shapes_world.generate_scene(i, world, "train"), rng) for i in range(8)]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    assert batch["image"].shape == stage.dummy_batch(8)["image"].shape
    params, model_state = nn.meta.unbox(stage.init(jax.random.key(0), stage.dummy_batch(8)))
    losses, model_state = adam_losses(stage, params, model_state, batch, steps=25)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * losses[0], losses
    assert float(model_state["usage"].sum()) > 0.5  # usage EMA tracked in model_state
    assert stage.flops_per_example() > 0
