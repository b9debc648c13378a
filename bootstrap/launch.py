"""Checks before a run does any work: the processes of the launch, the CPU threads, the output folder, the data.

Each is a one-line error naming the fix, raised before the teacher is built or anything is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from data.errors import UserError

from .config import Recipe, RecipeError

__all__ = ["ProcessCountError", "TWO_PROCESS_CPU_COMMAND", "check_data", "check_output_dir", "check_process_count",
           "cpu_threads", "launch", "sayer"]


def sayer(accelerator):
    """``say(text)``: a line on the main process's stdout."""

    def say(text: str) -> None:
        if accelerator.is_main_process:
            print(text, flush=True)

    return say


def launch(recipe: Recipe):
    """The run's accelerator (device, precision, processes, TensorBoard into the output folder), after the checks
    that need no model: the launch's processes, the CPU threads, a writable output folder."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    out = str(recipe.run.output_dir)
    accelerator = Accelerator(
        mixed_precision=recipe.run.mixed_precision, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=out, logging_dir=out),
        step_scheduler_with_optimizer=False)  # the schedule is in optimizer steps, stepped by the run
    world = accelerator.num_processes
    check_process_count(world)
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(recipe.run.cpu_threads, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
        sayer(accelerator)(f"CPU run: {torch.get_num_threads()} threads per process (run.cpu_threads="
                           f"{recipe.run.cpu_threads}; a number pins it)")
    check_output_dir(Path(out), accelerator.process_index)  # before any expensive work (demo, teacher weights)
    return accelerator


def cpu_threads(setting: int | str, local_processes: int, env: dict | None = None,
                cores: int | None = None) -> int:
    """Threads per process for a CPU run (`run.cpu_threads`).

    A number is used as it is. "auto" keeps an OMP_NUM_THREADS that the user set, and otherwise
    shares the physical cores among the local processes. `accelerate launch` without ``--cpu``
    sets OMP_NUM_THREADS=1 on a machine without a GPU (it only picks a thread count itself for
    ``--cpu``), which would run the demo on one core of many; that 1 is not taken as the user's.
    """
    if setting != "auto":
        return int(setting)
    env = os.environ if env is None else env
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in env  # set by `accelerate launch` only
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1 and not (launched_by_accelerate and given == "1"):
        return int(given)
    if cores is None:
        import psutil  # an accelerate dependency

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
        if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on
            cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, cores // max(1, local_processes))


class ProcessCountError(UserError, RuntimeError):
    """The processes of a launch do not form one run (e.g. torchrun on a CPU without ACCELERATE_USE_CPU=1)."""


TWO_PROCESS_CPU_COMMAND = "ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 bootstrap/run.py RECIPE"


def check_process_count(processes: int, env: dict | None = None, parent_cmdline: list[str] | None = None) -> None:
    """Stop when the launcher started more processes than the run has (each would think it is the
    main one and write the same folder) or asked for more than it started."""
    env = os.environ if env is None else env
    launched = int(env.get("WORLD_SIZE", "1") or 1)
    if launched != processes:
        raise ProcessCountError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but they did not join into one run "
            f"(each sees {processes}): on a CPU, torchrun needs ACCELERATE_USE_CPU=1, e.g. "
            f"{TWO_PROCESS_CPU_COMMAND.replace('2', str(launched))}")
    if parent_cmdline is None and processes == 1 and "ACCELERATE_USE_CPU" in env:
        try:
            import psutil

            parent_cmdline = psutil.Process().parent().cmdline()
        except Exception:  # noqa: BLE001 - best effort: no parent to look at
            parent_cmdline = []
    args = list(parent_cmdline or [])
    asked = None
    for i, arg in enumerate(args):
        if arg in ("--num_processes", "--num-processes") and i + 1 < len(args):
            asked = args[i + 1]
        elif arg.startswith(("--num_processes=", "--num-processes=")):
            asked = arg.split("=", 1)[1]
    if processes == 1 and "launch" in args and asked and asked.isdigit() and int(asked) > 1:
        raise ProcessCountError(
            f"accelerate launch --num_processes {asked} started one process only (it does so without GPUs, --cpu or "
            f"not); for {asked} processes on a CPU use {TWO_PROCESS_CPU_COMMAND.replace('2', asked)}")


def check_data(recipe: Recipe) -> None:
    """The training and held-out shards exist and look whole (a few reads per shard), before the
    teacher is built; a shard that turns bad later is skipped and counted by the loader."""
    from data.evalsets import check_eval_source
    from data.shards import check_shards, resolve_shards

    d = recipe.data
    for key in ("train", "val"):
        if getattr(d, key) is not None:
            try:
                urls = resolve_shards(getattr(d, key), d.allow_pipe)
                check_shards(urls)
                recipe.media.check_shards(urls)  # videos for a video student, images otherwise; clips that fit
            except ValueError as exc:  # e.g. a pipe: URL without data.allow_pipe
                raise RecipeError(f"data.{key}: {exc}") from None
    if recipe.loss.label_weight:  # labelled shards, before the teacher is built
        from .labels import training_classes

        training_classes(recipe)
    if recipe.run.final_report:  # the report at the end must not be the first to find its data missing
        for key in ("data", "train_data"):
            source = getattr(recipe.eval, key)
            if source is not None:
                try:
                    check_eval_source(source, f"eval.{key}", d.allow_pipe)
                except (ValueError, OSError) as exc:
                    raise RecipeError(str(exc)) from None


def check_output_dir(out: Path, rank: int = 0) -> None:
    """`run.output_dir` must be a folder this process can create and write, before any work is done."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{rank}-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RecipeError(f"run.output_dir={out} cannot be written ({exc.strerror or exc}); choose a folder you can "
                          f"write, e.g. run.output_dir=runs/NAME") from None
