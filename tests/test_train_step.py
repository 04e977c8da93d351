"""Train step: compile-once, NaN skip, frozen params bitwise, grad accumulation, sharded creation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_toy_stage import ToyStage, toy_config

from sgt_jax.train import mesh as mesh_lib
from sgt_jax.train import optim, sharding
from sgt_jax.train import state as state_lib
from sgt_jax.train import step as step_lib
from sgt_jax.train.loop import TrainingDiverged, train


def _build(cfg, stage=None, mesh_shape=(2, 2, 2)):
    stage = stage or ToyStage(cfg)
    mesh = mesh_lib.make_mesh(mesh_shape)
    rules = sharding.axis_rules(cfg)
    setup = state_lib.setup_state(stage, cfg, mesh, jax.random.key(0), stage.dummy_batch(cfg.train.batch_size))
    fn = step_lib.make_train_step(stage, cfg, setup.tx, setup.labels, mesh)
    jstep = step_lib.jit_train_step(fn, setup.shardings, sharding.batch_shardings(setup.example_spec, mesh, rules), mesh)
    it = stage.make_iterator("train", global_batch_size=cfg.train.batch_size, process_index=0, process_count=1, seed=0)

    def batches():
        while True:
            yield sharding.host_batch_to_global(next(it), mesh, rules)
    return stage, mesh, setup, jstep, batches()


def _host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def test_params_created_sharded_and_compile_once():
    cfg = toy_config()
    _, mesh, setup, jstep, data = _build(cfg)
    hidden = setup.state.params["hidden"]["kernel"]
    assert hidden.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert hidden.sharding.mesh.shape == mesh.shape
    # Adam moments mirror the parameter shardings; step counts are replicated.
    mu = setup.state.opt_state.inner_states["train"].inner_state[1].inner_state[0].mu  # inject_hyperparams(adamw)
    assert mu["hidden"]["kernel"].sharding.spec == hidden.sharding.spec

    compiles = []
    listener = lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None
    state = setup.state
    with jax.set_mesh(mesh):
        state, _ = jstep(state, next(data), jax.random.key(1))  # first call compiles
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            for i in range(4):
                state, m = jstep(state, next(data), jax.random.key(2 + i))
            jax.block_until_ready(state)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert jstep.trace_count() == 1
    assert int(state.step) == 5 and float(m["skipped"]) == 0.0


def test_nan_batch_skips_update_and_counts():
    cfg = toy_config()
    stage = ToyStage(cfg, nan_steps=(2, 3))
    _, mesh, setup, jstep, data = _build(cfg, stage)
    state = setup.state
    seen = []
    with jax.set_mesh(mesh):
        for i in range(5):
            before = _host(state.to_tree())
            state, m = jstep(state, next(data), jax.random.key(i))
            after = _host(state.to_tree())
            seen.append((before, after, jax.device_get(m)))
    for i, (before, after, m) in enumerate(seen):
        if i in (2, 3):
            assert m["skipped"] == 1.0 and not np.isfinite(m["loss"])
            for key in ("params", "opt_state", "model_state"):
                jax.tree.map(np.testing.assert_array_equal, before[key], after[key])
        else:
            assert m["skipped"] == 0.0
        if i in (1, 4):  # step 0 runs at warmup lr 0
            assert not np.array_equal(before["params"]["hidden"]["kernel"], after["params"]["hidden"]["kernel"])
    assert seen[3][2]["consecutive_skips"] == 2.0 and seen[4][2]["consecutive_skips"] == 0.0
    assert seen[4][2]["total_skips"] == 2.0 and int(state.step) == 5


def test_loop_stops_after_consecutive_skips(tmp_path):
    cfg = toy_config(max_consecutive_skips=3, tensorboard=False, steps=20)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps had a non-finite loss, gradient or update.*"
                       r"newest finite checkpoint is step 4"):
        train(cfg, str(tmp_path), stage=ToyStage(cfg, nan_steps=tuple(range(5, 40))))


def test_frozen_params_bitwise_unchanged():
    cfg = toy_config()
    cfg.optim.freeze = "^norm/"
    cfg.optim.weight_decay = 0.1
    stage = ToyStage(cfg)
    _, mesh, setup, jstep, data = _build(cfg, stage)
    assert setup.labels["frozen_in"]["kernel"] == optim.FROZEN and setup.labels["norm"]["scale"] == optim.FROZEN
    assert setup.labels["hidden"]["kernel"] == optim.TRAIN
    # Negative zeros would flip sign under p + 0.0: frozen leaves must not be touched at all.
    state = setup.state
    neg = jax.device_put(-jnp.zeros_like(state.params["norm"]["bias"]), state.params["norm"]["bias"].sharding)
    state = state.replace(params={**state.params, "norm": {**state.params["norm"], "bias": neg}})
    before = _host(state.params)
    with jax.set_mesh(mesh):
        for i in range(3):
            state, _ = jstep(state, next(data), jax.random.key(i))
    after = _host(state.params)
    for group in ("frozen_in", "norm"):
        for name in before[group]:
            assert before[group][name].tobytes() == after[group][name].tobytes(), (group, name)
    assert np.signbit(after["norm"]["bias"]).all()
    assert not np.array_equal(before["hidden"]["kernel"], after["hidden"]["kernel"])


def test_decay_mask_and_schedule():
    cfg = toy_config()
    params = {"hidden": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}, "norm": {"scale": jnp.zeros(4)},
              "final_norm": {"kernel": jnp.zeros((4, 4))}, "codebook": jnp.zeros((8, 2))}
    mask = optim.decay_mask(params, ("codebook",))
    assert mask == {"hidden": {"kernel": True, "bias": False}, "norm": {"scale": False},
                    "final_norm": {"kernel": False}, "codebook": False}
    cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.end_lr_fraction = "cosine", 10, 110, 0.1
    sched = optim.make_schedule(cfg)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(10)), cfg.optim.lr, rtol=1e-6)
    np.testing.assert_allclose(float(sched(110)), 0.1 * cfg.optim.lr, rtol=1e-5)


def test_grad_accumulation_matches_full_batch():
    cfg1 = toy_config()
    cfg2 = toy_config()
    cfg2.optim.grad_accum_steps = 4
    results = []
    for cfg in (cfg1, cfg2):
        _, mesh, setup, jstep, data = _build(cfg, ToyStage(cfg))
        state = setup.state
        with jax.set_mesh(mesh):
            state, m = jstep(state, next(data), jax.random.key(0))
        results.append((_host(state.params), jax.device_get(m)))
    # The per-row rng noise differs between one and four micro-batches; everything else is the same
    # mean over the same rows, so one step agrees to ~1e-4.
    np.testing.assert_allclose(results[0][1]["mse"], results[1][1]["mse"], rtol=1e-3)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), results[0][0], results[1][0])


def test_ema_lags_behind_the_fp32_params():
    cfg = toy_config()
    cfg.optim.ema_decay = 0.9
    _, mesh, setup, jstep, data = _build(cfg)
    state = setup.state
    p0 = _host(state.params)
    with jax.set_mesh(mesh):
        for i in range(3):
            state, m = jstep(state, next(data), jax.random.key(i))
    assert state.params["hidden"]["kernel"].dtype == jnp.float32  # fp32 master params
    assert np.isfinite(float(m["loss"]))
    p, e = _host(state.params), _host(state.ema_params)
    k0, k, ke = p0["hidden"]["kernel"], p["hidden"]["kernel"], e["hidden"]["kernel"]
    # EMA lies between the start and the current params (it lags behind).
    assert 0 < np.linalg.norm(ke - k0) < np.linalg.norm(k - k0)


def _dot_dtypes(fn, *args) -> list[str]:
    """Operand dtypes of every matmul (dot_general) in the traced function, sub-jaxprs included."""
    out = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                out.append(str(eqn.invars[0].aval.dtype))
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
                visit(sub)
            for v in eqn.params.values():
                for j in (v if isinstance(v, (list, tuple)) else (v,)):
                    if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                        visit(j.jaxpr)
                    elif hasattr(j, "eqns"):
                        visit(j)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_umm_stage_computes_in_the_configured_dtype(dtype):
    """train.compute_dtype reaches the real UMM stage's matmuls (the frozen VQ tokenizer stays f32);
    the params stay f32 masters. Traced only (make_jaxpr), nothing is compiled."""
    import flax.linen as nn

    from sgt_jax import checks
    from sgt_jax.config import config_module
    from sgt_jax.train.stages.umm_stage import UMMStage

    root = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
    cfg = config_module(root + "/configs/base_shapes.py").get_config("smoke")
    cfg.train.compute_dtype = dtype
    stage = UMMStage(checks.prepare(cfg))
    batch = stage.dummy_batch(2)
    params = nn.unbox(jax.eval_shape(lambda k: stage.init(k, batch)[0], jax.random.key(0)))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    dots = _dot_dtypes(lambda p: stage.loss_fn(p, {}, batch, None, 0)[0], params)
    n_bf16 = sum(d == "bfloat16" for d in dots)
    if dtype == "float32":
        assert n_bf16 == 0 and dots
    else:  # the decoder, ViT, adapters and heads: most matmuls; the VQ encoder's stay float32
        assert n_bf16 > len(dots) / 2, dots
        assert "float32" in dots
