"""HF parity for the ViT: a random tiny SigLIP vision tower built with transformers + torch (CPU), saved,
imported with `convert_vit`, hidden states and the post-norm output compared in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax.convert import hf_siglip
from sgt_jax.models.vit import ViT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8, layer_norm_eps=1e-6)


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name and name.endswith("weight")
                    else 0.2 * torch.randn_like(p))
    return model.eval()


def _images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)


def _run(cfg, params, images):
    return jax.jit(lambda p, x: ViT(cfg).apply({"params": p}, x, return_hidden=True))(params, jnp.asarray(images))


def test_vision_model_matches_hf(tmp_path):
    model = _randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)))
    model.save_pretrained(tmp_path, safe_serialization=True)
    images = _images()
    with torch.no_grad():
        ref = model(pixel_values=torch.tensor(images).permute(0, 3, 1, 2), output_hidden_states=True)
    params, cfg = hf_siglip.convert_vit(tmp_path)
    assert cfg.num_tokens == 16 and cfg.num_blocks == 3
    out = _run(cfg, params, images)
    want = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(out["tokens"]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for i, h in enumerate(ref.hidden_states):
        h = h.numpy()
        np.testing.assert_allclose(np.asarray(out["hidden"][i]), h, rtol=1e-4, atol=1e-4 * np.abs(h).max())

    # LLaVA-style penultimate layer without the final norm: the last block is not even imported.
    params2, cfg2 = hf_siglip.convert_vit(tmp_path, select_layer=-2, post_norm=False)
    assert cfg2.num_blocks == 2 and params2["blocks"]["fc1"]["kernel"].shape[0] == 2 and "post_norm" not in params2
    want2 = ref.hidden_states[-2].numpy()
    np.testing.assert_allclose(np.asarray(_run(cfg2, params2, images)["tokens"]), want2, rtol=1e-4,
                               atol=1e-4 * np.abs(want2).max())


def test_full_siglip_model_dir(tmp_path):
    """A two-tower SiglipModel checkpoint: the vision tower is found under `vision_model.`."""
    cfg = transformers.SiglipConfig(
        vision_config=VISION,
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16))
    model = _randomize(transformers.SiglipModel(cfg))
    model.save_pretrained(tmp_path, safe_serialization=True)
    images = _images()
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.tensor(images).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    params, vcfg = hf_siglip.convert_vit(tmp_path)
    np.testing.assert_allclose(np.asarray(_run(vcfg, params, images)["tokens"]), ref, rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())
