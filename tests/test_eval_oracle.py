"""Generation scoring wired end to end with an oracle in place of the model: perfect images must
score 1.0 (and shuffled ones must not), across batch boundaries and padded last batches."""
import numpy as np

from sgt_jax.data import render, text
from sgt_jax.data import shapes_world as sw
from sgt_jax.eval import geneval_eval
from sgt_jax.infer.sampler import SamplingConfig

WORLD = sw.WorldConfig(image_size=64, max_objects=3)  # the detector is exact at 64 px (not at 32)


class OracleRun:
    """Answers every generation request with the ground truth (optionally rolled by one row)."""

    def __init__(self, shift: int = 0):
        self.shift = shift

    def t2i_prefixes(self, prompts):
        images = [text.scene_for_prompt(spec, 0, WORLD)["image"] for spec in self._specs(prompts)]
        return np.stack(images), None

    def _specs(self, prompts):
        return [self.by_prompt[p] for p in prompts]

    def proxy_prefixes(self, images, instructions):
        assert all(isinstance(t, str) and t for t in instructions)
        return np.stack([render.instance_to_rgb(self.masks[im.tobytes()]) for im in images]), None

    def sample_images(self, cond, uncond, sampling, rng):
        return np.roll(cond, self.shift, axis=0)

    # a lossless tokenizer: "codes" are the images themselves, so the VQ ceiling is 1.0
    def encode_images(self, images):
        return np.asarray(images)

    def decode_codes(self, codes):
        return np.asarray(codes)


def test_geneval_scores_true_images_perfectly():
    specs = text.geneval_prompts(2, seed=0, cfg=WORLD, split="test")
    for shift, want in ((0, 1.0), (1, None)):
        run = OracleRun(shift)
        run.by_prompt = {s["prompt"]: s for s in specs}
        res = geneval_eval.evaluate_geneval(run, WORLD, "test", prompts_per_tag=2, sampling=SamplingConfig(),
                                            batch_size=5)
        if want is not None:
            assert res["overall"] == 1.0 and res["strict"]["overall"] == 1.0, res["failures"]
            assert res["mean_detections"] == res["mean_prompted_objects"]
        else:
            assert res["overall"] < 1.0  # images of other prompts fail


def test_segmentation_of_true_masks_is_perfect():
    scenes = [sw.generate_scene(i, WORLD, "test") for i in range(5)]
    for shift in (0, 1):
        run = OracleRun(shift)
        run.masks = {np.asarray(s["image"], np.uint8).tobytes(): s["instance"] for s in scenes}
        res = geneval_eval.evaluate_segmentation(run, WORLD, "test", num_images=5, sampling=SamplingConfig(),
                                                 batch_size=2)
        assert res["num_images"] == 5 and res["vq_ceiling_miou"] == 1.0 and len(res["per_image_miou"]) == 5
        assert res["miou_ci"][0] <= res["miou"] <= res["miou_ci"][1]
        if shift == 0:
            assert res["miou"] == 1.0 and res["pixel_accuracy"] == 1.0
        else:
            assert res["miou"] < 0.8
