"""The bootstrapping loop: a frozen teacher, a SparseFormer student learning its embeddings.

One process per device (``accelerate launch``); accelerate handles the device, mixed
precision and distribution (DDP, or FSDP through accelerate's own config). The teacher is
moved to the device in eval mode without gradients and is never prepared (it is not
trained, wrapped or checkpointed). Each rank builds its own training loader
(`data.stream.build_train_loader` splits the samples between ranks and gives every rank the
same number of batches); batches are moved to the device here, never through
``accelerator.prepare``.

Determinism and resuming: the sample order of an epoch is a function of (seed, epoch, rank)
(see `data.stream`), and the augmentation of batch ``i`` of an epoch draws from a torch
generator seeded with (seed, epoch, rank, i), isolated from the training RNG (`_Batches`).
So a resumed run restarts the checkpoint's epoch, skips the batches already consumed
(decoding them again: skipping costs I/O and decoding time, at most one epoch's worth) and
sees the very batches an uninterrupted run would have seen; with the RNG states, optimizer
and scheduler restored by accelerate, its final weights are bit-identical (on the same
hardware and process count).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .checkpoint import (TrainState, atomic_write_text, list_checkpoints, load_checkpoint, read_manifest,
                         resolve_resume, save_checkpoint)
from .config import Recipe, RecipeError
from .loss import alignment_loss, batch_cosine
from .target_source import target_source

# Test hook: the loss of these optimizer steps (comma-separated, 0-based) is made NaN.
NONFINITE_ENV = "BOOTSTRAP_TEST_NONFINITE_STEPS"


class NonFiniteLossError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


class TrainingForward(nn.Module):
    """The student's training forward of one phase: a dict of what the phase's loss terms read.

    ``embedding`` is what is compared with the teacher's embedding: for CLIP teachers (target
    'proj') the projected embedding, for others (target 'norm') the pre-logits feature. The
    family's `Training.forward` computes it (and ``tokens``, ``approx_attn``, ... where the phase
    asks). Prepared (wrapped for DDP) as one module so that the distributed wrapper sees the
    forward that trains.
    """

    def __init__(self, student: nn.Module, forward, outputs: tuple[str, ...], pre_logits: bool):
        super().__init__()
        self.student = student
        self._forward, self.outputs, self.pre_logits = forward, outputs, pre_logits

    def forward(self, images: Tensor) -> dict:
        return self._forward(self.student, images, self.outputs, self.pre_logits)


def new_window() -> dict:
    """The running sums of the steps since the last log line."""
    return {"sums": {}, "n": 0, "time": 0.0, "wait": 0.0, "images": 0}


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from 0 over `warmup` steps, then cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


class _Batches:
    """The training batches of one rank, epoch after epoch, from the position in `state`.

    Each batch is drawn with torch's global generator seeded by (seed, epoch, rank, index)
    and restored afterwards: in-process augmentation (num_workers=0) is a function of the
    position, and the DataLoader's worker seeds (drawn when the first batch is requested)
    are a function of (seed, epoch, rank). The training RNG (drop-path) is untouched.
    """

    def __init__(self, loader, state: TrainState, seed: int, rank: int):
        self.loader, self.state, self.seed, self.rank = loader, state, seed, rank

    def __iter__(self) -> Iterator[tuple[Tensor, dict]]:
        while True:
            epoch, skip = self.state.epoch, self.state.batch_in_epoch
            self.loader.set_epoch(epoch)
            it = iter(self.loader)
            for index in range(len(self.loader)):
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed_of("batch", self.seed, epoch, self.rank, index))
                    batch = next(it)
                if index >= skip:
                    yield batch
            next(it, None)  # lets the loader finish its epoch (and check its batch count)

    def consumed(self) -> None:
        """Record one batch as consumed (the data position saved with checkpoints)."""
        s = self.state
        s.batch_in_epoch += 1
        if s.batch_in_epoch >= len(self.loader):
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0


def load_heldout(shards, transform, limit: int) -> tuple[Tensor, list[str]]:
    """The first `limit` images of `shards` (in shard order), preprocessed: the fixed held-out set."""
    from data.decode import decode_sample
    from data.shards import iter_shard, resolve_shards

    images, keys = [], []
    for url in resolve_shards(shards):
        for raw in iter_shard(url):
            sample = decode_sample(raw)
            images.append(transform(sample["image"]))
            keys.append(f"{url}#{sample['__key__']}")
            if len(images) >= limit:
                return torch.stack(images), keys
    if not images:
        raise ValueError(f"the held-out shards {shards} hold no images")
    return torch.stack(images), keys


@torch.no_grad()
def embed_all(fn, images: Tensor, batch_size: int, device, autocast) -> Tensor:
    out = []
    for start in range(0, images.shape[0], batch_size):
        with autocast():
            out.append(fn(images[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def fidelity(student_feats: Tensor, teacher_feats: Tensor) -> dict:
    from eval.fidelity import fidelity as _fidelity

    return _fidelity(student_feats, teacher_feats)


class MetricsLog:
    """metrics.jsonl and TensorBoard (through accelerate's tracker), main process only."""

    def __init__(self, accelerator, path: Path, resume_step: int | None):
        self.accelerator, self.path = accelerator, path
        if accelerator.is_main_process:
            if resume_step is None:
                path.write_text("")
            elif path.exists():  # drop what was logged after the checkpoint we resume from
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def history(self) -> list[dict]:
        # A run resumed from another folder's checkpoint starts with no log of its own.
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_alignment(history: list[dict], path: Path) -> None:
    """alignment.png: held-out cosine, centred cosine and retrieval over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [h for h in history if "heldout/cosine" in h]
    if not points:
        return
    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("heldout/cosine", "cosine"), ("heldout/centred_cosine", "centred cosine"),
                       ("heldout/retrieval_top1", "retrieval top-1")):
        ax.plot(steps, [p[key] for p in points], marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("student vs teacher (held-out)")
    ax.set_ylim(min(0.0, *(p["heldout/centred_cosine"] for p in points)), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("held-out alignment")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _nonfinite_steps() -> set[int]:
    text = os.environ.get(NONFINITE_ENV, "")
    return {int(s) for s in text.split(",") if s.strip()}


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


def _say(accelerator, text: str) -> None:
    if accelerator.is_main_process:
        print(text, flush=True)


def train(recipe: Recipe) -> dict:
    """Run a bootstrapping recipe to the end; returns the summary (also in train_summary.json)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from data.stream import build_train_loader
    from students.bootstrap import optimizer_param_groups
    from students.phases import PhaseContext, training_of
    from teachers import create_teacher, resolve_spec

    t_start = time.time()
    out = Path(recipe.run.output_dir)
    accelerator = Accelerator(
        mixed_precision=recipe.run.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)),
        step_scheduler_with_optimizer=False,  # the schedule is in optimizer steps, stepped below
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    check_process_count(world)
    device = accelerator.device
    if device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(cpu_threads(recipe.run.cpu_threads, local))
        _say(accelerator, f"CPU run: {torch.get_num_threads()} threads per process (run.cpu_threads="
                          f"{recipe.run.cpu_threads}; a number pins it)")

    check_output_dir(out, rank)  # before any expensive work (the demo teacher, the teacher's weights)
    if recipe.demo is not None:
        from .demo_teacher import prepare_demo

        # The main process makes (or finds) the demo data and teacher; the others then find them cached.
        with accelerator.main_process_first():
            prepare_demo(recipe, verbose=accelerator.is_main_process)

    check_data(recipe)

    # ------------------------------------------------- what this folder already holds
    ckpt_root = out / "checkpoints"
    resume_from = resolve_resume(recipe.run.resume, ckpt_root)
    saved_teacher = resume_from.parent.parent / "teacher_weights.safetensors" if resume_from else None
    if resume_from is not None and resolve_spec(recipe.teacher)[1] == "random" and saved_teacher.is_file():
        recipe.teacher["pretrained"] = str(saved_teacher.resolve())  # the very teacher the run started with
    if resume_from is not None:
        manifest = read_manifest(resume_from)
        check_same_recipe(recipe, resume_from, out)
        steps = training_of(recipe.student).steps(recipe.student, recipe.optim)
        done = finished_summary(out, manifest["train_state"]["step"], steps)
        if done is not None:
            _say(accelerator, f"{out} is a finished run (step {done['steps']} of {steps}); nothing was "
                              f"changed. Evaluate it again with python -m eval {out}; to train anew, use another "
                              f"run.output_dir or run.resume=none")
            return {**done, "already_finished": True}
    elif accelerator.is_main_process:
        set_aside_old_checkpoints(ckpt_root, accelerator)
    accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ models
    set_seed(recipe.run.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM weights.*")
        teacher = create_teacher(recipe.teacher)
    if accelerator.is_main_process:
        if resolve_spec(recipe.teacher)[1] == "random":
            # recipe.yaml must rebuild this very teacher in a fresh process (evaluation, export).
            recipe.teacher["pretrained"] = str(save_teacher_weights(teacher, out).resolve())
        atomic_write_text(out / "recipe.yaml", recipe.to_yaml())
    accelerator.wait_for_everyone()
    # Online (default): the teacher goes to the device and gives every batch its targets. Cached
    # (data.targets): it stays on the CPU (the student inherits its weights) and runs only for what
    # the cache does not hold.
    targets = target_source(recipe, teacher, teacher.train_transform(decode=recipe.data.decode, **recipe.data.augment),
                            accelerator, say=lambda text: _say(accelerator, text))
    training = training_of(recipe.student)
    try:
        student, policy = training.build(teacher, recipe.student)
    except ValueError as exc:  # options that do not fit this teacher (e.g. a per-block list of the wrong length)
        raise RecipeError(f"the student section does not fit teacher {teacher.kind}:{teacher.name}: {exc}") from None
    pre_logits = teacher.target != "proj"
    phases = training.phases(PhaseContext(recipe.student, student, teacher, recipe.loss, recipe.optim))
    total_steps = sum(p.steps for p in phases)
    if targets.cached:
        targets.run_online_for(phases)
    _say(accelerator, f"teacher {teacher.kind}:{teacher.name} ({teacher.family}, target {teacher.target}, "
                      f"{teacher.depth} blocks, width {teacher.width}); {training.family} student, "
                      f"{policy.summary()}; phases: " + ", ".join(f"{p.name} ({p.steps} steps)" for p in phases))
    o = recipe.optim

    def start_phase(index: int):
        """The phase's trainable parameters, a fresh optimizer and schedule, and the module that trains
        (wrapped anew, so that DDP sees exactly the parameters this phase trains)."""
        phase = phases[index]
        training.enter(student, policy, phase)
        module = TrainingForward(student, training.forward, phase.outputs, pre_logits)
        opt = torch.optim.AdamW(optimizer_param_groups(module, o.weight_decay), lr=phase.lr, betas=tuple(o.betas),
                                eps=o.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, phase.warmup_steps, phase.steps, phase.min_lr / phase.lr))
        return accelerator.prepare(module, opt, sched)

    state = TrainState()
    if resume_from is not None:
        state.phase = manifest["train_state"].get("phase", 0)  # its optimizer is that phase's
    else:  # the first phase that has steps
        state.phase = next((i for i, p in enumerate(phases) if p.steps > 0), len(phases) - 1)
    model, optimizer, scheduler = start_phase(state.phase)
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, state, model, optimizer, scheduler)
        _say(accelerator, f"resumed from {resume_from} (step {state.step}, phase {phases[state.phase].name}, "
                          f"epoch {state.epoch}, batch {state.batch_in_epoch} of the epoch)")
    metrics = MetricsLog(accelerator, out / "metrics.jsonl", state.step if resume_from else None)
    if accelerator.is_main_process:
        accelerator.init_trackers("tb")

    # -------------------------------------------------------------------- data
    d = recipe.data
    loader = build_train_loader(
        d.train, teacher.train_transform(decode=d.decode, **d.augment), d.batch_size, d.num_workers,
        epoch_samples=d.epoch_samples, resampled=d.resampled, shuffle_buffer=d.shuffle_buffer,
        seed=recipe.run.seed, rank=rank, world_size=world, shardshuffle=d.shardshuffle, targets=targets.store)
    batches = _Batches(loader, state, recipe.run.seed, rank)
    batch_iter = iter(batches)
    keys_file = None
    if recipe.run.log_sample_keys:
        (out / "sample_keys").mkdir(exist_ok=True)
        keys_file = open(out / "sample_keys" / f"rank-{rank}.txt", "a" if resume_from else "w")

    heldout = None
    if d.val is not None:
        images, keys = load_heldout(d.val, teacher.eval_transform(), d.heldout_samples)
        heldout = (images, targets.heldout(
            keys, lambda embed: embed_all(embed, images, d.eval_batch_size, device, accelerator.autocast)))

    def check_alignment(step: int) -> dict | None:
        if heldout is None:
            return None
        student.eval()
        # Every rank runs it (each holds the whole student); the main process logs it.
        feats = embed_all(lambda x: student(x, pre_logits=pre_logits), heldout[0], d.eval_batch_size, device,
                          accelerator.autocast)
        student.train()
        result = fidelity(feats, heldout[1])
        metrics.log(step, {f"heldout/{k}": v for k, v in result.items()})
        if accelerator.is_main_process:
            plot_alignment(metrics.history(), out / "alignment.png")
        return result

    # -------------------------------------------------------------------- loop
    r = recipe.run
    ga = o.grad_accum
    global_batch = d.batch_size * world * ga
    inject = _nonfinite_steps()
    last_check = None
    if state.step == 0:
        first_check = check_alignment(0)
    else:  # resumed: the start (and the latest check) are in the log
        logged = [h for h in metrics.history() if "heldout/cosine" in h] if accelerator.is_main_process else []
        first_check, last_check = (_heldout(logged[0]), _heldout(logged[-1])) if logged else (None, None)
    if first_check:
        _say(accelerator, "held-out alignment at the start: " + _fmt(first_check))
    bar = tqdm(total=total_steps, initial=state.step, disable=not (accelerator.is_main_process and r.progress),
               desc="bootstrapping", unit="step", dynamic_ncols=True, file=sys.stdout)
    window = new_window()
    last_check, grad_norm = last_check or first_check, float("nan")
    model.train()
    stop_at = total_steps if r.stop_after is None else min(total_steps, r.stop_after)
    phase_end = sum(p.steps for p in phases[:state.phase + 1])
    while state.step < stop_at:
        while state.step >= phase_end and state.phase + 1 < len(phases):  # this phase is over: the next one
            state.phase += 1
            phase_end += phases[state.phase].steps
            if phases[state.phase].steps:
                model, optimizer, scheduler = start_phase(state.phase)
                model.train()
                _say(accelerator, f"step {state.step}: phase {phases[state.phase].name} "
                                  f"({phases[state.phase].steps} steps)")
        phase = phases[state.phase]
        t0 = time.perf_counter()
        wait = 0.0
        skipped = False
        sums = {name: torch.zeros((), device=device) for name in ("loss", "cos", *(t.name for t in phase.terms))}
        for micro in range(ga):
            tw = time.perf_counter()
            images, extras = next(batch_iter)
            wait += time.perf_counter() - tw
            if keys_file is not None:
                keys_file.write("".join(f"{state.epoch}\t{state.step}\t{k}\n" for k in extras["__key__"]))
            batches.consumed()
            images = images.to(device, non_blocking=True)
            with accelerator.autocast(), torch.no_grad():
                target = targets.targets(images, extras, phase.needs)
            sync = accelerator.no_sync(model) if micro < ga - 1 else contextlib.nullcontext()
            with sync:
                output = model(images)
                terms = {t.name: t.fn(output, target) for t in phase.terms}
                loss = sum(t.weight * terms[t.name] for t in phase.terms)
                if state.step in inject:
                    loss = loss * float("nan")
                # Every rank must take the same decision, or DDP's gradient all-reduce would hang.
                bad = torch.tensor(float(not torch.isfinite(loss)), device=device)
                if world > 1:
                    bad = accelerator.reduce(bad, "sum")
                if bad.item() > 0:
                    skipped = True
                    break
                accelerator.backward(loss / ga)
            sums["loss"] += loss.detach()
            for name, value in terms.items():
                sums[name] += value.detach()
            if "embedding" in output and "embedding" in target:
                sums["cos"] += batch_cosine(output["embedding"].detach(), target["embedding"])
        if not skipped:
            if o.grad_clip is not None:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack(
                    [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]))
            grad_norm = float(grad_norm)
            # With fp16 the gradient scaler skips steps with inf gradients itself (and lowers the scale).
            if not math.isfinite(grad_norm) and r.mixed_precision != "fp16":
                skipped = True
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # skipped steps count: the schedule is a function of the step number
        state.step += 1
        state.samples_seen += global_batch
        if skipped:
            state.nonfinite_total += 1
            state.nonfinite_in_row += 1
            _say(accelerator, f"step {state.step - 1}: non-finite loss or gradient, step skipped "
                              f"({state.nonfinite_in_row} in a row, {state.nonfinite_total} in all)")
            if state.nonfinite_in_row >= r.max_nonfinite:
                path = save_checkpoint(accelerator, ckpt_root, state, r.keep_checkpoints, model, optimizer, scheduler)
                raise NonFiniteLossError(
                    f"{state.nonfinite_in_row} steps in a row had a non-finite loss or gradient (run.max_nonfinite="
                    f"{r.max_nonfinite}); stopped at step {state.step}, checkpoint {path}. Lower optim.lr, "
                    f"raise optim.warmup_steps, set optim.grad_clip, or use mixed_precision bf16 instead of fp16; "
                    f"then resume with run.resume={path}")
        else:
            state.nonfinite_in_row = 0
            for name, value in sums.items():
                window["sums"][name] = window["sums"].get(name, 0.0) + value.item() / ga
            window["n"] += 1
        window["time"] += time.perf_counter() - t0
        window["wait"] += wait
        window["images"] += global_batch
        ips = window["images"] / max(window["time"], 1e-9)
        bar.update(1)

        if state.step % r.log_every == 0 or state.step == total_steps:
            n = max(window["n"], 1)
            # Every phase's log line has the same keys; a window of skipped steps only logs NaN losses.
            names = ["loss", "cos", *(t.name for t in phase.terms)]
            stats = torch.tensor([window["sums"][k] / n if k in window["sums"] else float("nan") for k in names],
                                 device=device)
            if world > 1:
                stats = accelerator.reduce(stats, "mean")
            values = {("train/cosine" if k == "cos" else f"train/{k}"): stats[i].item() for i, k in enumerate(names)
                      if k != "cos" or "embedding" in phase.needs}
            values.update({"train/lr": scheduler.get_last_lr()[0], "train/img_per_s": ips,
                           "train/data_wait_frac": window["wait"] / max(window["time"], 1e-9),
                           "train/grad_norm": grad_norm, "train/epoch": state.epoch, "train/phase": state.phase,
                           "train/nonfinite_total": state.nonfinite_total})
            metrics.log(state.step, values)
            postfix = {"loss": f"{values.get('train/loss', float('nan')):.4f}", "img_s": f"{ips:.0f}"}
            if "train/cosine" in values:
                postfix["cos"] = f"{values['train/cosine']:.3f}"
            bar.set_postfix(postfix)
            window = new_window()
        if state.step % r.eval_every == 0 or state.step == total_steps:
            last_check = check_alignment(state.step)
            if last_check and accelerator.is_main_process:
                bar.write(f"step {state.step}: held-out " + _fmt(last_check), file=sys.stdout)
        if state.step % r.checkpoint_every == 0 or state.step == stop_at:
            save_checkpoint(accelerator, ckpt_root, state, r.keep_checkpoints, model, optimizer, scheduler)
    bar.close()
    if keys_file is not None:
        keys_file.close()
    if state.step < total_steps:  # run.stop_after
        _say(accelerator, f"stopped after step {state.step} of {total_steps} (run.stop_after); the same command "
                          f"with run.stop_after=null resumes from {ckpt_root}")
        accelerator.end_training()
        return {"finished": False, "steps": state.step}

    # ------------------------------------------------------------------ outputs
    full = accelerator.get_state_dict(model)  # collective (gathers FSDP shards)
    checksums = rank_checksums(accelerator, model)
    skipped = loader_stats_over_ranks(accelerator, loader.stats)
    summary = {"finished": True}
    if accelerator.is_main_process:
        student_sd = {k.removeprefix("student."): v for k, v in full.items()}
        save_student(accelerator.unwrap_model(model).student, student_sd, out)
        summary = {
            "finished": True, "steps": state.step, "samples_seen": state.samples_seen, "nonfinite_total": state.nonfinite_total,
            "processes": world, "global_batch": global_batch, "seconds": round(time.time() - t_start, 1),
            "heldout_start": first_check, "heldout_end": last_check, "resumed_from": str(resume_from or ""),
            "parameters": policy.counts(),
            "loader": skipped,
            "rank_checksums": checksums,
        }
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=1) + "\n")
        if first_check and last_check:
            print(f"held-out alignment: start {_fmt(first_check)}\n                    end   {_fmt(last_check)}")
        if skipped["skipped"] or skipped["bad_shards"]:
            print(f"data: {skipped['skipped']} sample(s) did not decode and were skipped"
                  + (f", {len(skipped['bad_shards'])} shard(s) turned out unreadable" if skipped["bad_shards"] else "")
                  + f" (over {world} process(es); named in train_summary.json)", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def loader_stats_over_ranks(accelerator, stats) -> dict:
    """The loader's skip counts summed over the ranks, with every skipped sample named (collective)."""
    from accelerate.utils import gather_object

    mine = [{"skipped": stats.skipped, "padded": stats.padded, "skipped_samples": list(stats.skipped_samples),
             "bad_shards": list(stats.bad_shards)}]
    every = gather_object(mine) if accelerator.num_processes > 1 else mine
    return {"skipped": sum(s["skipped"] for s in every), "padded": sum(s["padded"] for s in every),
            "skipped_samples": [k for s in every for k in s["skipped_samples"]],
            "bad_shards": sorted({k for s in every for k in s["bad_shards"]}),
            "per_rank": [s["skipped"] for s in every]}


def rank_checksums(accelerator, model: nn.Module) -> list[str]:
    """SHA-256 of the student's trainable parameters on every rank (collective).

    Data-parallel ranks must hold identical weights; a difference means they diverged (a
    desynchronised step), which the main process reports. Not meaningful with FSDP, where
    each rank holds a shard.
    """
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


def _heldout(record: dict) -> dict:
    return {k.removeprefix("heldout/"): v for k, v in record.items() if k.startswith("heldout/")}


# ----------------------------------------------------------------------------- checks before the work


class ProcessCountError(RuntimeError):
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

    check_shards(resolve_shards(recipe.data.train))
    if recipe.data.val is not None:
        check_shards(resolve_shards(recipe.data.val))
    if recipe.run.final_report:  # the report at the end must not be the first to find its data missing
        for key in ("data", "train_data"):
            source = getattr(recipe.eval, key)
            if source is not None:
                try:
                    check_eval_source(source, f"eval.{key}")
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


# Keys that may change when a run resumes: where and how it runs, not what it computes.
RESUME_SAFE_KEYS = ("run.resume", "run.stop_after", "run.progress", "run.cpu_threads", "run.log_sample_keys",
                    "run.final_report", "run.keep_checkpoints", "run.log_every", "run.eval_every",
                    "run.checkpoint_every", "run.max_nonfinite", "run.output_dir", "data.num_workers",
                    "data.eval_batch_size", "demo.cache_dir", "eval", "export", "name")


def recipe_differences(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, saved, now)`` for every leaf that differs, outside `RESUME_SAFE_KEYS`."""
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        where = f"{prefix}{key}"
        if where in RESUME_SAFE_KEYS:
            continue
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, where + ".")
        elif a != b:
            out.append((where, a, b))
    return out


def check_same_recipe(recipe: Recipe, checkpoint: Path, out: Path) -> None:
    """A run resumes only with the recipe that wrote its checkpoint (up to `RESUME_SAFE_KEYS`)."""
    import yaml

    saved_path = checkpoint.parent.parent / "recipe.yaml"
    if not saved_path.is_file():
        return  # a checkpoint outside a run folder: its weights are checked against the model on load
    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{saved_path} is not valid YAML ({exc}); it describes the checkpoint being resumed") from None
    now = recipe.to_dict()
    if _same_saved_teacher(saved.get("teacher", {}).get("pretrained"), now.get("teacher", {}).get("pretrained")):
        saved["teacher"]["pretrained"] = now["teacher"]["pretrained"]  # a copied run folder names its own copy
    diffs = recipe_differences(saved, now)
    if diffs and checkpoint.parent.parent.resolve() != out.resolve():
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diffs[:8])
        raise RecipeError(f"run.resume={checkpoint} is a checkpoint of another recipe ({saved_path}): {shown}. Resume "
                          f"it with that recipe, or start anew (run.resume=none)")
    if diffs:
        shown = "; ".join(f"{k}: {a!r} in {saved_path}, {b!r} now" for k, a, b in diffs[:8])
        more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
        raise RecipeError(
            f"{out} holds a run of another recipe, so it cannot be resumed with this one: {shown}{more}. Use another "
            f"run.output_dir for the new recipe, or run.resume=none to start {out} anew (its checkpoints are "
            f"kept aside), or resume with the saved recipe: accelerate launch bootstrap/run.py {saved_path}")


def _same_saved_teacher(saved: Any, now: Any) -> bool:
    """Both name a run's saved random teacher (teacher_weights.safetensors), the same one or a copy."""
    import filecmp

    if not (isinstance(saved, str) and isinstance(now, str)):
        return False
    a, b = Path(saved), Path(now)
    if a.name != "teacher_weights.safetensors" or b.name != a.name or not b.is_file():
        return False
    return not a.is_file() or filecmp.cmp(a, b, shallow=False)


def finished_summary(out: Path, checkpoint_step: int, steps: int) -> dict | None:
    """The summary of a run that already ended at `steps` (its outputs written), else None."""
    path = out / "train_summary.json"
    if checkpoint_step < steps or not path.is_file() or not (out / "student.safetensors").is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return summary if summary.get("finished") and summary.get("steps") == steps else None


def set_aside_old_checkpoints(ckpt_root: Path, accelerator) -> None:
    """A run started anew (run.resume=none) in a folder with checkpoints keeps them, renamed, so that
    the old run's later steps are never taken for the new run's (run.resume=auto picks the highest)."""
    if not list_checkpoints(ckpt_root):
        return
    aside = ckpt_root.with_name(f"checkpoints.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(ckpt_root, aside)
    _say(accelerator, f"run.resume=none: the folder's earlier checkpoints were moved to {aside} (delete it to free "
                      f"the space)")


def _fmt(result: dict) -> str:
    return (f"cosine {result['cosine']:.4f}, centred cosine {result['centred_cosine']:.4f}, "
            f"retrieval top-1 {result['retrieval_top1']:.3f} (chance {result['retrieval_chance']:.3f})")


def save_teacher_weights(teacher, out: Path) -> Path:
    """A random-weight teacher's weights, saved so that the run's recipe.yaml names them."""
    from safetensors.torch import save_file

    path = out / "teacher_weights.safetensors"
    if not path.exists():
        tmp = out / "teacher_weights.safetensors.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in teacher.model.state_dict().items()}, str(tmp))
        os.replace(tmp, path)
    return path


def save_student(student: nn.Module, state_dict: dict, out: Path) -> None:
    """student.safetensors, student_config.json and pretrained_cfg.json (written atomically)."""
    from safetensors.torch import save_file

    # Copies: safetensors refuses tensors that share storage (a Sparsifiner with share_inout_proj).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    tmp = out / "student.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "student.safetensors")
    (out / "student_config.json").write_text(student.config.to_json())
    (out / "pretrained_cfg.json").write_text(json.dumps(getattr(student, "pretrained_cfg", {}), indent=1) + "\n")
