"""UMM stage: smoke runs of the base and post-training configs through the generic loop lower the
loss, the VQ stays bitwise frozen, the post stage loads the base checkpoint, per-task metrics."""
import os

import jax
import numpy as np
import pytest

from sgt_jax.checks import prepare
from sgt_jax.config import PROXIES, TASKS, ConfigError, config_module, finalize
from sgt_jax.data import pipeline, shapes_world, tokenizer
from sgt_jax.train import loop
from sgt_jax.train.stages.umm_stage import UMMStage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_SCENES = 48


def _config_module(name):
    return config_module(os.path.join(ROOT, "configs", f"{name}.py"))


class InMemoryUMMStage(UMMStage):
    """The real stage, reading scenes generated in memory instead of a built TFDS dataset, and
    keeping the result of every evaluate() call."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.eval_history = []

    def record_source(self, split):
        d = self.cfg.data
        wcfg = shapes_world.WorldConfig(image_size=d.image_size, min_objects=d.min_objects, max_objects=d.max_objects)
        scenes = [dict(shapes_world.generate_scene(i, wcfg, split), key=f"{split}/{i}") for i in range(NUM_SCENES)]
        return pipeline.RecordSource(raw=list(range(NUM_SCENES)), deserialize=scenes.__getitem__, name=f"mem/{split}")

    def evaluate(self, params, model_state, *, step, workdir):
        out = super().evaluate(params, model_state, step=step, workdir=workdir)
        self.eval_history.append((step, out))
        return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("umm_tok") / "tok")
    cfg = _config_module("base_shapes").get_config("smoke")
    tokenizer.build_shapes_tokenizer(out, cfg, num_scenes=60)
    return out


def _smoke(name, arg, tok_dir, **init_from):
    cfg = _config_module(name).get_config(arg)
    cfg.data.tokenizer_dir = tok_dir
    cfg.checkpoint.async_save = False
    cfg.init_from.path = init_from.get("path", "")
    for k, v in init_from.get("train", {}).items():
        cfg.train[k] = v
    for k, v in init_from.get("optim", {}).items():
        cfg.optim[k] = v
    return finalize(cfg)


def _fixed_batch(stage):
    it = stage.make_iterator("train", process_index=0, process_count=1, seed=123)
    return {k: v for k, v in next(it).items() if k in stage.dummy_batch(1)}


def _vq(params):
    return jax.tree.leaves(jax.device_get(params["vq"]))


def _check_loss_decreased(stage, tasks):
    """Held-out loss after the first update (lr 0 under warmup: the initial params) vs the end."""
    steps = [s for s, _ in stage.eval_history]
    assert steps == list(range(1, stage.cfg.train.steps + 1)), steps
    first, last = stage.eval_history[0][1], stage.eval_history[-1][1]
    assert last["eval/loss"] < first["eval/loss"] - 0.3, (first["eval/loss"], last["eval/loss"])
    for task in tasks:
        assert last[f"eval/loss/{task}"] < first[f"eval/loss/{task}"], task


def test_configs_validate():
    base = _config_module("base_shapes")
    post = _config_module("post_shapes")
    for cfg in (base.get_config(), base.get_config("smoke")):
        prepare(cfg, 8)
        assert set(cfg.data.mixture) == {"understanding", "t2i"} and cfg.init_from.mapping == "->vq"
    for proxy in ("none",) + PROXIES:
        cfg = post.get_config(f"proxy={proxy},smoke")
        prepare(cfg, 8)
        if proxy == "none":
            assert dict(cfg.data.mixture) == {"understanding": 1.0}
        else:
            assert dict(cfg.data.mixture) == {f"proxy_{proxy}": 2.0, "understanding": 1.0}
        assert cfg.optim.schedule == "constant" and cfg.data.text_loss_weight == 1.5
    with pytest.raises(ConfigError, match="proxy"):
        post.get_config("proxy=bogus")


def test_frozen_patterns_match_vq_and_optionally_vit():
    import flax.linen as nn

    from sgt_jax.train import optim

    cfg = _config_module("base_shapes").get_config("smoke")
    cfg.model.umm_stage.freeze_vit = True
    stage = UMMStage(finalize(cfg))
    params = nn.unbox(jax.eval_shape(lambda k: stage.init(k, stage.dummy_batch(1))[0], jax.random.key(0)))
    labels = optim.param_labels(params, stage.frozen)
    flat = {optim.path_str(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert all((lab == optim.FROZEN) == (path.startswith("vq/") or path.startswith("umm/vit/"))
               for path, lab in flat.items())
    assert any(p.startswith("vq/") for p in flat) and any(p.startswith("umm/vit/") for p in flat)
    assert any(p.startswith("umm/und_adapter/") and lab == optim.TRAIN for p, lab in flat.items())


def _save_vq_run(workdir, cfg, seed=5):
    """A VQ-stage checkpoint (as tools/train.py on vq_shapes writes it) with distinguishable params."""
    import jax.numpy as jnp

    from sgt_jax.train import checkpoint as ckpt_lib
    from sgt_jax.train.stages.vq_stage import VQStage
    from sgt_jax.train.state import TrainState

    vq_cfg = _config_module("vq_shapes").get_config("smoke")
    finalize(vq_cfg)
    assert vq_cfg.model.vq.to_dict() == cfg.model.vq.to_dict()  # base_shapes copies the VQ run's section
    import flax.linen as nn

    params = nn.unbox(VQStage(vq_cfg).init(jax.random.key(seed), None)[0])
    state = TrainState(step=jnp.int32(3), params=params, model_state={}, opt_state={"count": jnp.int32(3)},
                       ema_params=None, consecutive_skips=jnp.int32(0), total_skips=jnp.int32(0))
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    ckpt.save(3, state, metadata={"config": vq_cfg.to_json_best_effort(), "stage": "vq"}, force=True)
    ckpt.close()
    return jax.device_get(params)


def test_base_then_post_smoke_runs(tmp_path, tok_dir):
    # ---- base: the frozen VQ comes from a VQ-stage run through init_from with mapping "->vq" ----
    vq_dir = str(tmp_path / "vq")
    cfg = _smoke("base_shapes", "smoke", tok_dir, path=vq_dir)
    vq_params = _save_vq_run(vq_dir, cfg)
    assert cfg.init_from.mapping == "->vq"
    cfg.eval.every_steps = 1
    base_dir = str(tmp_path / "base")
    stage = InMemoryUMMStage(cfg)
    assert stage.frozen == ("^vq/",)
    res = loop.train(cfg, base_dir, stage=stage)
    assert res.step == cfg.train.steps and res.train_step_compiles == 1
    for task in ("understanding", "t2i"):
        assert np.isfinite(res.metrics[f"train/loss/{task}"])
    _check_loss_decreased(stage, ("understanding", "t2i"))
    final = jax.device_get(res.state.params)
    # The hand-off loaded the VQ run's params (seed 5, not this run's own init) and kept them frozen.
    for a, b in zip(jax.tree.leaves(vq_params), _vq(final), strict=True):
        np.testing.assert_array_equal(a, b)

    # Loss masks, on the trained params with the stage's compiled eval loss (no new compile).
    f = stage._eval_fn
    batch = _fixed_batch(stage)
    _, m = f(final, batch)
    assert float(m["text_loss"]) == pytest.approx(1.5 * float(m["text_ce"]), rel=1e-5)  # weight 1.5 on answers
    # No answer weights -> no text loss; the generation loss does not move.
    _, m2 = f(final, dict(batch, text_loss_weight=np.zeros_like(batch["text_loss_weight"])))
    assert float(m2["text_loss"]) == 0.0 and float(m2["gen_loss"]) == pytest.approx(float(m["gen_loss"]), rel=1e-6)
    # Other target images (-> other codes from the in-graph VQ) move only the generation loss.
    _, m3 = f(final, dict(batch, target_image=255 - batch["target_image"]))
    assert float(m3["text_loss"]) == pytest.approx(float(m["text_loss"]), rel=1e-5)
    assert abs(float(m3["gen_loss"]) - float(m["gen_loss"])) > 1e-3

    # ---- post: SGT segmentation from the base checkpoint (identity mapping), accumulating 2
    # micro-batches of 8 rows per step (a multiple of the 8 test devices) ----
    pcfg = _smoke("post_shapes", "proxy=segmentation,smoke", tok_dir, path=base_dir,
                  train={"batch_size": 16, "num_examples": 6 * 16, "steps": -1}, optim={"grad_accum_steps": 2})
    assert pcfg.train.steps == 6
    pcfg.seed = 1  # its own fresh init differs from the base's, so equal VQ params prove the load
    pcfg.eval.every_steps = 1
    pstage = InMemoryUMMStage(pcfg)
    pres = loop.train(pcfg, str(tmp_path / "post"), stage=pstage)
    pfinal = jax.device_get(pres.state.params)
    # The VQ came from the base checkpoint and stayed bitwise frozen; the UMM weights moved.
    for a, b in zip(_vq(final), _vq(pfinal), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(final["umm"]["gen_head"]["fc2"]["kernel"], pfinal["umm"]["gen_head"]["fc2"]["kernel"])
    _check_loss_decreased(pstage, ("understanding", "segmentation"))
    assert np.isfinite(pres.metrics["train/loss/segmentation"])
    pbatch = _fixed_batch(pstage)
    assert set(np.unique(pbatch["task"])) <= {TASKS.index("understanding"), TASKS.index("proxy_segmentation")}


@pytest.mark.parametrize("name,low,high", [("umm_1b", 1.9e9, 2.2e9), ("umm_7b", 7.2e9, 7.6e9)])
def test_real_scale_configs_match_janus_pro(name, low, high):
    """The TPU configs build Janus-Pro-sized models (2.09B / 7.42B parameters incl. SigLIP-L and
    the VQ), abstractly (no memory), and their smoke variants validate on the 8 test devices."""
    import flax.linen as nn

    mod = _config_module(name)
    cfg = mod.get_config("proxy=segmentation")
    prepare(cfg)
    assert cfg.train.compute_dtype == "bfloat16" and cfg.mesh.shape[1] == -1
    # The layouts the TPU compiler checked (README): 1B without remat in 2 microbatches, 7B remat in one pass.
    assert (bool(cfg.train.remat), int(cfg.optim.grad_accum_steps)) == {"umm_1b": (False, 2), "umm_7b": (True, 1)}[name]
    assert dict(cfg.data.mixture) == {"proxy_segmentation": 2.0, "understanding": 1.0}
    stage = UMMStage(cfg)
    assert stage.layout.num_vit_tokens == 576 and stage.layout.num_codes == 576
    params = nn.unbox(jax.eval_shape(lambda k: stage.init(k, stage.dummy_batch(1))[0], jax.random.key(0)))
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert low < total < high, total
    # ~6 x params x tokens: the analytic count is within a few percent of that rule of thumb.
    n_llm = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params["umm"]["llm"]))
    assert 0.9 < stage.flops_per_example() / (6 * n_llm * cfg.data.max_seq_len) < 1.3
    prepare(mod.get_config("smoke"), 8)


def test_gen_loss_weight_scales_the_code_loss_only(tok_dir):
    """data.gen_loss_weight multiplies the code CE term of the loss (and nothing else)."""
    import copy

    cfg = _smoke("base_shapes", "smoke", tok_dir)
    stage = InMemoryUMMStage(cfg)
    params = jax.jit(lambda k: __import__("flax").linen.unbox(stage.init(k, stage.dummy_batch(1))[0]))(
        jax.random.key(0))
    batch = _fixed_batch(stage)
    heavy_cfg = copy.deepcopy(cfg)
    heavy_cfg.data.gen_loss_weight = 2.5
    heavy = InMemoryUMMStage(heavy_cfg)
    loss, m = jax.jit(stage.losses)(params, batch)
    loss2, m2 = jax.jit(heavy.losses)(params, batch)
    assert float(m["gen_ce"]) > 0 and float(m2["gen_ce"]) == pytest.approx(float(m["gen_ce"]), rel=1e-6)
    assert float(m2["gen_loss"]) == pytest.approx(2.5 * float(m["gen_loss"]), rel=1e-5)
    assert float(m2["text_loss"]) == pytest.approx(float(m["text_loss"]), rel=1e-6)
    assert float(loss2) - float(loss) == pytest.approx(1.5 * float(m["gen_loss"]), rel=1e-4)


def test_gathered_text_loss_positions_give_the_same_loss(tok_dir):
    """model.umm.text_loss_positions = the batch's max count: same loss as the LM head everywhere;
    fewer: the overflow is reported, not hidden."""
    cfg = _smoke("base_shapes", "smoke", tok_dir)
    stage = InMemoryUMMStage(cfg)
    batch = _fixed_batch(stage)
    params, _ = jax.jit(stage.init)(jax.random.key(0), batch)
    import flax.linen as nn

    params = nn.unbox(params)
    counts = (np.asarray(batch["text_loss_weight"]) > 0).sum(1)
    ref_loss, ref = jax.jit(stage.losses)(params, batch)
    for k, dropped in ((int(counts.max()), 0.0), (int(counts.max()) - 1, float(np.sum(counts == counts.max())))):
        cfg.model.umm.text_loss_positions = k
        loss, m = jax.jit(UMMStage(cfg).losses)(params, batch)
        assert float(m["text_loss_dropped"]) * len(counts) == pytest.approx(dropped)
        if not dropped:
            np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
            np.testing.assert_allclose(float(m["text_acc"]), float(ref["text_acc"]), rtol=1e-6)


def test_analytic_flops_follow_the_gathered_lm_head(tok_dir):
    """The stage's analytic FLOPs charge the LM head only at the gathered text-loss positions: the
    drop from every position to k positions matches XLA's own count of the lowered loss."""
    cfg = _smoke("base_shapes", "smoke", tok_dir)
    stage = InMemoryUMMStage(cfg)
    batch = _fixed_batch(stage)
    params = jax.eval_shape(lambda: stage.init(jax.random.key(0), batch)[0])
    import flax.linen as nn

    from sgt_jax.models import umm as umm_lib

    params = nn.unbox(params)
    b, length = batch["tokens"].shape
    k = 8
    xla, analytic = {}, {}
    for positions in (0, k):
        cfg.model.umm.text_loss_positions = positions
        st = UMMStage(cfg)
        xla[positions] = float(jax.jit(st.losses).lower(params, batch).cost_analysis()["flops"])
        analytic[positions] = b * umm_lib.flops_per_row(st.mcfg, length, positions)
    assert 0 < k < length
    assert analytic[0] - analytic[k] == pytest.approx(xla[0] - xla[k], rel=0.15)


def test_grad_balance_tool_measures_the_weighted_terms(tok_dir, load_tool):
    """tools/grad_balance.py: |g_gen| follows data.gen_loss_weight and |g_text| does not; the
    text-token shares of MCQ answers and captions add up to the understanding rows' share."""
    gb = load_tool("grad_balance")
    cfg = _smoke("post_shapes", "proxy=segmentation,smoke", tok_dir)
    stage = InMemoryUMMStage(cfg)
    batch = _fixed_batch(stage)
    import flax.linen as nn

    params = nn.unbox(jax.jit(stage.init)(jax.random.key(0), batch)[0])
    rows = []
    for weight in (1.0, 2.0):
        cfg.data.gen_loss_weight = weight
        st = UMMStage(cfg)
        rows.append(gb.batch_row(gb.balance_fn(st), params["umm"], params["vq"], batch, cfg))
    one, two = rows
    assert one["g_text"] > 0 and one["g_gen"] > 0 and -1.0 <= one["cosine"] <= 1.0
    assert two["g_gen"] == pytest.approx(2 * one["g_gen"], rel=1e-5)
    assert two["g_text"] == pytest.approx(one["g_text"], rel=1e-6)
    assert two["cosine"] == pytest.approx(one["cosine"], abs=1e-5)
    und = np.asarray(batch["task"]) == TASKS.index("understanding")
    counts = (np.asarray(batch["text_loss_weight"]) > 0).sum(1)
    assert one["mcq_rows"] + one["caption_rows"] == int(und.sum())
    assert one["mcq_token_share"] + one["caption_token_share"] == pytest.approx(counts[und].sum() / counts.sum())
    assert "| 0 |" in gb.table(rows)


def test_the_shipped_base_is_the_quick_recipe_and_fits_the_post_configs():
    """results/base_search/base_quick (what make demo starts from) was trained with today's
    configs/base_shapes.py:quick model and data, and every parameter the quick post-training config
    builds is in it with its shape (an abstract check: nothing is read but metadata)."""
    import flax.linen as nn

    from sgt_jax import config as config_lib
    from sgt_jax.train import checkpoint as ckpt_lib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shipped = os.path.join(root, "results", "base_search", "base_quick")
    meta = ckpt_lib.read_metadata(shipped)
    saved = config_lib.from_saved(meta["config"])
    want = finalize(config_module(os.path.join(root, "configs", "base_shapes.py")).get_config("quick"))
    assert saved.model.to_dict() == want.model.to_dict()
    for field in ("image_size", "world", "min_objects", "max_objects", "tokenizer_vocab_size", "max_seq_len"):
        assert saved.data[field] == want.data[field], field
    assert meta["exported"]["dtype"] == "float16" and meta["exported"]["step"] == 5000
    post = finalize(config_module(os.path.join(root, "configs", "post_shapes.py")).get_config(
        "proxy=segmentation,quick"))
    stage = UMMStage(post)
    abstract = nn.unbox(jax.eval_shape(lambda: stage.init(jax.random.key(0), stage.dummy_batch(1))[0]))
    tree = ckpt_lib.state_metadata(ckpt_lib.resolve_step_dir(shipped))["params"]
    have = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    need = {"/".join(str(getattr(k, "key", k)) for k in p): tuple(v.shape)
            for p, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    assert need == have


@pytest.mark.parametrize("mot", [False, True])
def test_packed_rows_give_the_unpacked_loss(tok_dir, mot):
    """data.packing on the UMM stage: the same examples packed several to a row (grain first fit,
    one ViT / target-image slot per example) give the unpacked batch's loss and per-task losses.
    Attention that crossed a segment, or a span start left in the example's own coordinates, would
    change them (RoPE scores depend on relative positions only, so the restarted positions are
    checked by the pipeline test, not here)."""
    import grain
    import jax.numpy as jnp

    from sgt_jax.data import packing

    def stage(packed):
        cfg = _config_module("base_shapes").get_config("smoke")
        cfg.data.tokenizer_dir = tok_dir
        cfg.data.mixture = {"understanding": 2.0, "t2i": 1.0, "proxy_segmentation": 1.0}
        cfg.model.umm.mot = mot
        cfg.data.packing, cfg.data.packing_max_segments = packed, 3
        return InMemoryUMMStage(prepare(cfg, num_devices=1))

    plain, packed = stage(False), stage(True)
    examples = [{k: v[i] for k, v in _fixed_batch(plain).items()} for i in range(plain.cfg.train.batch_size)]
    unpacked = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    rows = list(packing.pack(grain.MapDataset.source(examples).to_iter_dataset(), plain.layout.max_seq_len,
                             num_bins=len(examples), slot_keys=packing.SLOT_KEYS, max_segments=3))
    batch = {k: np.stack([r[k] for r in rows]) for k in packed.dummy_batch(1)}
    assert len(rows) < len(examples) and int((batch["task"] >= 0).sum()) == len(examples)

    params, _ = plain.init(jax.random.key(0), plain.dummy_batch(1))
    loss_u, m_u = jax.jit(plain.losses)(params, {k: jnp.asarray(v) for k, v in unpacked.items()})
    loss_p, m_p = jax.jit(packed.losses)(params, {k: jnp.asarray(v) for k, v in batch.items()})
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=2e-5)
    for key in ("text_ce", "gen_ce", "text_acc", "gen_acc"):
        np.testing.assert_allclose(float(m_p[key]), float(m_u[key]), rtol=2e-5, atol=1e-6, err_msg=key)
    for task in ("understanding", "t2i", "segmentation"):
        u, p = m_u[f"loss/{task}"], m_p[f"loss/{task}"]
        assert float(u.count) > 0 and float(p.count) == float(u.count), task
        np.testing.assert_allclose(float(p.total), float(u.total), rtol=2e-5, err_msg=task)
        np.testing.assert_allclose(float(m_p[f"frac/{task}"]), float(m_u[f"frac/{task}"]), err_msg=task)
    assert float(m_p["examples_per_row"]) > 1.0 and float(m_u["examples_per_row"]) == 1.0


def test_packed_pipeline_rows_and_a_training_run(tmp_path, tok_dir):
    """data.packing=True through the stage's grain pipeline: rows match dummy_batch, the iterator
    state restores the same rows, every used slot's span start points just after its <img> / <boi>
    in row coordinates, RoPE positions restart per segment, and the generic loop trains on them
    with one compile."""
    from sgt_jax.data.sequences import SpecialIds

    cfg = _smoke("post_shapes", "proxy=segmentation,smoke", tok_dir, train={"num_examples": 24, "steps": -1})
    cfg.data.packing, cfg.data.packing_max_segments = True, 3
    stage = InMemoryUMMStage(prepare(cfg, num_devices=len(jax.devices())))
    it = stage.make_iterator("train", process_index=0, process_count=1, seed=0)
    batch = next(it)
    # The packed iterator's state restores the same next rows (what a checkpoint resume relies on).
    state = it.get_state()
    ahead = [next(it) for _ in range(2)]
    again = stage.make_iterator("train", process_index=0, process_count=1, seed=0)
    again.set_state(state)
    for a, b in zip(ahead, [next(again) for _ in range(2)], strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    spec = stage.dummy_batch(cfg.train.batch_size)
    assert {k: (v.shape, v.dtype) for k, v in batch.items() if k in spec} == {k: (v.shape, v.dtype)
                                                                              for k, v in spec.items()}
    ids = SpecialIds.from_tokenizer(tokenizer.load_tokenizer(tok_dir))
    seg, pos = batch["segment_ids"], batch["positions"]
    for b in range(seg.shape[0]):
        for k in np.flatnonzero(batch["task"][b] >= 0):
            first = int(np.flatnonzero(seg[b] == k + 1)[0])
            assert pos[b, first] == 0 and batch["tokens"][b, first] == ids.bos
            if batch["vit_start"][b, k] >= 0:
                assert batch["tokens"][b, batch["vit_start"][b, k] - 1] == ids.img
            if batch["gen_start"][b, k] >= 0:
                assert batch["tokens"][b, batch["gen_start"][b, k] - 1] == ids.boi
    assert (batch["task"] >= 0).sum() > seg.shape[0]  # some row holds two examples or more
    res = loop.train(cfg, str(tmp_path / "packed"), stage=stage)
    assert res.step == 3 and res.train_step_compiles == 1
    assert np.isfinite(res.metrics["train/loss/segmentation"]) and res.metrics["train/examples_per_row"] > 1
