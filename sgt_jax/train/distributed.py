"""Multi-process start-up: `jax.distributed.initialize` when the config or environment asks for it.

Gated because it raises on a single-host CPU run with nothing to connect to. With an explicit
coordinator address (local multi-process runs) CPU collectives go through gloo; on Cloud TPU / SLURM
/ GKE, a bare `initialize()` discovers everything from the environment.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)
ENV_FLAG = "SGT_DISTRIBUTED"


def wanted(cfg) -> bool:
    return bool(cfg.train.distributed) or os.environ.get(ENV_FLAG, "") == "1"


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def maybe_initialize(cfg) -> bool:
    """Initialize the distributed runtime if requested; returns whether it is (now) initialized.

    Must run before anything touches a backend (device counts, arrays).
    """
    if not wanted(cfg):
        return False
    if is_initialized():
        return True
    # Harmless off CPU; on CPU it is what makes cross-process collectives work.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    t = cfg.train
    if t.coordinator_address:
        jax.distributed.initialize(coordinator_address=t.coordinator_address, num_processes=int(t.num_processes),
                                   process_id=int(t.process_id))
    else:
        jax.distributed.initialize()
    log.info("distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def shutdown() -> None:
    if is_initialized():
        jax.distributed.shutdown()
