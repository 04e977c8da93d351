"""XLA flags for the test processes and the subprocesses tests start (one definition).

The suite is compile-bound (tiny shapes, many programs): LLVM's -O0 about halves XLA:CPU compile
time here, and nothing a test checks depends on CPU code generation. Tests that compile for TPU
(test_aot, the splash probe) clear XLA_FLAGS instead, so the TPU compiler sees its defaults.
"""
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a CPU process; `devices` simulated host devices (None: the backend's default)."""
    flags = [FAST_COMPILE]
    if devices is not None:
        flags.insert(0, f"--xla_force_host_platform_device_count={devices}")
    return " ".join(flags)
