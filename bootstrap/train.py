"""The bootstrapping run: a frozen teacher, a student of any family learning to match it, phase by phase; or to
classify the data's labels (with the teacher, beside it, or without one).

One process per device (``accelerate launch``); accelerate handles the device, mixed precision and
distribution (DDP, or FSDP through accelerate's own config). The teacher is moved to the device in eval mode
without gradients and is never prepared (it is not trained, wrapped or checkpointed). Each rank builds its own
training loader (`data.stream.build_train_loader` splits the samples between ranks and gives every rank the
same number of batches); batches are moved to the device here, never through ``accelerator.prepare``.

The story of `train`: launch checks (`bootstrap.launch`); the resolved recipe, the teacher (if any) and what the
folder holds (`bootstrap.resolve`); where the targets come from (`bootstrap.target_source`); the student as it
starts (`students.init`), its phases and the stepper (`bootstrap.stepper`); the batches from a resumable
position (`bootstrap.batches`); the loop: a step, its log line (`bootstrap.metrics`), the held-out check
(`bootstrap.heldout`), a checkpoint (`bootstrap.checkpoint`); and at the end the student (and the EMA of its
weights), its summary and the run folder (`students.run_folder`).

Determinism and resuming: the sample order of an epoch is a function of (seed, epoch, rank) (see
`data.stream`), and the augmentation of batch ``i`` of an epoch draws from a torch generator seeded with
(seed, epoch, rank, i), isolated from the training RNG (`bootstrap.batches`). So a resumed run restarts the
checkpoint's epoch, skips the batches already consumed and sees the very batches an uninterrupted run would
have seen; with the RNG states, optimizer and scheduler restored, its final weights are bit-identical (on the
same hardware and process count).
"""

from __future__ import annotations

import sys
import time

from data.outputs import open_append, write_text
from students.family import ConfigError, PhaseContext
from students.init import build_student
from students.run_folder import RunFolder
from teachers.frames import media_teacher

from .batches import TrainBatches, loader_stats_over_ranks
from .checkpoint import TrainState
from .config import Recipe, RecipeError
from .demo_teacher import teacher_summary
from .heldout import HeldoutCheck, embed_all, format_result, load_heldout
from .labels import label_term, with_label_term
from .launch import launch, sayer
from .metrics import LogWindow, MetricsLog
from .resolve import resolve_run
from .stepper import NonFiniteLossError, Stepper
from .target_source import target_source

__all__ = ["NonFiniteLossError", "train"]


def train(recipe: Recipe, more_runs_follow: bool = False) -> dict:
    """Run a bootstrapping recipe to the end; returns the summary (also in train_summary.json). With
    ``more_runs_follow`` (an image stage before its video run, `bootstrap.image_stage`) the processes stay joined
    for the next run of this launch."""
    from tqdm.auto import tqdm

    t_start = time.time()
    accelerator = launch(recipe)  # the processes, threads and output folder checked
    say = sayer(accelerator)
    run, teacher = resolve_run(recipe, accelerator, say)  # the recipe resolved, the teacher built
    recipe, r = run.recipe, run.recipe.run
    if run.finished is not None:
        say(f"{run.folder.path} is a finished run (step {run.finished['steps']} of {run.total_steps}); nothing was "
            f"changed. Evaluate it again with python -m eval {run.folder.path}; to train anew, use another "
            f"run.output_dir or run.resume=none")
        return {**run.finished, "already_finished": True}

    # Online (default): the teacher goes to the device and gives every batch its targets. Cached (data.targets):
    # it stays on the CPU (the student inherits its weights) and runs only for what the cache does not hold.
    # Without a teacher (labels alone) the batches carry all there is to learn. Samples are images or clips
    # (recipe.media; a video run always has a teacher); over clips the teacher answers frame by frame.
    media = recipe.media
    view = None if teacher is None else recipe.train_transform(teacher)
    if media.video:
        say(f"samples are clips: {media.sampling.describe()}, one crop and flip per clip; the teacher embeds every "
            f"frame and its target is the mean (teachers.frames)")
    targets = target_source(recipe, None if teacher is None else media_teacher(teacher, media), view, accelerator,
                            say=say)
    stepper = _stepper(run, teacher, targets, accelerator, say)
    student = stepper.student
    state = TrainState()
    stepper.begin(state, run.resume_from, run.resume_state)
    metrics = MetricsLog(accelerator, run.folder.file(RunFolder.METRICS), state.step if run.resume_from else None)
    if accelerator.is_main_process:
        accelerator.init_trackers("tb")
    preprocess = Preprocess.of(teacher, student, recipe.student)  # the teacher's, or without one the student's own
    batches = _train_batches(recipe, view or preprocess.train_view(recipe.data), targets, state, run.folder,
                             accelerator, run.resume_from is not None)
    check = _heldout_check(run, teacher, preprocess, targets, accelerator, metrics)

    if check is None:
        first_check = last_check = None
    elif state.step == 0:
        first_check = last_check = check(student, 0, stepper.ema_model)
    else:  # resumed: the start (and the latest check) are in the log
        first_check, last_check = check.logged()
    if first_check:
        say("held-out at the start: " + format_result(first_check))
    total = stepper.total_steps
    stop_at = total if r.stop_after is None else min(total, r.stop_after)
    bar = tqdm(total=total, initial=state.step, disable=not (accelerator.is_main_process and r.progress),
               desc="bootstrapping", unit="step", dynamic_ncols=True, file=sys.stdout)
    window = LogWindow()
    while state.step < stop_at:
        t0 = time.perf_counter()
        result = stepper.step(state, batches.next, targets)
        window.add(result, recipe.optim.grad_accum, time.perf_counter() - t0, stepper.global_batch)
        bar.update(1)
        if state.step % r.log_every == 0 or state.step == total:
            values = window.line(stepper.phases[state.phase], state, stepper)
            metrics.log(state.step, values)
            bar.set_postfix(_postfix(values, window))
            window = LogWindow()
        if check is not None and (state.step % r.eval_every == 0 or state.step == total):
            last_check = check(student, state.step, stepper.ema_model)
            if accelerator.is_main_process:
                bar.write(f"step {state.step}: held-out " + format_result(last_check), file=sys.stdout)
        if state.step % r.checkpoint_every == 0 or state.step == stop_at:
            stepper.save(state)
    bar.close()
    batches.close()
    if state.step < total:  # run.stop_after
        say(f"stopped after step {state.step} of {total} (run.stop_after); the same command with "
            f"run.stop_after=null resumes from {run.checkpoints}")
        _end(accelerator, more_runs_follow)
        return {"finished": False, "steps": state.step}
    return _finish(accelerator, run, stepper, batches.loader.stats, state, t_start, first_check, last_check,
                   more_runs_follow)


# ----------------------------------------------------------------------------- the parts of the story


def _stepper(run, teacher, targets, accelerator, say) -> Stepper:
    """The student of the run's family as it starts (from the teacher, from scratch, from a run: `students.init`),
    its phases, and the stepper that trains them."""
    recipe, family = run.recipe, run.family
    try:
        start = build_student(family, teacher, recipe.student, run.classnames)
        phases = family.phases(PhaseContext(recipe.student, start.student, teacher, recipe.loss, recipe.optim,
                                            recipe.objective))
    except ConfigError as exc:  # how the student starts: the init keys, a head that does not fit the data
        raise RecipeError(str(exc)) from None
    except ValueError as exc:  # options that do not fit this teacher (e.g. a per-block list of the wrong length)
        raise RecipeError(f"the student section does not fit teacher {teacher.kind}:{teacher.name}: {exc}") from None
    student, policy = start.student, start.policy
    if recipe.run.mixed_precision == "fp16" and getattr(student, "restricts_gradients", False):
        # The authors pass their GradScaler's scale into the clamp; a scaled gradient would be clamped here.
        raise RecipeError("run.mixed_precision=fp16 scales the gradients that this student's restrict_grad_norm "
                          "clamps at a bound meant for unscaled ones: train it with run.mixed_precision=bf16 or no")
    phases = with_label_term(phases, label_term(recipe, teacher, accelerator.device))
    if targets.cached:
        targets.run_online_for(phases)
    source = "no teacher" if teacher is None else (
        f"teacher {teacher.kind}:{teacher.name} ({teacher.family}, target {teacher.target}, {teacher.depth} blocks, "
        f"width {teacher.width})")
    init = getattr(recipe.student, "init", "teacher")
    start_text = "" if init == "teacher" else f" from {init}"
    labels = f"; {len(run.classnames)} classes" if run.classnames else ""
    say(f"{source}; {family.name} student{start_text}, {policy.summary()}{labels}; phases: "
        + ", ".join(f"{p.name} ({p.steps} steps: {' + '.join(t.name for t in p.terms)})" for p in phases)
        + (f"; + {recipe.loss.label_weight} x cross-entropy of the zero-shot logits with data.train's labels "
           f"(loss.label_weight)" if recipe.loss.label_weight else ""))
    pre_logits = teacher is None or teacher.target != "proj"
    return Stepper(accelerator, family, student, policy, phases, pre_logits, recipe, run.checkpoints, say,
                   classnames=run.classnames)


class Preprocess:
    """The input size, normalisation and resize the run feeds: the teacher's, or the student's own
    (its pretrained_cfg) in a run without a teacher."""

    def __init__(self, size, mean, std, interpolation: str, crop_pct: float):
        self.size, self.mean, self.std, self.interpolation, self.crop_pct = size, mean, std, interpolation, crop_pct

    @classmethod
    def of(cls, teacher, student, options) -> "Preprocess":
        if teacher is not None:
            p = teacher.preprocess
            return cls(tuple(p.size), tuple(p.mean), tuple(p.std), p.interpolation, p.crop_pct)
        p = getattr(student, "pretrained_cfg", None) or {}
        if not {"input_size", "mean", "std"} <= set(p):  # only a run folder without pretrained_cfg.json lacks them
            raise RecipeError(f"student.init={getattr(options, 'init', None)}: the student has no preprocessing of its own (the run "
                              f"folder has no pretrained_cfg.json with input_size, mean and std) and the recipe has "
                              f"no teacher to take it from: write that pretrained_cfg.json, or give a teacher")
        return cls(tuple(p["input_size"][1:]), tuple(p["mean"]), tuple(p["std"]), p.get("interpolation", "bicubic"),
                   p.get("crop_pct", 0.875))

    def train_view(self, d):
        from data.transforms import augmented_view

        return augmented_view(self.size, self.mean, self.std, self.interpolation, d.augment, None, d.decode)

    def eval_view(self):
        from data.transforms import eval_transform

        return eval_transform(self.size, self.mean, self.std, self.interpolation, self.crop_pct)


def _train_batches(recipe: Recipe, view, targets, state: TrainState, out: RunFolder, accelerator,
                   resumed: bool) -> TrainBatches:
    """This rank's training batches (``view``: the training transform) from the data position in ``state``."""
    d, rank = recipe.data, accelerator.process_index
    loader = recipe.media.train_loader(
        d.train, view, d.batch_size, d.num_workers,
        epoch_samples=d.epoch_samples, resampled=d.resampled, shuffle_buffer=d.shuffle_buffer,
        seed=recipe.run.seed, rank=rank, world_size=accelerator.num_processes, shardshuffle=d.shardshuffle,
        targets=targets.store, allow_pipe=d.allow_pipe, max_pixels=d.max_pixels,
        uint8_batches=hasattr(view, "render"))  # timm's create_transform (RandAugment) renders float views
    keys_file = None
    if recipe.run.log_sample_keys:
        out.file("sample_keys").mkdir(exist_ok=True)
        keys = out.file("sample_keys") / f"rank-{rank}.txt"
        if not resumed:
            write_text(keys, "")
        keys_file = open_append(keys)
    # uint8 views from the workers, normalised on the device: the same numbers, less work per worker.
    return TrainBatches(loader, state, recipe.run.seed, rank, keys_file, device=accelerator.device)


def _heldout_check(run, teacher, preprocess: Preprocess, targets, accelerator, metrics) -> HeldoutCheck | None:
    """The held-out check of ``data.val``'s first ``data.heldout_samples`` images or clips (None without
    ``data.val``): alignment with the teacher's embeddings of them, and in a run with labels the accuracy on their
    labels."""
    d = run.recipe.data
    if d.val is None:
        return None
    images, keys, labels = load_heldout(d.val, teacher, d.heldout_samples, d.allow_pipe, d.max_pixels,
                                        run.recipe.media, labels=True,
                                        image_view=None if teacher is not None else preprocess.eval_view())
    device, autocast = accelerator.device, accelerator.autocast
    held = None if teacher is None else \
        targets.heldout(keys, lambda embed: embed_all(embed, images, d.eval_batch_size, device, autocast))
    if run.classnames is None or (labels < 0).any():  # a run without labels, or held-out images without them
        labels = None
    return HeldoutCheck(images, held, d.eval_batch_size, accelerator, teacher is None or teacher.target != "proj",
                        metrics, run.folder.file("alignment.png"), run.checkpoints, labels=labels)


def _postfix(values: dict, window: LogWindow) -> dict:
    """The progress bar's loss, speed and cosine."""
    postfix = {"loss": f"{values.get('train/loss', float('nan')):.4f}", "img_s": f"{window.images_per_s:.0f}"}
    if "train/cosine" in values:
        postfix["cos"] = f"{values['train/cosine']:.3f}"
    return postfix


def _end(accelerator, more_runs_follow: bool) -> None:
    """The trackers closed; and, unless another run of this launch follows, the process group too (accelerate's
    end_training, after which no collective can run in this process)."""
    if more_runs_follow:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()


def _finish(accelerator, run, stepper: Stepper, loader_stats, state: TrainState, t_start: float, first_check,
            last_check, more_runs_follow: bool = False) -> dict:
    """The student and the summary into the run folder (main process), after the collectives every rank joins."""
    full = accelerator.get_state_dict(stepper.model)  # collective (gathers FSDP shards)
    checksums = rank_checksums(accelerator, stepper.model)
    skipped = loader_stats_over_ranks(accelerator, loader_stats)
    summary = {"finished": True}
    if accelerator.is_main_process:
        student = accelerator.unwrap_model(stepper.model).student
        ema = stepper.ema_model
        run.folder.write_student(student, {k.removeprefix("student."): v for k, v in full.items()},
                                 None if ema is None else ema.state_dict())
        summary = {
            "finished": True, "steps": state.step, "samples_seen": state.samples_seen,
            "nonfinite_total": state.nonfinite_total, "processes": accelerator.num_processes,
            "global_batch": stepper.global_batch, "seconds": round(time.time() - t_start, 1), "heldout_start": first_check,
            "heldout_end": last_check, "resumed_from": str(run.resume_from or ""), "parameters": stepper.policy.counts(),
            "loader": skipped, "rank_checksums": checksums, "teacher": teacher_summary(run.recipe.teacher),
        }
        run.folder.write_summary(summary)
        print(f"teacher: {summary['teacher']['description']}", flush=True)
        if first_check and last_check:
            print(f"held-out: start {format_result(first_check)}\n"
                  f"          end   {format_result(last_check)}")
        if skipped["skipped"] or skipped["bad_shards"]:
            print(f"data: {skipped['skipped']} sample(s) did not decode and were skipped"
                  + (f", {len(skipped['bad_shards'])} shard(s) turned out unreadable" if skipped["bad_shards"] else "")
                  + f" (over {accelerator.num_processes} process(es); named in train_summary.json)", flush=True)
    accelerator.wait_for_everyone()
    _end(accelerator, more_runs_follow)
    return summary


def rank_checksums(accelerator, model) -> list[str]:
    """SHA-256 of the student's trainable parameters on every rank (collective).

    Data-parallel ranks must hold identical weights; a difference means they diverged (a desynchronised step),
    which the main process reports. Not meaningful with FSDP, where each rank holds a shard.
    """
    import hashlib
    import warnings

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for name, p in accelerator.unwrap_model(model).named_parameters():
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    sums = gather_object([digest.hexdigest()]) if accelerator.num_processes > 1 else [digest.hexdigest()]
    if accelerator.is_main_process and len(set(sums)) > 1 and accelerator.distributed_type.name != "FSDP":
        warnings.warn(f"the ranks ended with different student weights (checksums {sums}): data-parallel "
                      f"training desynchronised", RuntimeWarning)
    return sums
