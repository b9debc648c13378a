"""One evaluation report per student, teacher and student side by side: the bench (`eval.bench`) with one
student.

``evaluate(student, teacher, eval_source, out_dir=...)`` runs what the teacher can do, on the same images for
both models: zero-shot (a teacher with a text tower), classification through the head (a teacher with a
classifier; a student trained with labels, by its own head), a linear probe, fidelity and cost, and the pictures
and sections of the student's family
(`rois.png` of a SparseFormer, `kept_keys.png` and the attention cost of a Sparsifiner); and writes
``report.json`` and ``report.md`` (tables with teacher, student and student/teacher columns) into ``out_dir``.
Without an evaluation set only the cost is measured. A section that cannot run says why under ``notes``.
Images that do not decode are skipped, counted and named (``eval_set.skipped``, ``linear_probe.train_skipped``,
and in ``report.md``). With a separate train split the probe matches the two sets' labels by class name: the
evaluation set may hold some of its classes, and one it lacks is an error, given before any feature is
computed. With ``ema`` (the EMA of the student's weights) every section has an EMA column beside the student's;
without a teacher (a student trained with labels alone) the sections that need one are left out.

``evaluate_run(run_dir)`` evaluates a bootstrapping run's output folder (`students.run_folder.RunFolder`): its
student against its teacher (whose spec must name the teacher's weights: a random teacher cannot be rebuilt),
with the recipe's ``eval:`` options (`eval.options.EvalConfig`), and the EMA of its weights where the run kept one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn

from students import FAMILIES
from data.outputs import write_text
from students.run_folder import RunFolder

from .bench import TEACHER, jsonable, run_bench, student_candidate
from .options import EvalConfig

__all__ = ["EvalConfig", "evaluate", "evaluate_run", "headline", "load_run", "prepare_out_dir", "to_markdown",
           "write_report"]

STUDENT, EMA = "student", "student_ema"


def evaluate(student: nn.Module, teacher, eval_source=None, out_dir: str | os.PathLike | None = None,
             config: EvalConfig | Mapping[str, Any] | None = None, progress: bool = True, allow_pipe: bool = False,
             ema: nn.Module | None = None, **options) -> dict:
    """Evaluate ``student`` (and ``ema``, the EMA of its weights) against ``teacher`` (None: on its own); see the
    module docstring; returns the report dict.

    ``eval_source`` (or ``config.data``) is the labelled evaluation set; ``options`` are
    ``EvalConfig`` fields overriding ``config``. With ``out_dir`` the report files are written.
    ``allow_pipe`` lets ``pipe:`` shard URLs run their commands.
    """
    cfg = config if isinstance(config, EvalConfig) else EvalConfig.from_dict(config)
    cfg = cfg.replace(data=eval_source, **options)
    out_dir = prepare_out_dir(out_dir) if out_dir is not None else None
    candidate = student_candidate(STUDENT, student)
    candidates = [candidate] + ([] if ema is None else [student_candidate(EMA, ema, shadow=STUDENT)])
    bench = run_bench(teacher, candidates, cfg, pictures_dir=out_dir, progress=progress, allow_pipe=allow_pipe)
    info = {k: v for k, v in candidate.info.items() if k != "source"}
    if candidate.classes is not None:
        info["classes"] = len(candidate.classes)
    report: dict[str, Any] = dict(teacher=bench.teacher, student=info, config=bench.config, device=bench.device,
                                  notes=bench.notes, ema=ema is not None)
    if bench.eval_set is not None:
        report["eval_set"] = bench.eval_set
    if STUDENT in bench.zero_shot:
        report["zero_shot"] = _with_ema(bench.zero_shot)
    if STUDENT in bench.classification:
        report["classification"] = _with_ema(bench.classification)
    if STUDENT in bench.fidelity:
        report["fidelity"] = bench.fidelity[STUDENT]
        if EMA in bench.fidelity:
            report["fidelity_ema"] = bench.fidelity[EMA]
    if bench.probe is not None:
        report["linear_probe"] = bench.probe
    if STUDENT in bench.retrieval:
        report["retrieval"] = {"teacher": bench.retrieval[TEACHER], "student": bench.retrieval[STUDENT]}
    report["media"] = bench.media
    report.update(bench.pictures.get(STUDENT, {}))
    report.update(bench.sections.get(STUDENT, {}))
    if bench.cost is not None:
        report["cost"] = bench.cost
    report = jsonable(report)
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def _with_ema(per: Mapping[str, dict]) -> dict:
    """The student's teacher-vs-student result, with the EMA's accuracy and agreement beside it."""
    section = dict(per[STUDENT])
    if EMA in per:
        section[EMA] = per[EMA]["student"]
        section["agreement_ema"] = per[EMA]["agreement"]
    return section


# ----------------------------------------------------------------------------- writing
def prepare_out_dir(out_dir: str | os.PathLike) -> Path:
    """Create the report folder (before any work), or fail naming it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"the report folder {out_dir} is a file; give another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exn:
        raise OSError(f"cannot create the report folder {out_dir}: {exn.strerror or exn}; give another --out") \
            from exn
    return out_dir


def write_report(report: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out_dir / "report.json", markdown=out_dir / "report.md")
    write_text(paths["json"], json.dumps(jsonable(report), indent=1) + "\n")
    write_text(paths["markdown"], to_markdown(report))
    return {k: str(v) for k, v in paths.items()}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def _num(x, digits=2) -> str:
    if x is None:
        return "–"
    if 0 < abs(x) < 10 ** -(digits - 1):  # tiny models: keep three significant digits
        return f"{x:.3g}"
    return f"{x:,.{digits}f}"


def _ratio(s, t) -> str:
    return "–" if s is None or t is None or not t else f"{s / t:.3f}"


def _side_by_side(rows: Sequence[tuple], teacher: bool = True, ema: bool = False) -> list[str]:
    """A table of ``(name, fmt, teacher value, student value[, EMA value])`` rows: teacher, student, the student's
    EMA and student / teacher columns (those that apply)."""
    heads = (["teacher"] if teacher else []) + ["student"] + (["student (EMA)"] if ema else []) + \
        (["student / teacher"] if teacher else [])
    lines = ["| | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name, fmt, t, s, *e in rows:
        cells = ([fmt(t)] if teacher else []) + [fmt(s)] + ([fmt(e[0] if e else None)] if ema else []) + \
            ([_ratio(s, t)] if teacher else [])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _accuracy_table(section: Mapping[str, Any], teacher: bool = True) -> list[str]:
    t, s, e = section.get("teacher") or {}, section["student"], section.get(EMA)
    rows = [(f"top-{k}", _pct, t.get(f"top{k}"), s.get(f"top{k}"), (e or {}).get(f"top{k}")) for k in (1, 5)
            if f"top{k}" in s]
    return _side_by_side(rows, teacher=teacher, ema=e is not None)


def _agreement_line(section: Mapping[str, Any], detail: str = "") -> str:
    """The agreement of student (and EMA) with the teacher where the teacher predicts too, and the chance level."""
    chance = f"Chance top-1: {_pct(section['chance_top1'])}{detail}."
    if section.get("agreement") is None:
        return chance
    ema = f" (EMA: {_pct(section['agreement_ema'])})" if section.get("agreement_ema") is not None else ""
    return f"Agreement (same top-1 prediction): {_pct(section['agreement'])}{ema}. {chance}"


def _skipped_line(skipped, which: str, show: int = 10) -> str:
    """`` N unreadable <which> images skipped: `a` (error), ...`` or ``""``."""
    if not skipped:
        return ""
    n = len(skipped)
    named = ", ".join(f"`{s['name']}` ({s['error']})" for s in skipped[:show])
    more = f", and {n - show} more (all in report.json)" if n > show else ""
    return f" {n} unreadable {which} image{'s' if n > 1 else ''} skipped: {named}{more}."


def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as markdown: one table per section, teacher and student (and its EMA) side by side."""
    t = report["teacher"]
    st = report.get("student", {})
    ema = bool(report.get("ema"))
    video = (report.get("media") or {}).get("kind") == "video"
    unit = "video" if video else "image"
    tokens = st.get("token_text") or f"{st.get('latent_tokens', '?')} tokens"
    if t is None:
        lines = [f"# Evaluation: {st.get('type', '?')} student (trained without a teacher)", "",
                 f"Student: {st.get('type', '?')} with {tokens}"
                 + (f", a head over {st['classes']} classes" if st.get("classes") else "")
                 + f". Device: {report.get('device', '?')}."]
    else:
        lines = [f"# Evaluation: {st.get('type', '?')} student of {t['kind']}:{t['name']} ({t['family']})", ""]
        lines.append(f"Student: {st.get('type', '?')} with {tokens}{' per clip' if video else ''}; teacher: "
                     f"{t['depth']} blocks of width {t['width']}, {t['num_patches']} patches at "
                     f"{t['image_size'][0]}x{t['image_size'][1]}{' per frame' if video else ''}. "
                     f"Device: {report.get('device', '?')}.")
    if ema:
        lines[-1] += " The student (EMA) column: the exponential moving average of its weights the run kept."
    if "eval_set" in report:
        e = report["eval_set"]
        lines.append(f"Evaluation set: `{e['source']}`, {e['num_images']} {unit}s, {e['num_classes']} classes."
                     + _skipped_line(e.get("skipped"), "evaluation"))
        if video:
            lines.append(f"Each video: {e['views_per_video']} view(s) ({report['media']['num_clips']} clip(s) x "
                         f"{report['media']['num_crops']} crop(s)), each {e['clip']}; the teacher embeds every frame "
                         f"and averages (CLIP's video protocol), every model averages its embedding over the views.")
    lines.append("")
    has_teacher = t is not None

    if "zero_shot" in report:
        z = report["zero_shot"]
        lines += [f"## Zero-shot classification ({z['templates']} templates, {z['num_templates']} prompts per class)",
                  ""] + _accuracy_table(z)
        lines += ["", _agreement_line(z, f" ({z['num_classes']} classes, {z['num_images']} {unit}s)"), ""]
        if (z.get("logits") or {}).get("kind") == "sigmoid":
            lg, pr = z["logits"], z["top1_probability"]
            sign = "+" if lg["bias"] >= 0 else "−"
            lines += [f"Logits: sigmoid({lg['scale']:.4g} · cos {sign} {abs(lg['bias']):.4g}), the teacher's "
                      f"logit_scale and logit_bias (SigLIP). Mean probability of the top-1 class: teacher "
                      f"{pr['teacher']:.3g}, student {pr['student']:.3g}.", ""]
    if "classification" in report:
        c = report["classification"]
        title = "Classification by the student's own head" if st.get("classes") else \
            "Classification through the inherited head"
        lines += [f"## {title}", ""] + _accuracy_table(c, teacher=has_teacher)
        if has_teacher and c.get("teacher") is None:
            lines += ["", "The teacher has no classifier over these classes."]
        lines += ["", _agreement_line(c), ""]
    if "linear_probe" in report:
        p = report["linear_probe"]
        first = p.get("teacher") or p["student"]
        lines += ["## Linear probe (logistic regression on L2-normalised frozen features)", ""]
        lines += _accuracy_table({"teacher": p.get("teacher"), "student": p["student"], EMA: p.get(EMA)},
                                 teacher=has_teacher)
        chosen = [p[m]["C"] for m in ("teacher", "student", EMA) if m in p]
        lines.append("| C chosen | " + " | ".join(f"{c:g}" for c in chosen) + (" | |" if has_teacher else " |"))
        lines += ["", f"Split: {p['split']} ({first['num_train']} train / {first['num_test']} test "
                      f"{unit}s); C chosen on a held-out part of the train split. Chance top-1: "
                      f"{_pct(p['chance_top1'])}."]
        if p.get("train_skipped"):
            lines.append(_skipped_line(p["train_skipped"], "train").strip())
        unconverged = [m for m in ("teacher", "student", EMA) if m in p and not p[m].get("converged", True)]
        if unconverged:
            lines.append(f"Warning: the logistic regression did not converge for {', '.join(unconverged)}.")
        lines.append("")
    if "retrieval" in report:
        r = report["retrieval"]
        lines += [f"## Text <-> {unit} retrieval (the teacher's text tower; one caption per {unit})", "",
                  "| | teacher | student | student / teacher |", "|---|---:|---:|---:|"]
        for direction, label in (("text_to_video", f"text -> {unit}"), ("video_to_text", f"{unit} -> text")):
            for k, value in r["teacher"][direction].items():
                lines.append(f"| {label} {k} | {_pct(value)} | {_pct(r['student'][direction][k])} | "
                             f"{_ratio(r['student'][direction][k], value)} |")
        chance = ", ".join(f"{k} {_pct(v)}" for k, v in r["teacher"]["chance"].items())
        lines += ["", f"Chance: {chance} ({r['teacher']['num_samples']} {unit}s).", ""]
    if "fidelity" in report:
        f, fe = report["fidelity"], report.get("fidelity_ema")
        head = "| measure | value | EMA | constant-embedding baseline |" if fe else \
            "| measure | value | constant-embedding baseline |"
        lines += [f"## Fidelity (student embedding against the teacher's, same {unit}s)", "", head,
                  "|---|---:|---:|---:|" if fe else "|---|---:|---:|"]
        for label, key, fmt, base in (("mean cosine", "cosine", lambda v: f"{v:.4f}", "can be high"),
                                      ("centred cosine (teacher mean removed)", "centred_cosine",
                                       lambda v: f"{v:.4f}", "≈ 0"),
                                      ("top-1 retrieval of own teacher embedding", "retrieval_top1", _pct,
                                       _pct(f["retrieval_chance"]))):
            lines.append(f"| {label} | {fmt(f[key])} | " + (f"{fmt(fe[key])} | " if fe else "") + f"{base} |")
        lines.append("")
    if "cost" in report:
        cost = report["cost"]
        ct, cs = cost.get("teacher"), cost["student"]
        per = f"clip of {cs['frames']} frames" if video else "image"
        lines += [f"## Cost (batch {cs['batch_size']} {'clips' if video else 'images'} at {cs['image_size'][0]}x"
                  f"{cs['image_size'][1]}, {cs['device']})", ""]
        t_or = (lambda key, scale=1: None if ct is None or ct.get(key) is None else ct[key] / scale)
        rows = [
            ("parameters (M)", _num, t_or("params", 1e6), cs["params"] / 1e6),
            (f"GFLOPs per {per} (2 per multiply-add)", _num, t_or("gflops"), cs["gflops"]),
            (f"GMACs per {per}", _num, t_or("gmacs"), cs["gmacs"]),
        ]
        if video:
            rows.append((f"GFLOPs per video ({cs['views']} view(s))", _num, t_or("gflops_per_video"),
                         cs["gflops_per_video"]))
        rows += [
            ("clips / s" if video else "images / s", lambda x: _num(x, 1), t_or("images_per_s"),
             cs.get("images_per_s")),
            ("peak memory (MB, weights + activations)", lambda x: _num(x, 1), t_or("peak_mb"), cs.get("peak_mb")),
        ]
        lines += _side_by_side(rows, teacher=ct is not None)
        lines += ["", "FLOPs counted with torch's FlopCounterMode (matrix products, convolutions, attention)"
                      + ("; the EMA has the student's." if ema else "."), ""]
    family = _family(st.get("family"))
    for section in family.sections if family else ():
        if section.key in report:
            lines += section.markdown(report[section.key])
    for picture in family.pictures if family else ():
        if picture.key in report:
            label = "RoIs" if picture.key == "rois" else picture.title
            lines += [f"## {picture.title}", "", picture.caption, "", f"![{label}]({report[picture.key]})", ""]
    if report.get("compare"):  # written by eval.compare into the reports of the runs it compared
        lines += ["## Compared", "", f"Beside the teacher's other students and training-free baselines: "
                  f"[{report['compare']}]({report['compare']}).", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _family(name):
    """The student family a report names (None for a report of another kind of model)."""
    return FAMILIES.get(name)


def headline(report: Mapping[str, Any]) -> str:
    """The report in one line: zero-shot (or head) top-1 of teacher and student, and GFLOPs per image or clip."""
    parts = []
    for key, what in (("zero_shot", "zero-shot"), ("classification", "head")):
        if key in report:
            a = report[key]
            teacher = f"teacher {_pct(a['teacher'].get('top1'))}, " if a.get("teacher") else ""
            parts.append(f"{what} top-1: {teacher}student {_pct(a['student'].get('top1'))} "
                         f"({a['num_classes']} classes)")
    if "cost" in report:
        ct, cs = report["cost"].get("teacher"), report["cost"]["student"]
        per = "clip" if cs.get("frames") else "image"
        if ct is None:
            parts.append(f"GFLOPs per {per}: student {_num(cs['gflops'])}")
        else:
            parts.append(f"GFLOPs per {per}: teacher {_num(ct['gflops'])}, student {_num(cs['gflops'])} "
                         f"({ct['gflops'] / cs['gflops']:.1f}x fewer)")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- runs
def load_run(run_dir: str | os.PathLike):
    """``(student, teacher, folder)`` of a finished bootstrapping run (`students.run_folder.RunFolder`); the teacher
    is None for a run that trained with labels alone."""
    folder = RunFolder.finished(run_dir)
    return folder.load_student(), folder.build_teacher() if folder.has_teacher() else None, folder


def evaluate_run(run_dir: str | os.PathLike, eval_source=None, out_dir: str | os.PathLike | None = None,
                 progress: bool = True, allow_pipe: bool = False, **options) -> dict:
    """Evaluate a bootstrapping run's student (and the EMA of its weights, where the run kept one) against its
    teacher (if it has one); writes the report into ``out_dir`` (default: the run folder). ``eval_source`` and
    ``options`` override the recipe's ``eval:`` keys; ``allow_pipe`` lets ``pipe:`` URLs run their commands (the
    run folder cannot opt in itself).

    The run folder, the options and the data paths are checked before any model is built."""
    from data.evalsets import check_eval_source

    folder = RunFolder.finished(run_dir, hint="; or evaluate a student and teacher directly with --student/--teacher")
    if folder.has_teacher():
        folder.check_teacher_rebuildable()
    cfg = run_eval_options(folder)
    source = eval_source if eval_source is not None else cfg.data
    checked = cfg.replace(**options)
    if source is not None:
        check_eval_source(source, "evaluation data", allow_pipe)
        if checked.probe and checked.train_data is not None:
            check_eval_source(checked.train_data, "linear-probe train data", allow_pipe)
    out_dir = prepare_out_dir(out_dir if out_dir is not None else folder.path)
    student, ema = folder.load_student(), folder.load_student_ema()
    teacher = folder.build_teacher() if folder.has_teacher() else None
    return evaluate(student, teacher, source, out_dir=out_dir, config=cfg, progress=progress, allow_pipe=allow_pipe,
                    ema=ema, **options)


def run_eval_options(folder: RunFolder) -> EvalConfig:
    """The run's ``eval:`` options, its relative data paths resolved (from the working directory, else the folder)."""
    cfg = EvalConfig.from_dict(folder.recipe().get("eval") or {})
    return cfg.replace(data=folder.resolve(cfg.data), train_data=folder.resolve(cfg.train_data))
