"""Command line: evaluate a student against its teacher and write the report.

    python -m eval RUN_DIR [--data PATH] [--train-data PATH] [--out DIR] ...
    python -m eval --student CONFIG.json|RELEASED_NAME [--weights FILE] [--teacher SPEC.yaml|'{kind: ..}'] \
        --data PATH [--templates openai|simple|demo|FILE] [--classnames imagenet|FILE] ...

A run folder supplies the student (and the EMA of its weights, where the run kept one), the teacher spec
(none for a run that trained with labels alone) and the ``eval:`` options of its recipe; command-line
options override them. A student without ``--teacher`` is evaluated on its own (its head's top-1/top-5,
its cost). See ``eval.report`` for every option. Bad input (a folder
that is not a run, missing data, weights that are not safe to load, ...) is one line on stderr
and exit status 2, checked before the models are built where it can be.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data.errors import UserError
from students.run_folder import yaml_problem

from .options import add_eval_options, eval_options


def _teacher_spec(value: str) -> dict:
    import yaml

    path = Path(value)
    try:
        is_file = path.is_file()
    except OSError:  # e.g. an inline mapping longer than a file name may be
        is_file = False
    if not is_file and path.suffix.lower() in (".yaml", ".yml", ".json"):
        raise FileNotFoundError(f"--teacher: the teacher spec file {value} does not exist")
    text = path.read_text() if is_file else value
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exn:
        raise ValueError(f"--teacher {value}: not valid YAML ({yaml_problem(exn)})") from exn
    if not isinstance(spec, dict):
        raise ValueError(f"--teacher must be a YAML/JSON file or an inline mapping such as "
                         f"'{{kind: openclip, model: ViT-B-16-quickgelu, pretrained: openai}}'; got {value!r}")
    return spec.get("teacher", spec)  # a whole recipe works too


def _student(value: str, weights: str | None):
    from students import create_model, load_student

    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"--weights {weights} does not exist" if not Path(weights).exists()
                                else f"--weights {weights} is a folder, not a weights file")
    if value.endswith(".json") or Path(value).is_file():
        try:
            return load_student(value, weights)
        except UnicodeDecodeError as exn:
            raise ValueError(f"--student {value} is not a student config JSON (as a run writes student_config.json) "
                             f"but a binary file; weights go to --weights") from exn
        except json.JSONDecodeError as exn:
            raise ValueError(f"--student {value} is not a student config JSON (as a run writes "
                             f"student_config.json): {exn}") from exn
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.run_dir and (args.student or args.teacher):
        parser.error("give either RUN_DIR or --student/--teacher, not both")
    if not args.run_dir and not args.student:
        parser.error("give a run folder, or --student (and --teacher to hold it against)")
    try:
        return _evaluate(args)
    except (UserError, OSError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2


def _evaluate(args) -> int:
    from .report import EvalConfig, evaluate, evaluate_run, prepare_out_dir

    options = eval_options(args)
    progress = not args.no_progress
    if args.run_dir:
        report = evaluate_run(args.run_dir, args.data, out_dir=args.out, progress=progress,
                              allow_pipe=args.allow_pipe, **options)
        out = args.out or args.run_dir
    else:
        from data.evalsets import check_eval_source
        from teachers import create_teacher

        # Everything cheap first: the options, the data paths and the report folder, then the models.
        cfg = EvalConfig.from_dict(options)
        for what, value in (("--data", args.data), ("--train-data", cfg.train_data if cfg.probe else None)):
            if value is not None:
                check_eval_source(value, what, args.allow_pipe)
        out = prepare_out_dir(args.out or "eval_report")
        spec = _teacher_spec(args.teacher) if args.teacher else None
        student = _student(args.student, args.weights)
        teacher = create_teacher(spec) if spec is not None else None
        report = evaluate(student, teacher, args.data, out_dir=out, config=cfg, progress=progress,
                          allow_pipe=args.allow_pipe)
    print(json.dumps({k: report[k] for k in ("zero_shot", "classification", "linear_probe", "fidelity")
                      if k in report}, indent=1))
    print(f"report written to {Path(out) / 'report.md'} and {Path(out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
