"""HF parity for the decoder: random tiny Qwen2 / Llama / Qwen3 built with transformers + torch (CPU),
saved to disk, imported with `convert_llm`, logits and hidden states compared in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.convert import hf_qwen2
from sgt_jax.models.llm import CausalLM

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
VARIANTS = {
    "qwen2_untied": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=5000.0, tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=10000.0, tie_word_embeddings=True)),
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500.0, attention_bias=True,
                                                           tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
}


def build(tmp_path, variant: str, dtype=None):
    cfg_cls, model_cls, extra = VARIANTS[variant]
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # HF init is tiny (std 0.02, unit norms): use larger weights so errors show
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 96, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, 8:] = 0  # right padding
    return tokens, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_hidden_match_hf(tmp_path, variant):
    hf_model = build(tmp_path, variant)
    params, cfg = hf_qwen2.convert_llm(tmp_path)
    assert cfg.tied_embeddings == hf_model.config.tie_word_embeddings
    assert ("lm_head" in params) == (not cfg.tied_embeddings)
    assert cfg.qk_norm == (variant == "qwen3") and cfg.attn_bias == (variant in ("qwen2_untied", "qwen2_tied",
                                                                                   "llama_bias"))
    tokens, mask = _inputs()
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), output_hidden_states=True)
    logits, hidden = jax.jit(lambda p, t, m: CausalLM(cfg).apply({"params": {"llm": p}}, t, m, return_hidden=True))(
        params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32))
    real = mask.astype(bool)
    want = ref.logits.numpy()
    scale = np.abs(want[real]).max()
    np.testing.assert_allclose(np.asarray(logits)[real], want[real], rtol=1e-4, atol=1e-4 * scale)
    for i in range(cfg.depth):  # HF's last hidden state is after the final norm; ours is the stream
        h_ref = ref.hidden_states[i].numpy()[real]
        np.testing.assert_allclose(np.asarray(hidden[i])[real], h_ref, rtol=1e-4, atol=1e-4 * np.abs(h_ref).max())


def test_sharded_import_and_mot_copies(tmp_path):
    build(tmp_path, "qwen2_untied")
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
             ("kv", None), ("vocab", "tensor"))
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    params, cfg = hf_qwen2.convert_llm(tmp_path, mesh=mesh, rules=rules, mot=True)
    q = params["layers"]["attn"]["q"]["kernel"]  # stacked [depth, D, H, hd] for the scanned layers
    assert q.shape[0] == cfg.depth and q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert params["lm_head"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    plain, _ = hf_qwen2.convert_llm(tmp_path)
    np.testing.assert_array_equal(np.asarray(params["layers"]["mlp_gen"]["down"]["kernel"][1]),
                                  np.asarray(plain["layers"]["mlp"]["down"]["kernel"][1]))
    np.testing.assert_array_equal(np.asarray(params["layers"]["attn"]["k_gen"]["bias"][0]),
                                  np.asarray(plain["layers"]["attn"]["k"]["bias"][0]))
    np.testing.assert_array_equal(np.asarray(params["final_norm_gen"]["scale"]), np.asarray(plain["final_norm"]["scale"]))
    assert cfg.mot and hf_qwen2.umm_overrides(cfg)["rope_theta"] == 5000.0


def test_bfloat16_checkpoint_is_read(tmp_path):
    model = build(tmp_path, "qwen2_tied", dtype=torch.bfloat16)
    params, _ = hf_qwen2.convert_llm(tmp_path)
    want = model.model.layers[1].mlp.up_proj.weight.detach().float().numpy().T
    got = np.asarray(params["layers"]["mlp"]["up"]["kernel"][1])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match="rope_type"):
        hf_qwen2.llm_config_from_hf({"model_type": "llama", "rope_parameters": {"rope_type": "llama3"},
                                     "num_attention_heads": 4, "hidden_size": 32})
    with pytest.raises(ValueError, match="model_type"):
        hf_qwen2.llm_config_from_hf({"model_type": "gpt2"})


def test_tool_writes_a_checkpoint_init_from_loads(tmp_path):
    """tools/convert_checkpoint.py -> <out>/checkpoints/0 -> train.checkpoint.load_params fills umm/llm, umm/vit."""
    import flax.linen as nn

    from sgt_jax import checks
    from sgt_jax import config as config_lib
    from sgt_jax.convert import hf_siglip
    from sgt_jax.models import umm as umm_lib
    from sgt_jax.train import checkpoint as ckpt_lib

    build(tmp_path / "llm", "qwen2_tied")
    vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
        patch_size=8))
    vision.save_pretrained(tmp_path / "vit", safe_serialization=True)
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_checkpoint", "tools/convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--llm", str(tmp_path / "llm"), "--vit", str(tmp_path / "vit"),
                      "--out", str(tmp_path / "out")]) == 0

    meta = ckpt_lib.read_metadata(str(tmp_path / "out"))
    cfg = config_lib.set_fields(config_lib.default_config(), meta["overrides"])
    cfg.stage = "umm"
    checks.prepare(cfg)
    mcfg = umm_lib.UMMConfig.from_config(cfg)
    assert mcfg.llm.width == 32 and mcfg.llm.tied_embeddings and mcfg.vit.width == 16
    abstract = jax.eval_shape(umm_lib.UMM(mcfg).init, jax.random.key(0), umm_lib.dummy_inputs(mcfg, 1, 80))
    target = {"umm": jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                            nn.meta.unbox(abstract["params"]))}
    loaded, paths = ckpt_lib.load_params(str(tmp_path / "out"), target)
    assert any(p.startswith("umm/llm/") for p in paths) and any(p.startswith("umm/vit/") for p in paths)
    assert not any(p.startswith("umm/gen_head") for p in paths)
    want_llm, _ = hf_qwen2.convert_llm(tmp_path / "llm")
    want_vit, _ = hf_siglip.convert_vit(tmp_path / "vit")
    np.testing.assert_array_equal(np.asarray(loaded["umm"]["llm"]["layers"]["attn"]["q"]["kernel"][1]),
                                  np.asarray(want_llm["layers"]["attn"]["q"]["kernel"][1]))
    np.testing.assert_array_equal(np.asarray(loaded["umm"]["vit"]["pos_embed"]), np.asarray(want_vit["pos_embed"]))
    assert not np.asarray(loaded["umm"]["gen_head"]["fc2"]["kernel"]).any()  # untouched by the import
