"""Two-rank check of Group Influence on sharded models, launched by ``tests/test_influence_fsdp.py``.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed/dist_influence_fsdp.py OUT_DIR

One launch runs every case: the tiny fp64 Llama sharded with FSDP2 (``fully_shard`` per decoder
layer and at the root) and with FSDP1 (``use_orig_params=True``) takes one AdamW step, is measured
with every preconditioner (probe batches split unevenly over the ranks), adaptively, and with kept domain
gradients plus the look-ahead (FSDP1 is refused by ``lookahead_gain``), and a training loop that
measures mid-way is compared with one that does not. Each rank writes ``OUT_DIR/rank<r>.json``;
:func:`measure` with ``kind=None`` in one process is the reference.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from helpers.reference import reference_summed_loss  # noqa: E402

from tikmix_hf.influence import adaptive_group_influence, group_influence, lookahead_gain  # noqa: E402
from tikmix_hf.testing import exact_llama, named_batches, token_batches  # noqa: E402

MIXTURES = np.array([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]])
PRECONDITIONERS = ("identity", "adam", "diag_fisher")


def data():
    # 3, 1 and 2 labelled batches: on two ranks the shares are uneven in every domain but the last.
    domains = named_batches(["code", "law", "news"], 3, seed=1)
    domains["law"] = domains["law"][:1]
    domains["news"] = domains["news"][:2]
    tasks = named_batches(["arc", "wiki"], 3, seed=2)
    return domains, tasks


def train_batches(step):
    """The two batches of a training step; rank ``r`` of a sharded run takes batch ``r``."""
    return token_batches(2, seed=100 + step)


def shard(model, kind):
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"),
                                        auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
    return model


def train_step(model, optimizer, step, kind, rank):
    """One AdamW step on the mean token loss of the step's two batches, whoever computes it."""
    batches = train_batches(step)
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    optimizer.zero_grad(set_to_none=True)
    if kind is None:
        loss = sum(reference_summed_loss(model, b)[0] for b in batches) / total
    else:
        # FSDP averages the two ranks' gradients: scaling by world makes it the gradient of the sum.
        loss = reference_summed_loss(model, batches[rank])[0] * 2 / total
    loss.backward()
    optimizer.step()


def build(kind, rank=0):
    model = shard(exact_llama(seed=0), kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_step(model, optimizer, 0, kind, rank)
    return model, optimizer


def measure(kind=None, rank=0) -> dict:
    model, optimizer = build(kind, rank)
    domains, tasks = data()
    out = {}
    for name in PRECONDITIONERS:
        result = group_influence(model, domains, tasks, preconditioner=name, optimizer=optimizer,
                                 show_progress=False)
        out[name] = result.scores.tolist()
        out[f"{name}_used"] = result.preconditioner
        if name == "identity":
            out["buffer_bytes"] = result.buffer_bytes
            out["num_parameters"] = result.num_parameters
            out["task_losses"] = result.task_losses
            out["domain_losses"] = result.domain_losses
            out["domain_tokens"] = result.domain_tokens
    kept = group_influence(model, domains, tasks, preconditioner="adam", optimizer=optimizer,
                           keep_domain_gradients=True, show_progress=False)
    out["kept_adam"] = kept.scores.tolist()
    try:
        out["lookahead"] = lookahead_gain(model, kept, tasks, MIXTURES, step_size=0.5, show_progress=False).tolist()
    except ValueError as error:
        out["lookahead"] = str(error)
    adaptive = adaptive_group_influence(model, domains, tasks, target_rse=1e-12, max_batches=3, preconditioner="adam",
                                        optimizer=optimizer, show_progress=False)
    out["adaptive"] = adaptive.scores.tolist()
    out["adaptive_tokens"] = adaptive.domain_tokens
    if kind is not None:
        try:
            group_influence(model, domains, tasks, projection_dim=8, show_progress=False)
            out["projection"] = "not refused"
        except ValueError as error:
            out["projection"] = str(error)
    kept_fisher = group_influence(model, domains, tasks, preconditioner="diag_fisher", keep_domain_gradients=True,
                                  show_progress=False)
    out["kept_diag_fisher"] = kept_fisher.scores.tolist()
    return out


def state_of(model, optimizer):
    """Every tensor a training loop carries on: parameter pieces, gradient pieces, optimizer state."""
    from tikmix_hf.influence.sharding import local_piece

    tensors = []
    for p in model.parameters():
        tensors.append(local_piece(p.detach()).clone())
        tensors.append(None if p.grad is None else local_piece(p.grad).clone())
        for value in optimizer.state[p].values():
            tensors.append(local_piece(value).clone() if torch.is_tensor(value) else value)
    return tensors


def same_bits(a, b) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None)
        or (torch.is_tensor(x) and torch.is_tensor(y) and x.dtype == y.dtype and torch.equal(x, y))
        or (not torch.is_tensor(x) and x == y)
        for x, y in zip(a, b)
    )


def continuation(kind, rank) -> dict:
    """Four training steps, with and without measurements in the middle: the same bits at the end.

    The measurement at step 2 comes between the backward and the optimizer step, so gradients the
    loop is about to use are in ``.grad`` while influence is measured.
    """
    domains, tasks = data()
    runs = []
    for measured in (False, True):
        model, optimizer = build(kind, rank)
        model.train()
        unchanged = True
        for step in range(1, 5):
            batches = train_batches(step)
            total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            optimizer.zero_grad(set_to_none=True)
            (reference_summed_loss(model, batches[rank])[0] * 2 / total).backward()
            if measured and step == 2:
                before = state_of(model, optimizer)
                rng = torch.get_rng_state()
                kept = group_influence(model, domains, tasks, preconditioner="adam", optimizer=optimizer,
                                       keep_domain_gradients=True, show_progress=False)
                if kind == "fsdp2":
                    lookahead_gain(model, kept, tasks, MIXTURES, step_size=0.5, show_progress=False)
                group_influence(model, domains, tasks, preconditioner="diag_fisher", show_progress=False)
                unchanged = same_bits(before, state_of(model, optimizer)) and torch.equal(rng, torch.get_rng_state())
                unchanged = unchanged and all(m.training for m in model.modules())
            optimizer.step()
        runs.append(state_of(model, optimizer))
    return {"unchanged": bool(unchanged), "continues_bitwise": same_bits(*runs)}


def main(out_dir: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    report = {}
    for kind in ("fsdp2", "fsdp1"):
        try:
            report[kind] = measure(kind, rank)
            report[f"{kind}_continuation"] = continuation(kind, rank)
        except Exception as error:  # reported, so that the test names the failing case
            report[kind] = {"error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()[-3000:]}
    # Layers sharded but not the root: the embeddings and head stay replicated, which is refused.
    from torch.distributed.fsdp import fully_shard

    partial = exact_llama(seed=0)
    for layer in partial.model.layers:
        fully_shard(layer)
    try:
        group_influence(partial, *data(), show_progress=False)
        report["partial"] = "not refused"
    except ValueError as error:
        report["partial"] = str(error)
    # FSDP1 without sharding replicates every parameter: refused, DDP is the right tool.
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    replicated = FullyShardedDataParallel(exact_llama(seed=0), use_orig_params=True, device_id=torch.device("cpu"),
                                          sharding_strategy=ShardingStrategy.NO_SHARD)
    try:
        group_influence(replicated, *data(), show_progress=False)
        report["no_shard"] = "not refused"
    except ValueError as error:
        report["no_shard"] = str(error)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
