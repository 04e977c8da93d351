"""Build the one device mesh ("data", "fsdp", "tensor") every stage trains on.

Axis types are Auto (jax.make_mesh would default to Explicit), so GSPMD propagates shardings from
the logical-axis annotations instead of requiring explicit types on every op.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from sgt_jax.config import MESH_AXES, resolve_mesh_shape


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all) with axes MESH_AXES; `shape` may hold one -1.

    Multi-slice TPU jobs (devices with several `slice_index` values) put the data axis across
    slices (DCN) and fsdp/tensor inside a slice (ICI); otherwise mesh_utils picks a
    topology-aware device order.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1 and shape[0] % len(slices) == 0:
        n = len(slices)
        ici = (shape[0] // n,) + tuple(shape[1:])
        dcn = (n,) + (1,) * (len(shape) - 1)
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        try:
            arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    return make_mesh(cfg.mesh.shape, devices)
