"""Group Influence of data domains on validation tasks (paper Eq. 8), trainer-agnostic.

For domain ``j`` and validation task ``i``, at the current parameters ``theta``::

    S_ij = grad f_i(theta)^T  P^{-1}  g_j,      g_j = mean over probe tokens of domain j of grad loss

with ``f_i`` the mean token cross-entropy of task ``i`` and ``P^{-1}`` a diagonal stand-in for
``(H + lambda I)^{-1}`` (:mod:`.preconditioners`). ``S_ij > 0`` means that up-weighting domain ``j``
lowers the loss of task ``i`` (the paper's ``I_f`` has the opposite sign; TiKMiX maximises the
helpful direction, so that is the one stored).

The computation streams (``docs/influence.md`` has the full account):

1. the ``n`` validation gradients are accumulated once and preconditioned, ``p_i = P^{-1} grad f_i``;
2. every probe micro-batch ``b`` of domain ``j`` is differentiated once and ``<p_i, grad loss_b>``
   is added into the ``n x m`` table.

Memory is ``n + 1`` gradient-sized buffers plus the model, whatever the number of domains ``m``.
Nothing here imports ``transformers``: a custom training loop can call these functions directly.

A :class:`TrainingWindow` (:mod:`.window`) measures the same ``S`` without probe tokens, from the
gradients a training run computes anyway, collected in hooks over the steps before a boundary.

The files: the public functions (:mod:`.group`, :mod:`.adaptive`, :mod:`.lookahead`), the
training window (:mod:`.window`) and their result (:mod:`.result`); beside them the argument
checks, the parameter layout, the pass engine, the standard-error statistics, the projection and
the preconditioners, one concept each.
"""

from .adaptive import adaptive_group_influence
from .group import group_influence
from .lookahead import Lookahead, lookahead_gain
from .preconditioners import PRECONDITIONERS, PreconditionerFallbackWarning
from .result import InfluenceResult
from .window import TrainingWindow

__all__ = [
    "PRECONDITIONERS", "InfluenceResult", "Lookahead", "PreconditionerFallbackWarning", "TrainingWindow",
    "adaptive_group_influence", "group_influence", "lookahead_gain",
]
