"""Launch a script of ``tests/distributed/`` on two CPU ranks with torchrun (gloo), retrying once on a port clash."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "distributed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``tests/distributed/<script>`` under ``torchrun --nproc_per_node nproc``.

    Raises with its stderr on failure."""
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), os.path.join(SCRIPTS, script), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return proc
        clash = "address already in use" in proc.stderr.lower() or "EADDRINUSE" in proc.stderr
        if not clash or attempt:
            raise AssertionError(f"torchrun {script} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    raise AssertionError("unreachable")


def exit_rank() -> None:
    """End a finished rank of a script above: wait for every rank, flush, and leave without teardown.

    After its output is written, a rank whose gloo group (or its destruction) is left to the
    interpreter's own teardown can still abort ("terminate called without an active exception",
    SIGABRT), and torchrun then reports a failed run; destroying the group first made that rare, not
    impossible. ``os._exit`` skips that teardown. The barrier keeps a rank from leaving while another
    is still in a collective.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def load_script(name: str):
    """Import ``tests/distributed/<name>.py`` as a module (to run its measurement in one process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def two_nodes(script: str, *args: str, timeout: int = 600) -> list[subprocess.Popen]:
    """Start ``tests/distributed/<script>`` as two torchrun "nodes" of one rank each (``--nnodes 2``).

    Each agent watches only its own rank, as on two machines: when one rank dies, the other is left to
    find out by itself (a single-node torchrun would kill it at once). Returns both agents, node 0 first,
    running; the caller waits for them.
    """
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
             "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
             os.path.join(SCRIPTS, script), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
