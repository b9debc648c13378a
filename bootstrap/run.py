"""Run a bootstrapping recipe:  accelerate launch bootstrap/run.py RECIPE [key=value ...]

    accelerate launch bootstrap/run.py recipes/demo.yaml                 # the demo, on a CPU
    accelerate launch bootstrap/run.py recipes/clip_base.yaml data.train=/data/in1k/train data.val=/data/in1k/val
    accelerate launch --num_processes 8 bootstrap/run.py recipes/clip_large.yaml optim.lr=3e-4 run.output_dir=runs/l14
    python -m bootstrap.run recipes/demo.yaml run.resume=none            # one process, no launcher

Any recipe key can be overridden as section.key=value (the value is read as YAML). The run
writes to run.output_dir (default runs/<recipe name>) and resumes from its latest complete
checkpoint when started again (run.resume=auto). At the end it writes the student
(student.safetensors, student_config.json, pretrained_cfg.json), the evaluation report
(report.md / report.json) and, for CLIP teachers, the open_clip export.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch bootstrap/run.py): import the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bootstrap.config import RecipeError, load_recipe  # noqa: E402
from bootstrap.image_stage import image_stage  # noqa: E402

USAGE = "usage: accelerate launch bootstrap/run.py RECIPE.yaml [section.key=value ...]"


def finish_run(recipe, run_dir: Path) -> bool:
    """The evaluation report and the export, on the main process once training is over.

    The student is already saved, so a failure here is reported (with its traceback) without
    stopping the other step; returns whether everything that ran succeeded.
    """
    import traceback

    from eval import evaluate_run
    from eval.report import headline
    from students.export import export_run

    steps = []
    if recipe.run.final_report:
        steps.append(("evaluation report", evaluate_run, {"allow_pipe": recipe.data.allow_pipe}, "python -m eval"))
    if recipe.export.enabled:
        steps.append(("export", export_run, {"overwrite": True}, "python -m students.export"))
    ok = True
    for what, fn, kwargs, command in steps:
        t0 = time.time()
        try:
            result = fn(run_dir, **kwargs)
        except Exception:  # noqa: BLE001 - report and go on: the trained student is safe on disk
            traceback.print_exc()
            print(f"{what} FAILED (the student is saved in {run_dir}; rerun it with "
                  f"{command} {run_dir})", file=sys.stderr, flush=True)
            ok = False
            continue
        where = result if isinstance(result, (str, Path)) else run_dir
        print(f"{what}: {where} ({time.time() - t0:.0f} s)", flush=True)
        if isinstance(result, dict) and headline(result):
            print(headline(result), flush=True)
    return ok


def _finished_image_run(stage, train) -> bool:
    """Train (or resume) the image stage's run unless it is finished (`bootstrap.image_stage`); whether it is (not
    when the image run stopped early: run.stop_after)."""
    import os

    from accelerate import PartialState

    from students.run_folder import NotARunError, RunFolder

    # Not PartialState() yet: made before the run's Accelerator it would settle accelerate's state without the
    # launcher's CPU flag, and each process of a CPU launch would run alone.
    main = os.environ.get("RANK", "0") == "0"
    try:
        RunFolder.finished(stage.folder)
        if main:
            print(f"student.video.image_student: the image student is the finished run {stage.folder} "
                  f"({stage.spec})", flush=True)
        return True
    except NotARunError:
        pass
    if main:
        print(f"student.video.image_student: training the image student first ({stage.spec} -> {stage.folder}); "
              f"the video run inflates it", flush=True)
    t0 = time.time()
    summary = train(stage.image, more_runs_follow=True)
    if not summary.get("finished"):
        return False
    if main and not summary.get("already_finished"):
        finish_run(stage.image, stage.folder)
        print(f"image stage done in {time.time() - t0:.0f} s: {stage.folder}", flush=True)
    PartialState().wait_for_everyone()
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or "=" in argv[0]:
        print(USAGE + "\n\n" + __doc__, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        recipe = load_recipe(argv[0], argv[1:])
        stage = image_stage(recipe, argv[0])
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from accelerate import PartialState

    from bootstrap.train import train
    from data.errors import UserError

    t0 = time.time()
    try:
        if stage is not None:  # the video student's image student: its recipe's run, finished first
            if not _finished_image_run(stage, train):
                return 0
            recipe = stage.video
        summary = train(recipe)
    except RecipeError as exc:  # found once the run could look at its folder (run.output_dir, a resumed recipe)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (UserError, FileNotFoundError) as exc:  # the run started and could not go on
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    if not PartialState().is_main_process or not summary.get("finished") or summary.get("already_finished"):
        return 0
    ok = finish_run(recipe, Path(recipe.run.output_dir))
    print(f"done in {time.time() - t0:.0f} s: {recipe.run.output_dir}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
