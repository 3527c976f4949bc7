"""Transferability scores that need no training: how well features a pool entry already
computes suit a new task, read from one pass over the new task's training texts.

- LEEP (Nguyen et al., 2020): the log-likelihood of the new labels under the "expected
  empirical predictor" built from the source classifier's label distribution. Here the source
  classifier is the heads of the tasks that already use the entry; their softmaxes are joined
  into one distribution over all their labels (each head weighs equally).
- TransRate (Huang et al., 2022): the coding rate of the features minus their coding rate
  given the new labels: how much of the features' spread the labels explain. It reads only
  the features, so it can also score the plain backbone (an entry of all ones), which is the
  reference a pool compares its entries against (methods/pool.py).
"""

from __future__ import annotations

import torch

from ..model.batching import length_batches

# Distortion of TransRate's coding rate. Features are unit rows (see `transrate`), so their
# covariance has trace <= 1 and d / EPSILON2 * cov has eigenvalues ~1 / EPSILON2 on average.
EPSILON2 = 0.01


@torch.inference_mode()
def pooled_features(model, states, key: str | None) -> torch.Tensor:
    """(N, H) float32 pooled top-layer output of every text of `states` under adapter entry
    `key` (None: the plain backbone, i.e. an entry of all ones)."""
    out = torch.empty(len(states), model.hidden_size)
    for rows in length_batches(states.lengths, max_tokens=model.pass_tokens):
        out[rows] = model.top_pooled(states.batch(rows), [key] * len(rows), torch.float32).float().cpu()
    return out


def _coding_rate(z: torch.Tensor, d: int) -> torch.Tensor:
    """1/2 logdet(I + d / (n eps^2) Z^T Z) for rows z (n, d), via the smaller Gram matrix."""
    n = z.shape[0]
    scale = d / (n * EPSILON2)
    gram = z @ z.T if n < z.shape[1] else z.T @ z  # (min(n, d), min(n, d))
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return 0.5 * torch.logdet(eye + scale * gram)


def transrate(features: torch.Tensor, labels: torch.Tensor) -> float:
    """TransRate of features (N, H) for integer labels (N,): R(Z) - sum_c n_c/n R(Z_c), in nats.

    Rows are scaled to unit length first, so that an entry that only rescales the features
    does not score higher; then centred on their mean. >= 0: the coding rate is concave."""
    z = torch.nn.functional.normalize(features.double(), dim=1)
    z = z - z.mean(0, keepdim=True)  # (N, H)
    n, d = z.shape
    whole = _coding_rate(z, d)
    given = sum((labels == c).sum() / n * _coding_rate(z[labels == c], d)
                for c in labels.unique().tolist())
    return float(whole - given)


def leep(source_probs: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """LEEP of source label distributions (N, Z) (rows sum to 1) for target labels (N,):
    mean_i log sum_z P(y_i | z) theta_i(z), with P(y | z) estimated from the same rows."""
    theta = source_probs.double()  # (N, Z)
    onehot = torch.nn.functional.one_hot(labels, num_labels).double()  # (N, C)
    joint = onehot.T @ theta / len(labels)  # (C, Z): P(y, z)
    conditional = joint / joint.sum(0, keepdim=True).clamp_min(1e-300)  # (C, Z): P(y | z)
    eep = (theta @ conditional.T)[torch.arange(len(labels)), labels]  # (N,)
    return float(eep.clamp_min(1e-300).log().mean())


def label_entropy(labels: torch.Tensor, num_labels: int) -> float:
    """Entropy (nats) of the label frequencies: -LEEP of a source that knows nothing, so
    LEEP + this is the gain an entry's heads bring."""
    p = torch.bincount(labels, minlength=num_labels).double() / len(labels)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def heads_probs(model, tasks: list[str], features: torch.Tensor) -> torch.Tensor:
    """(N, sum of C_t) the softmaxes of `tasks`' heads on features (N, H), joined and divided by
    the number of heads: one distribution over all their labels."""
    with torch.inference_mode():
        parts = [torch.softmax(model.heads(features.to(model.device), t).float().cpu(), -1)
                 for t in tasks]  # each (N, C_t)
    return torch.cat(parts, dim=1) / len(parts)


def label_source(heads, labels: tuple[str, ...], exclude: str) -> tuple[str | None, list[str]]:
    """The learned task whose head knows the most of `labels` by name (at least half of
    them; ties: the earliest learned), and the labels it shares; (None, []) when none does."""
    best, shared = None, []
    for task, known in heads.labels.items():
        if task == exclude:
            continue
        common = [label for label in labels if label in known]
        if len(common) > len(shared):
            best, shared = task, common
    if 2 * len(shared) < len(labels):
        return None, []
    return best, shared


@torch.no_grad()
def start_head_from(heads, task: str, source: str, shared: list[str]) -> None:
    """The head of `task`: its rows (weights and bias) for the `shared` labels copied from the
    head of `source`, the task that already learned those labels; its other rows as they were."""
    new, old = heads.heads[task], heads.heads[source]
    new_index = {label: i for i, label in enumerate(heads.labels[task])}
    old_index = {label: i for i, label in enumerate(heads.labels[source])}
    rows = torch.tensor([new_index[label] for label in shared])
    source_rows = torch.tensor([old_index[label] for label in shared])
    new.weight[rows] = old.weight[source_rows].to(new.weight)
    new.bias[rows] = old.bias[source_rows].to(new.bias)
