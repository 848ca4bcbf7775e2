"""Train the toy set-up for a few steps in a given layout, or resume a checkpoint of another layout.

    python layout_run.py JOB [JOB ...]     (one process, or under torchrun --nproc_per_node 2)

A JOB is ``OUT,KIND,SOURCE,BATCH,ACCUM,WORKERS[,RESUME]``: KIND ``map`` (lists) or ``stream`` (a
``datasets.IterableDataset`` of 4 shards per domain, read by shard), SOURCE ``probes`` or ``training`` (the
training window), the per-device batch, the gradient accumulation steps, ``dataloader_num_workers`` and
optionally a checkpoint folder of another run to resume from (it is copied into OUT first, where the
callback looks for its window files; ``FOLDER!NAME`` leaves the file NAME out of the copy). Every run
checkpoints at step ``SAVE`` (inside the window of the stage at ``STAGE``) and stops at ``STEPS``. Each rank
writes the sample ids it trained on, in stream order over its micro-batches, to ``OUT/seen-rank<r>.json``,
and an error that stopped the run to ``OUT/error-rank<r>.txt``.
"""

import json
import os
import shutil
import sys

import datasets
import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers.launch import exit_rank  # noqa: E402

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig  # noqa: E402
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation  # noqa: E402

STEPS, SAVE, STAGE, WINDOW = 9, 6, 8, 4
GLOBAL_BATCH = 8


def domains(kind: str) -> dict:
    toy = toy_domains(64)
    if kind == "map":
        return toy
    return {name: datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=4) for name, rows in toy.items()}


class Collator(RecordingCollator):
    """Collates the toy examples with each one's id as a number, which the DataLoader workers send along."""

    def __call__(self, examples):
        return {**super().__call__(examples), "sample": torch.tensor([_number(e["sid"]) for e in examples])}


def _number(sid: str) -> int:
    domain, row = sid.split(":")
    return ["pattern", "echo", "noise"].index(domain) * 1000 + int(row)


class Recording(Trainer):
    """Keeps the ids of the samples of every training micro-batch, in the order they are trained on."""

    seen: list[str]

    def compute_loss(self, model, inputs, *args, **kwargs):
        numbers = inputs.pop("sample").tolist()
        if model.training:
            self.seen.extend(f"{['pattern', 'echo', 'noise'][n // 1000]}:{n % 1000}" for n in numbers)
        return super().compute_loss(model, inputs, *args, **kwargs)


def job(out: str, kind: str, source: str, batch: int, accum: int, workers: int, resume: str | None = None) -> None:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    resume, _, left_out = (resume or "").partition("!")
    if resume and rank == 0:
        shutil.copytree(resume, os.path.join(out, os.path.basename(resume)), dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if n == left_out])
    args = TrainingArguments(
        output_dir=out, max_steps=STEPS, per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        dataloader_num_workers=workers, learning_rate=3e-3, use_cpu=True, report_to="none", save_strategy="steps",
        save_steps=SAVE, logging_steps=1000, disable_tqdm=True, seed=0, remove_unused_columns=False,
        lr_scheduler_type="constant", ignore_data_skip=True, **({"ddp_backend": "gloo"} if world > 1 else {}),
    )
    args.device  # noqa: B018 - the process group exists from here on
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # the checkpoint is copied before any rank resumes from it
    mixture = DomainMixture(domains(kind), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3,
                            sizes={"pattern": 64, "echo": 64, "noise": 64})
    probes = RecordingCollator()
    probes.recording = False
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0,
                          tikmix_stage_steps=STAGE, tikmix_window_steps=WINDOW, tikmix_probe_sequences=8,
                          tikmix_probe_batch_size=4, tikmix_influence_source=source, tikmix_show_progress=False)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probes)
    trainer = Recording(model=toy_model(0), args=args, train_dataset=mixture, data_collator=Collator(),
                        callbacks=[callback])
    trainer.seen = []
    callback.bind(trainer)
    try:
        trainer.train(resume_from_checkpoint=os.path.join(out, os.path.basename(resume)) if resume else None)
    except (ValueError, RuntimeError) as err:
        with open(os.path.join(out, f"error-rank{rank}.txt"), "w") as fh:
            fh.write(f"{type(err).__name__}: {err}")
        return
    with open(os.path.join(out, f"seen-rank{rank}.json"), "w") as fh:
        json.dump({"seen": trainer.seen, "history": callback.history}, fh)


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        out, kind, source, batch, accum, workers, *resume = spec.split(",")
        job(out, kind, source, int(batch), int(accum), int(workers), *resume)
    exit_rank()
