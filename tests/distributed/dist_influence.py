"""Two-rank check of Group Influence, launched by ``tests/test_influence.py``.

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_influence.py OUT_DIR

Each rank wraps the tiny fp64 Llama in DDP, measures influence (identity, diag_fisher, projected,
kept + look-ahead), checks that DDP still trains afterwards and that FSDP is refused, and writes
``OUT_DIR/rank<r>.json``. :func:`measure` called in one process gives the single-process reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tikmix_hf.influence import group_influence, lookahead_gain
from tikmix_hf.testing import exact_llama, named_batches, token_batches

MIXTURES = np.array([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])


def data():
    domains = named_batches(["code", "law", "news"], 3, seed=1)
    domains["law"] = domains["law"][:1]  # the second rank has no batch of this domain
    domains["news"] = domains["news"][:2]
    tasks = named_batches(["arc", "wiki"], 3, seed=2)
    return domains, tasks


def measure(model=None) -> dict:
    model = exact_llama(seed=0) if model is None else model
    domains, tasks = data()
    identity = group_influence(model, domains, tasks, show_progress=False)
    fisher = group_influence(model, domains, tasks, preconditioner="diag_fisher", show_progress=False)
    projected = group_influence(model, domains, tasks, projection_dim=64, seed=1, show_progress=False)
    kept = group_influence(model, domains, tasks, keep_domain_gradients=True, show_progress=False)
    gains = lookahead_gain(model, kept, tasks, MIXTURES, step_size=0.5, show_progress=False)
    return {
        "world_size": identity.world_size,
        "identity": identity.scores.tolist(),
        "diag_fisher": fisher.scores.tolist(),
        "fisher_damping": fisher.damping,
        "projected": projected.scores.tolist(),
        "kept": kept.scores.tolist(),
        "lookahead": gains.tolist(),
        "task_losses": identity.task_losses,
        "domain_losses": identity.domain_losses,
        "domain_tokens": identity.domain_tokens,
    }


def fsdp_refusal() -> str:
    """What group_influence says to FSDP1 with flat parameters; failing to build the model fails the run."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(exact_llama(seed=0), device_id=torch.device("cpu"))
    domains, tasks = data()
    try:
        group_influence(wrapped, domains, tasks, show_progress=False)
    except ValueError as error:
        return str(error)
    return "not refused"


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = exact_llama(seed=0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    result = measure(ddp)

    # DDP must still synchronise gradients after the influence pass: different batches per rank,
    # identical averaged gradients.
    ddp(**token_batches(1, seed=10 + rank)[0]).loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, grads)
    result["ddp_step_ok"] = all(torch.equal(gathered[0], g) for g in gathered)
    result["fsdp"] = fsdp_refusal()

    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, sort_keys=True))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
