"""Run N training processes on this machine as one JAX job (CPU, gloo collectives).

    python launch/local_multiprocess.py -n 2 --devices_per_process 4 -- \
        tools/train.py --config=configs/vq_shapes.py:smoke --workdir=runs/vq_mp

Each process gets `--config.train.distributed=True --config.train.coordinator_address=127.0.0.1:PORT
--config.train.num_processes=N --config.train.process_id=i` appended and its own simulated CPU device
count. SIGTERM/SIGINT to this runner is forwarded to every process (each saves and exits). The exit
code is the first non-zero child exit code, else 0.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices_per_process: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def launch(script_and_args: list[str], num_processes: int, devices_per_process: int, port: int = 0,
           python: str = sys.executable, log_dir: str | None = None) -> int:
    port = port or free_port()
    procs = []
    for i in range(num_processes):
        cmd = [python, *script_and_args, "--config.train.distributed=True",
               f"--config.train.coordinator_address=127.0.0.1:{port}",
               f"--config.train.num_processes={num_processes}", f"--config.train.process_id={i}"]
        out = open(os.path.join(log_dir, f"process_{i}.log"), "w") if log_dir else None
        procs.append((subprocess.Popen(cmd, env=child_env(devices_per_process), stdout=out,
                                       stderr=subprocess.STDOUT if out else None), out))

    def forward(signum, frame):
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p, _ in procs]
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for _, out in procs:
            if out:
                out.close()
    return next((c for c in codes if c), 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--num_processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=1)
    ap.add_argument("--port", type=int, default=0, help="coordinator port (0 = pick a free one)")
    ap.add_argument("--log_dir", default=None, help="write each process's output to LOG_DIR/process_i.log")
    ap.add_argument("script_and_args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    rest = a.script_and_args[1:] if a.script_and_args[:1] == ["--"] else a.script_and_args
    if not rest:
        ap.error("give the training script and its arguments after --")
    if a.log_dir:
        os.makedirs(a.log_dir, exist_ok=True)
    return launch(rest, a.num_processes, a.devices_per_process, a.port, log_dir=a.log_dir)


if __name__ == "__main__":
    sys.exit(main())
