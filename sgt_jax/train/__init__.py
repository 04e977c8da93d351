"""Training core shared by every stage.

stage (protocol + registry) -> mesh/sharding (device mesh, logical-axis shardings) -> optim (optax)
-> state (sharded TrainState creation) -> step (pure jitted train step) -> checkpoint (Orbax) ->
metrics/flops (clu writers, MFU) -> loop (the driver behind tools/train.py); distributed for
multi-process start-up. Nothing here imports TensorFlow at import time.
"""
