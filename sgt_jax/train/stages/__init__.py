"""Concrete training stages; each module registers itself with `sgt_jax.train.stage.register_stage`."""
