"""Evaluation of a bootstrapped student beside its teacher, on the same images.

zero-shot (`zeroshot`), linear probe (`linear_probe`), classification through the inherited
head (`classify`), fidelity to the teacher's embeddings (`fidelity`), cost (`cost`), RoI
pictures (`rois`), and the per-checkpoint report (`report`: `evaluate`, `evaluate_run`;
`python -m eval`). `compare`: the students of one teacher beside it and beside training-free
Token Merging (`baselines.tome`) in one report (`python -m eval.compare`).
"""

from .cost import count_flops, count_params, measure_throughput, model_cost, peak_memory
from .fidelity import fidelity
from .report import EvalConfig, evaluate, evaluate_run, write_report

__all__ = [
    "EvalConfig",
    "count_flops",
    "count_params",
    "evaluate",
    "evaluate_run",
    "fidelity",
    "measure_throughput",
    "model_cost",
    "peak_memory",
    "write_report",
]
