"""The default swap index, ``set_weights(at=None)``, with DataLoader workers on a busy machine:
many swaps in a loop, and no sample after a returned index drawn with the old weights."""

import subprocess
import sys

import pytest
from torch.utils.data import DataLoader

from tikmix_hf import DomainMixture


def collate(batch):
    return [e["d"] for e in batch]


@pytest.fixture
def busy_machine():
    """Two processes spinning on the CPU for the length of the test: workers get preempted mid-batch."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield
    for p in burners:
        p.kill()
        p.wait()


@pytest.mark.parametrize("workers", [2, 4])
def test_default_swap_index_is_never_passed_by_a_late_sample(workers, busy_machine):
    names = ["a", "b", "c"]
    mixture = DomainMixture({d: [{"d": d, "i": i} for i in range(50)] for d in names},
                            weights={"a": 1.0, "b": 0.0, "c": 0.0}, seed=1)
    batch = 4
    mixture.bind_loader(batch, num_workers=workers, prefetch_factor=2)
    loader = DataLoader(mixture, batch_size=batch, num_workers=workers, collate_fn=collate,
                        prefetch_factor=2, persistent_workers=True)
    it = iter(loader)
    got = []
    for swap in range(60):
        got += next(it)
        target = names[(swap + 1) % 3]
        mixture.set_weights({d: float(d == target) for d in names})  # at=None: the earliest safe index
    for _ in range(3 * workers):
        got += next(it)
    late = [(k, d) for k, d in enumerate(got) if mixture.weights_at(k)[d] != 1.0]
    assert not late, f"{len(late)} samples drawn with the old weights after their swap index, e.g. {late[:3]}"
    # swaps announced before the workers moved on replace each other; many still took effect
    assert len(mixture.swaps) >= 10
