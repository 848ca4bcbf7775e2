"""Two-rank check of the standard errors of Group Influence, launched by ``tests/test_uncertainty.py``.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/dist_uncertainty.py OUT_DIR

Each rank measures ``group_influence`` (streaming and kept-gradient paths) and the adaptive budget on
the tiny fp64 Llama wrapped in DDP and writes ``OUT_DIR/rank<r>.json``; :func:`measure` called in one
process gives the single-process reference. The per-batch contributions live on different ranks
(rank r holds batches k % 2 == r), so only the all-reduced sums can make the two agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tikmix_hf.influence import adaptive_group_influence, group_influence
from tikmix_hf.testing import exact_llama, named_batches, token_batches


def data():
    domains = named_batches(["code", "law", "news"], 5, seed=1)
    domains["news"] = domains["news"][:2]  # one batch per rank
    tasks = named_batches(["arc", "wiki"], 3, seed=2)
    return domains, tasks


def measure(model=None) -> dict:
    torch.set_num_threads(1)
    model = exact_llama(seed=0) if model is None else model
    domains, tasks = data()
    streamed = group_influence(model, domains, tasks, show_progress=False)
    kept = group_influence(model, domains, tasks, keep_domain_gradients=True, show_progress=False)
    noisy = token_batches(7, seed=11)
    adaptive = adaptive_group_influence(model, {"noisy": noisy, "code": domains["code"]}, tasks,
                                        target_rse=1e-9, max_batches=7)
    return {
        "world_size": streamed.world_size,
        "scores": streamed.scores.tolist(),
        "stderr": streamed.stderr.tolist(),
        "split_half": streamed.split_half,
        "probe_batches": streamed.probe_batches,
        "kept_stderr": kept.stderr.tolist(),
        "adaptive_stderr": adaptive.stderr.tolist(),
        "adaptive_batches": {k: v["batches"] for k, v in adaptive.adaptive["domains"].items()},
    }


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = measure(torch.nn.parallel.DistributedDataParallel(exact_llama(seed=0)))
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, sort_keys=True))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
