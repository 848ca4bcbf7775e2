"""``tikmix train`` under ``torchrun --nproc_per_node 2``: ``python dist_train_cli.py <train flags>``."""

import sys

from tikmix_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
