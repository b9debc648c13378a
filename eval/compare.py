"""One report of the trade-off: a teacher, its bootstrapped and supervised students, Token Merging and the teacher
at the students' token budgets, side by side.

    python -m eval.compare RUN_DIR [RUN_DIR ...] [--tome R,R,...] [--budget N,N,...|none] [--out DIR] [eval options]

The runs must share their teacher (a run folder as ``python -m eval`` reads it: student, recipe
with the teacher spec and ``eval:`` options; the first run's ``eval:`` options apply, the
command line overrides them as for ``python -m eval``); a run that trained with labels alone,
without a teacher, joins any comparison. Every model sees the same images, in one process, in
one pass: the teacher, each run's student (and the EMA of its weights, where the run kept one),
the teacher with ToMe (``eval.baselines.tome``) at each ``r``, and the teacher untrained at each
token budget (``eval.baselines.budget``: at a lower resolution, with a larger resampled patch, and
keeping that many patch tokens at random; ``--budget`` defaults to the students' own token counts
below the teacher's patch count). For each: held-out fidelity to the teacher (cosine, centred
cosine, retrieval), zero-shot (CLIP teachers) or classification through the head (supervised
teachers, and students trained with labels by their own head), linear probe, counted GFLOPs,
measured img/s and peak memory.

Writes into ``--out`` (default: ``compare`` beside the first run folder) ``compare.md`` (the
table, the picture, notes), ``compare.json`` (every section per model) and ``pareto.png``
(fidelity and accuracy against GFLOPs and against img/s); each run's own ``report.md`` gets
a link to it.

Python: ``compare(models, teacher, eval_source, tome=[4, 8], budgets=[49])`` for live models (``budgets=None``:
the students' token counts), ``compare_runs([run_dir, ...], tome=[4, 8])`` for run folders.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from data.digest import file_sha256
from data.errors import UserError
from data.evalsets import check_eval_source
from data.outputs import replacing, write_text
from students import family_of
from students.run_folder import RunFolder, RunFolderError

from .baselines.budget import budget_baselines
from .baselines.tome import ToMe
from .baselines.video import budget_baselines as video_baselines
from .bench import TEACHER, Candidate, bench_media, image_tower, jsonable, run_bench, student_candidate
from .options import EvalConfig, add_eval_options, eval_options
from .report import _num, _pct, run_eval_options, write_report


class CompareError(UserError, ValueError):
    """Runs or options that cannot be compared in one report."""


# ----------------------------------------------------------------------------- compare
def compare(models: Mapping[str, nn.Module], teacher, eval_source=None, *, tome: Sequence = (),
            budgets: Sequence[int] | None = (), out_dir: str | os.PathLike | None = None, config: EvalConfig | Mapping[str, Any] | None = None,
            sources: Mapping[str, str] | None = None, notes: Sequence[str] = (), progress: bool = True,
            allow_pipe: bool = False, emas: Mapping[str, nn.Module] | None = None, **options) -> dict:
    """Compare ``teacher`` (None: students trained without one), its students ``models`` (name -> student; with
    ``emas``, name -> the EMA of that student's weights, shown as ``NAME (EMA)``), ToMe at each ``r`` in ``tome``
    (an int per block or a list per block) and the teacher at each token budget in ``budgets`` (``None``: the
    students' own token counts, `student_budgets`), on the same images (`eval.bench`).

    ``sources``: where each model came from (run folders), ``notes``: lines for the report. Returns the report;
    with ``out_dir`` writes ``compare.md``, ``compare.json`` and ``pareto.png`` there.
    """
    cfg = config if isinstance(config, EvalConfig) else EvalConfig.from_dict(config)
    cfg = cfg.replace(data=eval_source, **options)
    if TEACHER in models:
        raise CompareError(f"a student cannot be named '{TEACHER}'")
    if teacher is None and tome:
        raise CompareError("ToMe merges the teacher's tokens: the runs compared have no teacher")
    if teacher is None and budgets:
        raise CompareError("the budget baselines run the teacher at fewer tokens: the runs compared have no teacher "
                           "(leave --budget out)")
    candidates = []
    for name, model in models.items():
        candidates.append(student_candidate(name, model, (sources or {}).get(name)))
        if (emas or {}).get(name) is not None:
            candidates.append(student_candidate(f"{name} (EMA)", emas[name], (sources or {}).get(name), shadow=name))
    notes = list(notes)
    media = bench_media(candidates, cfg)
    if media.video:
        if tome:
            raise CompareError("--tome merges the tokens of images: for video students the comparison adds its own "
                               "baselines at the student's budget (the teacher on fewer frames, and with random "
                               "patch dropping); drop --tome")
        first = next(c for c in candidates if c.kind == "student")
        baselines, why = video_baselines(teacher, first.model, media.frames, teacher.preprocess.size)
        for m in baselines:
            candidates.append(Candidate(m.name, "baseline", m, image_tower(teacher), dict(
                method="random" if m.keep else "frames", frames=m.frames, keep=m.keep, budget_of=first.name,
                tokens=f"{m.keep + teacher.num_prefix_tokens} per frame" if m.keep else None)))
        notes += [f"baselines at the budget of {first.name}: {', '.join(m.name for m in baselines)}", *why]
    for r in tome:
        m = ToMe(teacher, r)  # a bad r fails here, before any work
        candidates.append(Candidate(m.name, "tome", m, image_tower(teacher), dict(
            r=m.requested, schedule=m.schedule, token_counts=m.token_counts,
            tokens=f"{teacher.num_prefix_tokens + teacher.num_patches} -> {m.token_counts[-1]}")))
        if m.schedule != ([m.requested] * teacher.depth if isinstance(m.requested, int) else m.requested):
            notes.append(f"{m.name}: a block merges at most half of the patch tokens it receives (as in ToMe), "
                         f"so it merges {m.schedule} per block")
    if media.video and budgets:
        raise CompareError("--budget runs the teacher on images at a token budget: for video students the comparison "
                           "adds its own baselines at the student's budget (fewer frames, random patch dropping); "
                           "drop --budget")
    if media.video:
        budgets = []
    elif budgets is None and teacher is None:  # runs trained with labels alone: no teacher to hold to a budget
        budgets = ()
    elif budgets is None:
        budgets = student_budgets(models, teacher)
        if models and not budgets:
            notes.append(f"no student has fewer tokens than the teacher's {teacher.num_patches} patches: no budget "
                         f"baselines (--budget N adds them)")
    for m in budget_baselines(teacher, budgets):  # a bad budget fails here, before any work
        candidates.append(Candidate(m.name, "baseline", m, image_tower(teacher), m.describe()))
    bench = run_bench(teacher, candidates, cfg, progress=progress, notes=notes, allow_pipe=allow_pipe)
    report: dict[str, Any] = dict(
        teacher=bench.teacher, device=bench.device, config=bench.config, notes=bench.notes,
        models={} if teacher is None else
        {TEACHER: dict(kind="teacher", tokens=str(teacher.num_prefix_tokens + teacher.num_patches)
                       + (" per frame" if bench.media.get("kind") == "video" else ""))})
    for c in candidates:
        report["models"][c.name] = dict(kind=c.kind, **({"source": c.info.get("source")} if c.kind == "student" else {}),
                                        **{k: v for k, v in c.info.items() if k != "source"})
    if bench.eval_set is not None:
        report["eval_set"] = {k: bench.eval_set[k] for k in ("source", "num_images", "num_classes")}
    if bench.zero_shot:
        any_result = next(iter(bench.zero_shot.values()))
        report["zero_shot"] = _accuracy_section(bench.zero_shot, templates=any_result["templates"],
                                                num_templates=any_result["num_templates"])
    if bench.classification:
        report["classification"] = _accuracy_section(bench.classification)
    if bench.fidelity:
        report["fidelity"] = bench.fidelity
    if bench.probe is not None:
        report["linear_probe"] = bench.probe
    if bench.retrieval:
        report["retrieval"] = bench.retrieval
    if bench.cost is not None:
        report["cost"] = bench.cost
    report["media"] = bench.media
    report["table"] = _table(report)
    report = jsonable(report)
    if out_dir is not None:
        write_compare(report, out_dir)
    return report


def student_budgets(models: Mapping[str, nn.Module], teacher) -> list[int]:
    """The students' token counts (their family's `num_latent_tokens`: the tokens besides the class token) below the
    teacher's patch count: the budgets to hold the teacher to, untrained."""
    counts = set()
    for model in models.values():
        try:
            family = family_of(model)
        except TypeError:  # not a student (e.g. a teacher standing in for one)
            continue
        counts.add(family.vision.describe(model.config.to_dict())["num_latent_tokens"])
    return sorted(n for n in counts if 0 < n < teacher.num_patches)


def _accuracy_section(per: Mapping[str, dict], **extra) -> dict:
    """{teacher: {top1, top5}, NAME: {top1, top5, agreement}, chance_top1, num_images, num_classes} from each
    model's teacher-vs-model result."""
    any_result = next(iter(per.values()))
    teacher = next((r["teacher"] for r in per.values() if r.get("teacher")), None)
    section = {} if teacher is None else {TEACHER: dict(teacher)}  # where the teacher predicts these classes too
    section.update({n: dict(r["student"], agreement=r["agreement"]) for n, r in per.items()})
    return dict(models=section, chance_top1=any_result["chance_top1"], num_images=any_result["num_images"],
                num_classes=any_result["num_classes"], **extra)


def _table(report: Mapping[str, Any]) -> list[dict]:
    """One row per model: the numbers of the markdown table and the picture."""
    zero_shot, head = report.get("zero_shot"), report.get("classification")
    accuracy = zero_shot or head  # top1: zero-shot where the teacher has a text tower, else the heads'; and both
    probe, fid, cost = report.get("linear_probe"), report.get("fidelity", {}), report.get("cost", {})
    teacher_cost = cost.get(TEACHER, {})
    rows = []
    short = [Path(name).name if info["kind"] == "student" else name for name, info in report["models"].items()]
    for (name, info), label in zip(report["models"].items(), short):
        latent = info.get("latent_tokens")
        tokens = info.get("tokens") or (f"{latent} latent" + (" + cls" if info.get("cls_token") else "") if latent
                                        else None)
        row = dict(model=name, label=label if short.count(label) == 1 else name, kind=info["kind"], tokens=tokens)
        if info.get("method"):
            row["method"] = info["method"]
        if accuracy:
            mine = accuracy["models"].get(name, {})
            row["top1"] = mine.get("top1")
            row["agreement"] = mine.get("agreement", 1.0 if name == TEACHER and mine else None)
        if zero_shot and head:
            row["head_top1"] = head["models"].get(name, {}).get("top1")
        if probe:
            row["probe_top1"] = probe[name]["top1"]
        if name in fid:
            row.update({k: fid[name][k] for k in ("cosine", "centred_cosine", "retrieval_top1")})
        if name in report.get("retrieval", {}):
            row["text_r1"] = report["retrieval"][name]["text_to_video"]["R@1"]
        c = cost.get(name) or cost.get(info.get("ema_of"))  # an EMA costs what its student costs
        if c:
            row.update(params_m=c["params"] / 1e6, gflops=c["gflops"], images_per_s=c.get("images_per_s"),
                       peak_mb=c.get("peak_mb"))
            if teacher_cost:
                row["flops_vs_teacher"] = teacher_cost["gflops"] / c["gflops"] if c["gflops"] else None
            if c.get("images_per_s") and teacher_cost.get("images_per_s"):
                row["speed_vs_teacher"] = c["images_per_s"] / teacher_cost["images_per_s"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- writing
def _accuracy_axis(report: Mapping[str, Any]) -> tuple[str, str] | None:
    """(row key, label) of the accuracy the picture shows: zero-shot, head, else linear-probe top-1."""
    if "zero_shot" in report:
        return "top1", "zero-shot top-1"
    if "classification" in report:
        return "top1", "head top-1"
    return ("probe_top1", "linear-probe top-1") if "linear_probe" in report else None


def to_markdown(report: Mapping[str, Any], picture: str | None = None) -> str:
    t = report["teacher"]
    video = (report.get("media") or {}).get("kind") == "video"
    unit = "clip" if video else "image"
    if t is None:
        lines = ["# Comparison of students trained without a teacher", "",
                 f"Device: {report['device']}. Every model saw the same images in one process."]
    else:
        lines = [f"# Comparison on {t['kind']}:{t['name']} ({t['family']})", "",
                 f"Teacher: {t['depth']} blocks of width {t['width']}, {t['num_patches']} patches at "
                 f"{t['image_size'][0]}x{t['image_size'][1]}{' per frame' if video else ''}. Device: "
                 f"{report['device']}. Every model saw the same {'videos' if video else 'images'} in one process."]
    if "eval_set" in report:
        e = report["eval_set"]
        lines.append(f"Evaluation set: `{e['source']}`, {e['num_images']} {'videos' if video else 'images'}, "
                     f"{e['num_classes']} classes.")
    lines.append("")
    cols = [("model", "model", str), ("tokens", "tokens", lambda v: "–" if v is None else str(v))]
    acc = "zero-shot top-1" if "zero_shot" in report else "head top-1" if "classification" in report else None
    if acc:
        cols += [("top1", acc, _pct)] + ([("agreement", "same top-1 as teacher", _pct)] if t is not None else [])
    if "zero_shot" in report and "classification" in report:
        cols.append(("head_top1", "head top-1", _pct))
    if "linear_probe" in report:
        cols.append(("probe_top1", "linear probe top-1", _pct))
    if "fidelity" in report:
        cols += [("cosine", "cosine", lambda v: _num(v, 4)), ("centred_cosine", "centred cosine", lambda v: _num(v, 4)),
                 ("retrieval_top1", "retrieval top-1", _pct)]
    if "retrieval" in report:
        cols.append(("text_r1", "text -> video R@1", _pct))
    if "cost" in report:
        cols += [("gflops", "GFLOPs per clip" if video else "GFLOPs", _num),
                 ("flops_vs_teacher", "FLOPs ÷", lambda v: _num(v) + "x" if v else "–"),
                 ("images_per_s", "clips/s" if video else "img/s", lambda v: _num(v, 1)),
                 ("speed_vs_teacher", "speed ×", lambda v: _num(v) + "x" if v else "–"),
                 ("peak_mb", "peak MB", lambda v: _num(v, 1)), ("params_m", "params (M)", _num)]
    lines += ["| " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    for row in report["table"]:
        lines.append("| " + " | ".join(fmt(row.get(key)) for key, _, fmt in cols) + " |")
    lines.append("")
    if "cost" in report:
        c = report["cost"].get(TEACHER) or next(iter(report["cost"].values()))
        lines.append(f"Cost: batch {c['batch_size']} at {c['image_size'][0]}x{c['image_size'][1]} on {c['device']}; "
                     f"GFLOPs per {unit} counted with torch's FlopCounterMode (2 per multiply-add); FLOPs ÷: the "
                     f"teacher's GFLOPs over the model's; speed ×: {unit}s/s over the teacher's; peak MB: weights + "
                     f"activations.")
    if "fidelity" in report:
        lines.append("Fidelity: each model's embedding against the teacher's on the same image (centred: teacher "
                     "mean removed; retrieval: the image's own teacher embedding is the nearest of the set's).")
    if "zero_shot" in report:
        z = report["zero_shot"]
        lines.append(f"Zero-shot: the teacher's text tower, {z['templates']} templates ({z['num_templates']} prompts "
                     f"per class); chance {_pct(z['chance_top1'])}.")
    if "linear_probe" in report:
        p = report["linear_probe"]
        lines.append(f"Linear probe: {p['split']}; chance {_pct(p['chance_top1'])}.")
    if video and "cost" in report:
        c = report["cost"][TEACHER]
        lines.append(f"Video: clips of {c['frames']} frames, {c['views']} view(s) per video (a video costs views x "
                     f"GFLOPs per clip); the teacher embeds every frame and averages.")
    if video and any(info["kind"] == "baseline" for info in report["models"].values()):
        lines.append("Baselines: the teacher on fewer frames (spread over the clip), and the teacher on every frame "
                     "keeping a random subset of each frame's patch tokens, each at most the student's GFLOPs per "
                     "clip (eval.baselines.video).")
    if any(info["kind"] == "tome" for info in report["models"].values()):
        lines.append("ToMe: Token Merging (Bolya et al., ICLR 2023) on the teacher, training-free: r tokens merged "
                     "per block (bipartite soft matching on the keys, size-weighted, proportional attention); "
                     "tokens: entering the first block -> leaving the last.")
    if not video and any(info["kind"] == "baseline" for info in report["models"].values()):
        lines.append("Budget baselines: the teacher untrained at a token budget (patch tokens; the class token and "
                     "registers on top): `teacher at S px`, the images resized to S px, the position embedding "
                     "interpolated as timm does (`resample_abs_pos_embed`); `teacher patch P`, the patch embedding "
                     "resampled to P px (`resample_patch_embed`, FlexiViT); `teacher random N`, N of its patch "
                     "tokens kept at random per image (seeded).")
    lines.append("")
    if picture:
        lines += [f"![fidelity and accuracy against cost]({picture})", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def draw_pareto(report: Mapping[str, Any], path: str | os.PathLike) -> str | None:
    """pareto.png: fidelity (centred cosine) and accuracy against GFLOPs and against img/s; the
    models no other beats on both axes are joined. None where there is nothing to plot."""
    rows = [r for r in report["table"] if r.get("gflops") is not None and r.get("centred_cosine") is not None]
    if not rows:
        return None
    metric_rows = [("centred_cosine", "fidelity: centred cosine")]
    if _accuracy_axis(report):
        metric_rows.append(_accuracy_axis(report))
    from matplotlib.figure import Figure

    unit = "clip" if (report.get("media") or {}).get("kind") == "video" else "image"
    x_axes = [("gflops", f"GFLOPs per {unit} (lower is cheaper)", False)]
    if all(r.get("images_per_s") for r in rows):
        x_axes.append(("images_per_s", f"{unit}s / s (higher is faster)", True))
    fig = Figure(figsize=(5.2 * len(x_axes), 4.2 * len(metric_rows)), dpi=110)
    style = {"teacher": dict(marker="*", s=180, color="black"), "student": dict(marker="o", s=60, color="tab:blue"),
             "tome": dict(marker="s", s=45, color="tab:orange")}
    baseline_style = {"resolution": dict(marker="^", label="teacher, lower resolution"),
                      "patch": dict(marker="v", label="teacher, larger patch"),
                      "random": dict(marker="X", label="teacher, random tokens"),
                      "frames": dict(marker="<", label="teacher, fewer frames")}
    for i, (ykey, ylabel) in enumerate(metric_rows):
        for j, (xkey, xlabel, higher_better) in enumerate(x_axes):
            ax = fig.add_subplot(len(metric_rows), len(x_axes), i * len(x_axes) + j + 1)
            pts = [(r[xkey], r[ykey], r) for r in rows if r.get(ykey) is not None]
            for kind, kw in style.items():
                sel = [p for p in pts if p[2]["kind"] == kind]
                if sel:
                    ax.scatter([p[0] for p in sel], [p[1] for p in sel], label=kind if kind != "tome" else "ToMe",
                               zorder=3, **kw)
            teacher = [p for p in pts if p[2]["kind"] == "teacher"]
            for method, kw in baseline_style.items():
                sel = [p for p in pts if p[2]["kind"] == "baseline" and p[2].get("method") == method]
                if sel:
                    ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=50, color="tab:green", zorder=3, **kw)
                    _join(ax, sel + teacher, "tab:green")
            _join(ax, [p for p in pts if p[2]["kind"] == "tome"] + teacher, "tab:orange")
            front = _frontier(pts, higher_better)
            ax.plot([p[0] for p in front], [p[1] for p in front], ls="--", color="grey", zorder=1,
                    label="Pareto front")
            for x, y, r in pts:
                ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7, loc="lower right")
    t = report["teacher"]
    fig.suptitle(f"{t['kind']}:{t['name']}: teacher, students and training-free baselines on the same {unit}s",
                 fontsize=10)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp)
    return str(path)


def _join(ax, points, color: str) -> None:
    """One family of points (a baseline at its budgets, and the teacher they start from) joined in x order."""
    points = sorted(points, key=lambda p: p[0])
    if len(points) > 1:
        ax.plot([p[0] for p in points], [p[1] for p in points], color=color, alpha=0.4, zorder=2)


def _frontier(points, higher_x_better: bool):
    """The points no other point beats on both axes (y: higher is better), in x order."""
    key = (lambda p: (-p[0], -p[1])) if higher_x_better else (lambda p: (p[0], -p[1]))
    front, best = [], -float("inf")
    for p in sorted(points, key=key):
        if p[1] > best:
            front.append(p)
            best = p[1]
    return sorted(front, key=lambda p: p[0])


def write_compare(report: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """compare.json, compare.md and pareto.png into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out_dir / "compare.json", markdown=out_dir / "compare.md")
    picture = draw_pareto(report, out_dir / "pareto.png")
    if picture:
        paths["picture"] = Path(picture)
    write_text(paths["json"], json.dumps(jsonable(report), indent=1) + "\n")
    write_text(paths["markdown"], to_markdown(report, "pareto.png" if picture else None))
    return {k: str(v) for k, v in paths.items()}


def link_reports(run_dirs: Sequence[str | os.PathLike], compare_md: str | os.PathLike) -> list[str]:
    """Point each run's own report (report.json / report.md, where there is one) to the comparison."""
    linked = []
    for run_dir in map(Path, run_dirs):
        path = run_dir / "report.json"
        if not path.is_file():
            continue
        report = json.loads(path.read_text())
        report["compare"] = os.path.relpath(compare_md, run_dir)
        write_report(report, run_dir)
        linked.append(str(run_dir / "report.md"))
    return linked


# ----------------------------------------------------------------------------- runs
def _teacher_identity(spec: Mapping[str, Any]) -> dict:
    """What makes two teacher specs the same teacher: not the cache folder; of a weights file, its contents
    (a run of a random teacher saves the teacher's weights in its own folder)."""
    spec = {k: v for k, v in spec.items() if k != "cache_dir"}
    pretrained = spec.get("pretrained")
    if isinstance(pretrained, str) and os.path.isfile(pretrained):
        spec["pretrained"] = _file_digest(os.path.realpath(pretrained))
    return json.loads(json.dumps(spec, sort_keys=True, default=str))


@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    return f"sha256:{file_sha256(path)}"


def compare_runs(run_dirs: Sequence[str | os.PathLike], tome: Sequence = (), budgets: Sequence[int] | None = None,
                 out_dir: str | os.PathLike | None = None,
                 eval_source=None, progress: bool = True, link: bool = True, allow_pipe: bool = False,
                 **options) -> dict:
    """``compare`` for the students of bootstrapping runs that share a teacher (see the module docstring);
    ``budgets`` None: the students' token counts."""
    if not run_dirs:
        raise CompareError("give at least one run folder")
    names = [str(d) for d in run_dirs]
    if len(set(map(os.path.realpath, names))) != len(names):
        raise CompareError(f"a run folder is given twice: {' '.join(names)}")
    folders = {}
    for name in names:
        try:
            folders[name] = RunFolder.finished(name)
            if folders[name].has_teacher():
                folders[name].check_teacher_rebuildable()
        except RunFolderError as exc:  # e.g. a random teacher, which cannot be rebuilt
            raise CompareError(str(exc)) from exc
    first = names[0]
    specs = {name: folder.teacher_spec() for name, folder in folders.items() if folder.has_teacher()}
    with_teacher = list(specs)  # runs with labels alone have none: they join any comparison
    for name in with_teacher[1:]:
        if _teacher_identity(specs[name]) != _teacher_identity(specs[with_teacher[0]]):
            raise CompareError(
                f"{with_teacher[0]} and {name} have different teachers: {json.dumps(specs[with_teacher[0]], default=str)} "
                f"vs {json.dumps(specs[name], default=str)}; eval.compare compares the students of one "
                f"teacher (compare each group of runs on its own)")
    cfg = run_eval_options(folders[first])
    source = eval_source if eval_source is not None else cfg.data
    checked = cfg.replace(**options)
    if source is not None:  # before any model is built
        check_eval_source(source, "evaluation data", allow_pipe)
        if checked.probe and checked.train_data is not None:
            check_eval_source(checked.train_data, "linear-probe train data", allow_pipe)
    teacher = folders[with_teacher[0]].build_teacher() if with_teacher else None
    students = {name: folder.load_student() for name, folder in folders.items()}
    emas = {name: folder.load_student_ema() for name, folder in folders.items()}
    out_dir = Path(out_dir) if out_dir is not None else Path(first).parent / "compare"
    notes = []
    evals = {name: folder.recipe().get("eval") or {} for name, folder in folders.items()}
    if any(evals[n] != evals[first] for n in names):
        notes.append(f"the runs' eval: options differ; those of {first} were used")
    report = compare(students, teacher, source, tome=tome, budgets=budgets, out_dir=out_dir, config=cfg,
                     sources={n: n for n in names}, notes=notes, progress=progress, allow_pipe=allow_pipe, emas=emas,
                     **options)
    if link:
        link_reports(names, out_dir / "compare.md")
    return report


# ----------------------------------------------------------------------------- command line
def _tome_list(value: str) -> list[int]:
    try:
        rs = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tome takes comma-separated ints (tokens merged per block), got {value!r}")
    if not rs:
        raise argparse.ArgumentTypeError("--tome needs at least one r, e.g. --tome 4,8,12")
    return rs


def _budget_list(value: str) -> list[int]:
    if value.strip().lower() == "none":
        return []
    try:
        budgets = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget takes comma-separated ints (patch tokens) or 'none', got {value!r}")
    if not budgets:
        raise argparse.ArgumentTypeError("--budget needs at least one token count, e.g. --budget 49,64, or 'none'")
    return budgets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="bootstrapping run folders sharing a teacher")
    p.add_argument("--tome", type=_tome_list, default=[],
                   help="Token Merging on the teacher at each r (tokens merged per block), e.g. 4,8,12")
    p.add_argument("--budget", type=_budget_list, default=None,
                   help="the teacher, untrained, at each token budget (patch tokens): at a lower resolution, with a "
                        "larger resampled patch and with random tokens, e.g. 49,64; 'none' for none (default: the "
                        "students' own token counts)")
    p.add_argument("--out", help="report folder (default: 'compare' beside the first run folder)")
    p.add_argument("--overwrite", action="store_true", help="replace a comparison already in the report folder")
    add_eval_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run_dirs[0]).parent / "compare"
    held = [name for name in ("compare.json", "compare.md", "pareto.png") if (out / name).exists()]
    if held and not args.overwrite:  # before any work: a comparison is never replaced unasked
        raise SystemExit(f"error: {out} already holds a comparison ({', '.join(held)}); pass --overwrite to replace "
                         f"it, or --out DIR for another folder")
    try:
        report = compare_runs(args.run_dirs, tome=args.tome, budgets=args.budget, out_dir=out, eval_source=args.data,
                              progress=not args.no_progress, allow_pipe=args.allow_pipe, **eval_options(args))
    except (UserError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(to_markdown(report, None))
    print(f"comparison written to {out / 'compare.md'}, {out / 'compare.json'}"
          + (f" and {out / 'pareto.png'}" if (out / "pareto.png").is_file() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
