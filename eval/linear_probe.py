"""Linear probe on frozen features of teacher and student (CPU, scikit-learn).

As in the CLIP paper: L2-normalised features, multinomial logistic regression (L-BFGS), the
inverse regularisation strength ``C`` swept over a log grid and chosen by top-1 on a held-out
part of the training split (seeded, stratified where every class allows it), then refitted on
the whole training split and scored on the test split. The sweep runs from strong to weak
regularisation, each fit warm-started from the previous one, and the refit from the chosen
one (the same optimum, reached in far fewer iterations).

Without a labelled training split, ``split_features`` divides the evaluation set's features
into train and test parts (seeded, stratified); the report says so. With one, the two sets'
labels are matched by class name (``train_labels_of``): an evaluation set may hold some of the
train split's classes, in any order, but no class the probe never saw.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# 1e-2 ... 1e4: L2-normalised features have small components, so useful C values are large.
DEFAULT_CS: tuple[float, ...] = tuple(10.0 ** k for k in range(-2, 5))


def _normalised(x: Tensor) -> np.ndarray:
    return F.normalize(x.float(), dim=1).numpy().astype(np.float64)


def _stratify(labels: np.ndarray, test_size: float) -> np.ndarray | None:
    """Stratify by label when each class has at least 2 samples and every class fits in both parts."""
    _, counts = np.unique(labels, return_counts=True)
    n_test = int(np.ceil(test_size * len(labels)))
    if counts.min() < 2 or n_test < len(counts) or len(labels) - n_test < len(counts):
        return None
    return labels


def _split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    if not 0 < fraction < 1:
        raise ValueError(f"a held-out fraction must be in (0, 1), got {fraction}")
    idx = np.arange(len(labels))
    a, b = train_test_split(idx, test_size=fraction, random_state=seed, stratify=_stratify(labels, fraction))
    return np.sort(a), np.sort(b)


def split_features(features: Mapping[str, Tensor], test_fraction: float = 0.5, seed: int = 0):
    """Divide extracted features (with ``labels``) into ``(train, test)`` dicts, seeded and stratified."""
    labels = features["labels"].numpy()
    train_idx, test_idx = _split_indices(labels, test_fraction, seed)
    take = lambda idx: {k: v[torch.from_numpy(idx)] for k, v in features.items()}  # noqa: E731
    return take(train_idx), take(test_idx)


def train_labels_of(test_classnames: Sequence[str], train_classnames: Sequence[str],
                    test_source=None, train_source=None) -> Tensor:
    """``[num_test_classes]``: the train split's label of each evaluation-set class, by name.

    Raises ValueError naming the evaluation-set classes the train split lacks (a probe cannot
    predict them) or the names that appear twice (no label to match them to).
    """
    where = lambda name, src: f"the {name}" + (f" ({src})" if src is not None else "")  # noqa: E731
    for names, what in ((train_classnames, where("train split", train_source)),
                        (test_classnames, where("evaluation set", test_source))):
        twice = sorted({n for n in names if list(names).count(n) > 1})
        if twice:
            raise ValueError(f"{what} names the classes {twice} more than once: its labels cannot be matched by name")
    index = {name: i for i, name in enumerate(train_classnames)}
    unknown = [n for n in test_classnames if n not in index]
    if unknown:
        shown = ", ".join(map(repr, unknown[:10])) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise ValueError(
            f"the linear probe cannot score {where('evaluation set', test_source)}: {len(unknown)} of its classes "
            f"are not classes of {where('train split', train_source)}: {shown} (the train split's classes: "
            f"{', '.join(map(repr, list(train_classnames)[:10]))}{', ...' if len(train_classnames) > 10 else ''}). "
            "Give a train split with these classes (--train-data / eval.train_data), none (the evaluation set is "
            "split in two), or skip the probe (--no-probe)")
    return torch.tensor([index[n] for n in test_classnames], dtype=torch.long)


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int, start=None):
    """Fit at strength ``C``; ``start`` (a fitted classifier) gives the starting point (warm start)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if start is not None and not np.array_equal(start.classes_, np.unique(y)):
        start = None  # a class missing from the held-out split's fit part: start from scratch
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed, warm_start=start is not None)
    if start is not None:
        clf.coef_, clf.intercept_ = start.coef_.copy(), start.intercept_.copy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf, converged


def _topk(clf, x: np.ndarray, y: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    scores = clf.decision_function(x)
    if scores.ndim == 1:  # two classes: one score for classes_[1]
        scores = np.stack([-scores, scores], axis=1)
    order = clf.classes_[np.argsort(-scores, axis=1)]
    return {f"top{k}": float((order[:, :k] == y[:, None]).any(axis=1).mean()) for k in ks
            if k <= len(clf.classes_)}


def fit_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
    Cs: Sequence[float] = DEFAULT_CS, val_fraction: float = 0.2, seed: int = 0, max_iter: int = 1000,
) -> dict:
    """Choose ``C`` on a held-out part of the train split, refit on all of it, score the test split.

    Returns ``dict(top1, top5 (with >= 5 classes), C, val_top1 {C: top1}, converged, num_train,
    num_test, num_classes)``.
    """
    if len(Cs) == 0:
        raise ValueError("the linear probe needs at least one regularisation strength C")
    x, y = _normalised(train_x), train_y.numpy()
    xt, yt = _normalised(test_x), test_y.numpy()
    if len(np.unique(y)) < 2:
        raise ValueError(f"the linear probe's training split has {len(np.unique(y))} class(es); it needs at least 2")
    val_top1, fitted = {}, {}
    if len(Cs) > 1:
        fit_idx, val_idx = _split_indices(y, val_fraction, seed)
        previous = None
        # Ascending C, each fit starting from the previous solution: the weaker the
        # regularisation, the longer L-BFGS takes from scratch.
        for C in sorted(float(c) for c in Cs):
            previous, _ = _fit(x[fit_idx], y[fit_idx], C, max_iter, seed, start=previous)
            fitted[C] = previous
            val_top1[C] = _topk(previous, x[val_idx], y[val_idx], ks=(1,))["top1"]
        # The first best C in ascending order: ties go to the stronger regularisation.
        best = max(val_top1, key=lambda c: val_top1[c])
    else:
        best = float(Cs[0])
    clf, converged = _fit(x, y, best, max_iter, seed, start=fitted.get(best))
    result = _topk(clf, xt, yt)
    result.update(C=best, val_top1=val_top1, converged=converged, num_train=len(y), num_test=len(yt),
                  num_classes=int(len(np.unique(np.concatenate([y, yt])))))
    return result


def linear_probe(train: Mapping[str, Tensor], test: Mapping[str, Tensor], models: Sequence[str] = ("teacher", "student"),
                 **probe_args) -> dict:
    """``fit_probe`` for each model's features (keys of ``train``/``test``; both hold ``labels``)."""
    for name, part in (("train", train), ("test", test)):
        if "labels" not in part:
            raise ValueError(f"the linear probe's {name} features have no labels; the loader must yield (images, labels)")
    out = {m: fit_probe(train[m], train["labels"], test[m], test["labels"], **probe_args) for m in models}
    out["chance_top1"] = 1.0 / out[models[0]]["num_classes"]
    return out
