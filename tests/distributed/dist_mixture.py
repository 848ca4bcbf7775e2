"""Run under ``torchrun --nproc_per_node 2``: every rank reads the mixture through accelerate.

For each (dispatch_batches, num_workers) the script prepares a DataLoader over a DomainMixture,
reads a few batches, schedules new weights at an index computed from the consumed count (the same
on every rank, as the callback does), reads more, and writes what this rank received to JSON.
"""

import json
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers.launch import exit_rank  # noqa: E402

from tikmix_hf import DomainMixture

BATCH = 4


def sources():
    return {
        "a": [{"domain": 0, "idx": i} for i in range(37)],
        "b": [{"domain": 1, "idx": i} for i in range(53)],
        "c": [{"domain": 2, "idx": i} for i in range(11)],
    }


def collate(examples):
    return {
        "domain": torch.tensor([e["domain"] for e in examples]),
        "idx": torch.tensor([e["idx"] for e in examples]),
    }


def run(dispatch: bool, workers: int) -> dict:
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(dispatch_batches=dispatch))
    mixture = DomainMixture(sources(), weights="uniform", seed=11)
    per_batch = BATCH if dispatch else BATCH * acc.num_processes
    # Without dispatch each rank keeps its slice of every batch and reads only the rows of that slice.
    slices = {} if dispatch else {"ranks": acc.num_processes, "rank": acc.process_index}
    mixture.bind_loader(per_batch, num_workers=workers, prefetch_factor=2 if workers else None, **slices)
    loader = torch.utils.data.DataLoader(
        mixture, batch_size=BATCH, num_workers=workers, collate_fn=collate, persistent_workers=workers > 0
    )
    loader = acc.prepare(loader)
    got, at = [], None
    for step, batch in enumerate(loader):
        got.append([batch["domain"].tolist(), batch["idx"].tolist()])
        if step == 4:
            consumed = (step + 1) * BATCH * acc.num_processes
            at = mixture.set_weights({"a": 0.0, "b": 0.2, "c": 0.8}, at=consumed + mixture.lag_samples())
        if step == 14:
            break
    return {"rank": acc.process_index, "world": acc.num_processes, "at": at, "batches": got,
            "swaps": mixture.swaps}


if __name__ == "__main__":
    out = {}
    for dispatch in (True, False):
        for workers in (0, 2):
            out[f"dispatch={dispatch},workers={workers}"] = run(dispatch, workers)
    rank = out["dispatch=True,workers=0"]["rank"]
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as fh:
        json.dump(out, fh)
    exit_rank()
