"""Command line: evaluate a student against its teacher and write the report.

    python -m eval RUN_DIR [--data PATH] [--train-data PATH] [--out DIR] ...
    python -m eval --student CONFIG.json|RELEASED_NAME [--weights FILE] --teacher SPEC.yaml|'{kind: ..}' \
        --data PATH [--templates openai|simple|demo|FILE] [--classnames imagenet|FILE] ...

A run folder supplies the student, the teacher spec and the ``eval:`` options of its recipe;
command-line options override them. See ``eval.report`` for every option.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _list_or_name(value: str | None):
    """A name, or a file with one entry per line (``#`` comments), for templates and class names."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        lines = [ln.strip() for ln in path.read_text().splitlines()]
        return [ln for ln in lines if ln and not ln.startswith("#")]
    return value


def _teacher_spec(value: str) -> dict:
    import yaml

    path = Path(value)
    text = path.read_text() if path.is_file() else value
    spec = yaml.safe_load(text)
    if not isinstance(spec, dict):
        raise SystemExit(f"--teacher must be a YAML/JSON file or an inline mapping such as "
                         f"'{{kind: openclip, model: ViT-B-16-quickgelu, pretrained: openai}}'; got {value!r}")
    return spec.get("teacher", spec)  # a whole recipe works too


def _student(value: str, weights: str | None):
    from students import create_model, load_student

    if value.endswith(".json") or Path(value).is_file():
        return load_student(value, weights)
    return create_model(value, pretrained=weights)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="a bootstrapping run's output folder")
    p.add_argument("--student", help="student config JSON (with --weights) or a released model name")
    p.add_argument("--weights", help="student weights (.safetensors or .pth)")
    p.add_argument("--teacher", help="teacher spec: YAML/JSON file or inline mapping")
    p.add_argument("--out", help="report folder (default: the run folder, or ./eval_report)")
    add_eval_options(p)
    p.add_argument("--no-rois", dest="rois", action="store_const", const=False)
    return p


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """The options that override a recipe's ``eval:`` keys (shared with ``python -m eval.compare``)."""
    p.add_argument("--data", help="labelled evaluation set: ImageFolder root or labelled shards")
    p.add_argument("--train-data", help="labelled train split for the linear probe (default: split --data)")
    p.add_argument("--classnames", help="zero-shot class names: 'imagenet' or a file with one name per line")
    p.add_argument("--templates", help="zero-shot templates: openai | simple | demo | file with one '{}' template per line")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--max-samples", type=int, help="evaluate on the first N images only")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--cost-batch-size", type=int)
    p.add_argument("--no-probe", dest="probe", action="store_const", const=False)
    p.add_argument("--no-cost", dest="cost", action="store_const", const=False)
    p.add_argument("--no-progress", action="store_true")


def eval_options(args: argparse.Namespace) -> dict:
    """The ``EvalConfig`` overrides given on the command line (see ``add_eval_options``)."""
    options = dict(train_data=args.train_data, classnames=_list_or_name(args.classnames),
                   templates=_list_or_name(args.templates), batch_size=args.batch_size,
                   num_workers=args.num_workers, max_samples=args.max_samples, device=args.device,
                   precision=args.precision, cost_batch_size=args.cost_batch_size, probe=args.probe,
                   cost=args.cost, rois=getattr(args, "rois", None))
    return {k: v for k, v in options.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .report import evaluate, evaluate_run

    options = eval_options(args)
    progress = not args.no_progress
    if args.run_dir:
        if args.student or args.teacher:
            raise SystemExit("give either RUN_DIR or --student/--teacher, not both")
        report = evaluate_run(args.run_dir, args.data, out_dir=args.out, progress=progress, **options)
        out = args.out or args.run_dir
    else:
        if not (args.student and args.teacher):
            raise SystemExit("give a run folder, or both --student and --teacher (see --help)")
        from teachers import create_teacher

        teacher = create_teacher(_teacher_spec(args.teacher))
        student = _student(args.student, args.weights)
        out = args.out or "eval_report"
        report = evaluate(student, teacher, args.data, out_dir=out, progress=progress, **options)
    print(json.dumps({k: report[k] for k in ("zero_shot", "classification", "linear_probe", "fidelity")
                      if k in report}, indent=1))
    print(f"report written to {Path(out) / 'report.md'} and {Path(out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
