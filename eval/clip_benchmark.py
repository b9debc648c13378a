"""CLIP_benchmark on our OpenCLIP exports: its command line, once ``students`` is imported.

    python -m eval.clip_benchmark eval --dataset wds/NAME --dataset_root FOLDER \\
        --model local-dir:EXPORT_FOLDER --task zeroshot_classification --output result.json [...]

An OpenCLIP export (``python -m students.export RUN``) names its image tower as a timm model
that the ``students`` package registers; CLIP_benchmark builds models with
``open_clip.create_model_and_transforms``, which finds it once ``students`` is imported. This
module imports it and hands every argument to CLIP_benchmark's own CLI (``clip_benchmark
--help`` lists them). Our evaluation sets become CLIP_benchmark datasets with ``python -m
data.export_eval_set EVAL_SET FOLDER --format clip_benchmark``; zero-shot top-1/top-5 then
equal ``python -m eval``'s on the same images, class names and templates (tests/
test_clip_benchmark.py checks every prediction). For ``local-dir:`` models ``--pretrained``
is ignored. On a CPU pass ``--no_amp``: CLIP_benchmark's default autocast is bfloat16 there.

A ``local-dir:`` model whose ``open_clip_config.json`` asks for an HF tokenizer with
``trust_remote_code: true`` would have transformers import that folder's Python: such a model is
refused unless ``--trust-remote-code`` (this command's own flag, not passed on) is given.

CLIP_benchmark is an optional extra: ``pip install -e ".[clip-benchmark]"``. Its 1.6.2
``accuracy`` calls ``float()`` on a one-element array, which numpy >= 2.4 refuses
(LAION-AI/CLIP_benchmark#147); where it does, this module puts in the same computation.
"""

from __future__ import annotations

import sys

INSTALL = 'pip install -e ".[clip-benchmark]"'
TRUST_REMOTE_CODE = "--trust-remote-code"


def _accuracy(output, target, topk=(1,)):
    """CLIP_benchmark's top-k accuracy, taking each count with ``.item()``."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def _fix_accuracy() -> None:
    """Put ``_accuracy`` in where CLIP_benchmark's own fails with this numpy (and only there)."""
    import torch
    from clip_benchmark.metrics import linear_probe, zeroshot_classification

    try:
        zeroshot_classification.accuracy(torch.eye(2), torch.arange(2))
    except TypeError:
        zeroshot_classification.accuracy = linear_probe.accuracy = _accuracy


def _remote_code_refusal(argv: list[str]) -> str | None:
    """Why a ``local-dir:`` model among the arguments (``--model``, ``--model=``, ``model,pretrained`` pairs)
    is refused: its config asks for remote code. None when none does."""
    from teachers.openclip import local_dir_remote_code, remote_code_refusal

    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        for part in value.split(","):
            asked = local_dir_remote_code(part)
            if asked:
                return remote_code_refusal(f"the model {part}", asked, TRUST_REMOTE_CODE)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trusted = TRUST_REMOTE_CODE in argv
    argv = [a for a in argv if a != TRUST_REMOTE_CODE]
    refusal = None if trusted else _remote_code_refusal(argv)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    try:
        from clip_benchmark import cli
    except ImportError as exn:
        missing = getattr(exn, "name", None) or ""
        if missing and missing.split(".")[0] != "clip_benchmark":  # installed, but a module it needs is not
            print(f"error: CLIP_benchmark cannot be imported: the module {missing!r} it needs is missing ({exn}); "
                  f"install it (pip install {missing.split('.')[0]}) or reinstall the extra: {INSTALL}",
                  file=sys.stderr)
        else:
            print(f"error: CLIP_benchmark is not installed ({exn}); install it with {INSTALL} "
                  f"(or pip install clip-benchmark)", file=sys.stderr)
        return 2
    import students  # noqa: F401  (registers SparseFormer with timm: open_clip can build the exports)

    _fix_accuracy()

    saved = sys.argv
    sys.argv = ["clip_benchmark", *argv]  # its main() parses sys.argv
    try:
        result = cli.main()
    finally:
        sys.argv = saved
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
