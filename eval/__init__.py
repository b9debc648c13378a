"""Evaluation of students beside their teacher, on the same images.

The bench (`bench`: features extracted once, every section for every model) renders as one student's report
(`report`: `evaluate`, `evaluate_run`; `python -m eval`) or as a comparison of many students and training-free
Token Merging (`compare`, `baselines.tome`; `python -m eval.compare`). Sections: zero-shot (`zeroshot`),
linear probe (`linear_probe`), classification through the inherited head (`classify`), fidelity to the
teacher's embeddings (`fidelity`), cost (`cost`); options (`options.EvalConfig`).
"""

from .cost import count_flops, count_params, measure_throughput, model_cost, peak_memory
from .fidelity import fidelity
from .options import EvalConfig
from .report import evaluate, evaluate_run, write_report

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
