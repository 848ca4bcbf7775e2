"""One TiKMiX run, single process or under ``torchrun --nproc_per_node 2``.

    python dist_callback.py OUT PER_DEVICE_BATCH {default|off} [probes|training]

``off`` turns accelerate's ``dispatch_batches`` off, so every rank reads the whole mixture and keeps
its slice; ``training`` measures with the training window instead of probes. The model is float64
so that one and two ranks agree to reduction-order rounding.
"""

import json
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers.launch import exit_rank  # noqa: E402

from tikmix_hf import DomainMixture, TiKMiXCallback, TiKMiXConfig  # noqa: E402
from tikmix_hf.testing import RecordingCollator, toy_domains, toy_model, toy_validation  # noqa: E402


def main(out: str, per_device: int, dispatch: str, source: str = "probes") -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    extra = {"ddp_backend": "gloo"} if world > 1 else {}
    if dispatch == "off":
        extra["accelerator_config"] = {"dispatch_batches": False}
    args = TrainingArguments(
        output_dir=out, max_steps=22, per_device_train_batch_size=per_device, learning_rate=3e-3, use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=100, disable_tqdm=True, seed=0,
        remove_unused_columns=False, lr_scheduler_type="constant", **extra,
    )
    mixture = DomainMixture(toy_domains(), weights={"pattern": 0.2, "echo": 0.2, "noise": 0.6}, seed=3)
    probe_collator = RecordingCollator()
    probe_collator.recording = False
    # One probe micro-batch size whatever the ranks: the standard errors (and so the trust radius) are
    # measured over micro-batches, and one rank of 8 or two of 4 then see the same batches.
    config = TiKMiXConfig(tikmix_initial_weights="keep", tikmix_window_sequences=0,
                          tikmix_stage_steps=10, tikmix_show_progress=False, tikmix_probe_batch_size=4,
                          tikmix_influence_source=source, tikmix_window_steps=4)
    callback = TiKMiXCallback(mixture, toy_validation(), config, collator=probe_collator)
    collator = RecordingCollator()
    trainer = Trainer(model=toy_model(0, torch.float64), args=args, train_dataset=mixture, data_collator=collator,
                      callbacks=[callback])
    callback.bind(trainer)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"seen-rank{rank}.json"), "w") as fh:
        json.dump({"seen": collator.seen, "swaps": mixture.swaps}, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
    exit_rank()
