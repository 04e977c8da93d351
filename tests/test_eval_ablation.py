"""configs/ablation_shapes.py: the sweep is every proxy x 3 seeds of valid post_shapes configs."""
import os

from sgt_jax.checks import prepare
from sgt_jax.config import PROXIES, config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    return config_module(os.path.join(ROOT, "configs", "ablation_shapes.py"))


def test_sweep_covers_every_proxy_and_seed():
    mod = _module()
    points = mod.sweep("runs/base", steps=5, smoke=True)
    assert len(points) == 7 * 3
    assert {(p["proxy"], p["seed"]) for p in points} == {(x, s) for x in PROXIES + ("none",) for s in range(3)}
    for p in points:
        c = prepare(p["config"])
        assert c.seed == p["seed"] and c.data.shuffle_seed == p["seed"]
        assert c.train.steps == 5 and c.init_from.path == "runs/base"
        want = {"understanding"} if p["proxy"] == "none" else {"understanding", f"proxy_{p['proxy']}"}
        assert set(c.data.mixture.keys()) == want
    # one point by hand, as tools/train.py would load it
    c = mod.get_config("proxy=depth,seed=2,smoke")
    assert c.seed == 2 and "proxy_depth" in c.data.mixture
    plan = mod.run_sweep("runs/base", "runs/ablation", seeds=1, proxies=("edge",), dry_run=True)
    assert "configs/ablation_shapes.py:proxy=edge,seed=0,base=runs/base --workdir=runs/ablation/edge_s0" in plan
