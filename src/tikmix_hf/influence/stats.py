"""Standard errors of ``S`` over probe micro-batches, from running sums (``docs/uncertainty.md``)."""

from __future__ import annotations

import math

import numpy as np
import torch

from .._distributed import all_reduce


class BatchStats:
    """Sums over probe micro-batches from which the standard error of ``S`` follows.

    Batch ``b`` of domain ``j`` contributes ``c_ijb = <p_i, grad of b's summed token loss>`` and has
    ``t_b`` labelled tokens; ``S_ij = sum_b c_ijb / T_j`` with ``T_j = sum_b t_b``. Only sums are kept
    (``sum c``, ``sum c^2``, ``sum c t`` per entry; ``sum t``, ``sum t^2``, the batch count, and the even
    half's ``sum c`` and ``sum t``), so that under data parallelism one all-reduce of two small float64
    tensors combines the ranks, whatever batches each rank held.
    """

    def __init__(self, n, m, device):
        self.cell = torch.zeros((4, n, m), dtype=torch.float64, device=device)  # c, c^2, c t, c (even)
        self.dom = torch.zeros((4, m), dtype=torch.float64, device=device)  # t, t^2, batches, t (even)

    def add(self, j, k, tokens, column, total_tokens=1):
        """Record batch ``k`` (global index) of domain ``j``: ``column`` holds ``c_ib / total_tokens``."""
        c = column.double() * total_tokens
        t = float(tokens)
        self.cell[0, :, j] += c
        self.cell[1, :, j] += c * c
        self.cell[2, :, j] += c * t
        self.dom[:3, j] += torch.tensor([t, t * t, 1.0], dtype=torch.float64, device=self.dom.device)
        if k % 2 == 0:
            self.cell[3, :, j] += c
            self.dom[3, j] += t

    def reduce(self, world):
        all_reduce(self.cell, world)
        all_reduce(self.dom, world)

    def merge(self, other):
        """Add another set of sums (e.g. one all-reduced round of the adaptive budget)."""
        self.cell += other.cell
        self.dom += other.dom

    def batches(self, j) -> int:
        return int(round(float(self.dom[2, j])))

    def tokens(self, j) -> int:
        return int(round(float(self.dom[0, j])))

    def column_rse(self, j) -> float:
        """``||SE[:, j]|| / ||S[:, j]||`` (``inf`` with < 2 batches; ``0`` when both are zero)."""
        se, S = self.stderr()[:, j], self.scores()[:, j]
        if not np.isfinite(se).all():
            return float("inf")
        num, den = float(np.linalg.norm(se)), float(np.linalg.norm(S))
        if num == 0:
            return 0.0
        return num / den if den > 0 else float("inf")

    def batch_counts(self, domain_names) -> dict[str, int]:
        return {name: int(round(b)) for name, b in zip(domain_names, self.dom[2].tolist())}

    def scores(self) -> np.ndarray:
        """``S = sum c / T`` from the sums alone (equal to the table up to rounding)."""
        cell, dom = self.cell.cpu().numpy(), self.dom.cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return cell[0] / dom[0][None, :]

    def stderr(self) -> np.ndarray:
        """Ratio-estimator standard error of ``S_ij`` (``nan`` where a domain has fewer than 2 batches).

        ``Var(S_ij) = B/(B-1) * sum_b (c_ijb - S_ij t_b)^2 / T_j^2``, the residual sum expanded in the
        accumulated sums: ``sum c^2 - 2 S sum c t + S^2 sum t^2`` (clipped at 0 against rounding).
        """
        cell, dom = self.cell.cpu().numpy(), self.dom.cpu().numpy()
        T, T2, B = dom[0][None, :], dom[1][None, :], dom[2][None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            S = cell[0] / T
            resid = cell[1] - 2.0 * S * cell[2] + S * S * T2
            # Rounding of the expansion is relative to sum c^2; below that the spread is zero.
            resid = np.where(resid > 1e-13 * cell[1], resid, 0.0)
            var = B / (B - 1.0) * resid / (T * T)
        return np.where(np.broadcast_to(B, var.shape) >= 2, np.sqrt(var), np.nan)

    def split_half(self, task_names) -> dict[str, float]:
        cell, dom = self.cell.cpu().numpy(), self.dom.cpu().numpy()
        t_even, t_odd = dom[3], dom[0] - dom[3]
        with np.errstate(invalid="ignore", divide="ignore"):
            even = cell[3] / t_even[None, :]
            odd = (cell[0] - cell[3]) / t_odd[None, :]
        return {name: spearman(even[i], odd[i]) for i, name in enumerate(task_names)}

    def finish(self, task_names, domain_names):
        stderr = self.stderr()
        split = self.split_half(task_names)
        counts = self.batch_counts(domain_names)
        thin = [name for name, b in counts.items() if b < 2]
        note = None
        if thin:
            note = (
                f"standard error undefined (nan) for domain(s) {thin}: fewer than 2 probe micro-batches "
                f"{ {n: counts[n] for n in thin} }; draw more probe sequences or use a smaller probe batch size"
            )
        return stderr, split, note


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); ``nan`` with < 2 points, a nan, or no spread."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.size < 2 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = rankdata(a) - (a.size + 1) / 2, rankdata(b) - (a.size + 1) / 2
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb / denom) if denom > 0 else float("nan")
