"""Convert a student into a Hugging Face `transformers` vision-model folder (e.g. a LLaVA vision tower).

    python -m students.to_transformers RUN_DIR OUT
    python -m students.to_transformers sparseformer_btsp_openai_clip_large OUT --weights CKPT.pth

SOURCE is a bootstrapping run's output folder (student.safetensors, student_config.json,
recipe.yaml with its `teacher:` spec, optionally pretrained_cfg.json) or a released SparseFormer
name (`students.list_models()`) with `--weights`, its checkpoint file. OUT receives config.json,
model.safetensors, preprocessor_config.json and a README; the folder is reloaded and compared with
the student before the command returns. Load it with

    import students.transformers_model
    from transformers import AutoModel, AutoImageProcessor
    vision = AutoModel.from_pretrained(OUT); processor = AutoImageProcessor.from_pretrained(OUT)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.errors import UserError

from .families import create_model
from .run_folder import RunFolder
from .sparseformer import RELEASED, get_pretrained_cfg, get_teacher_spec

__all__ = ["convert", "main"]


def convert(source: str, out_dir: str | Path, *, weights: str | None = None, overwrite: bool = False,
            verify: bool = True) -> Path:
    """Write the student of a run folder or a released checkpoint as a transformers folder; returns it."""
    from . import transformers_model as stm

    if Path(source).is_dir():
        from .export import teacher_pretrained_cfg

        if weights is not None:
            raise ValueError("--weights is for a released model name; a run folder holds its own weights")
        folder = RunFolder.finished(source)
        student, pcfg = folder.load_student(), folder.pretrained_cfg()
        teacher = folder.teacher_spec() if folder.has_teacher() else None  # a run with labels alone has none
        if pcfg is None:  # an older run: its teacher's preprocessing (which its weights do not change)
            from teachers import create_teacher

            pcfg = teacher_pretrained_cfg(create_teacher(teacher))
    elif source in RELEASED:
        if weights is None:
            raise ValueError(f"a released model needs its checkpoint: --weights FILE (.pth or .safetensors of "
                             f"{source}); no download location is known")
        student = create_model(source, pretrained=weights)
        pcfg, teacher = get_pretrained_cfg(source).to_timm(), get_teacher_spec(source)
    else:
        raise FileNotFoundError(f"{source} is neither a run folder nor a released model name (one of "
                                f"{', '.join(RELEASED)})")
    vision = stm.StudentVisionModel.from_student(student.eval(), pretrained_cfg=pcfg, teacher=teacher)
    return stm.save_folder(vision, out_dir, overwrite=overwrite, verify=verify)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m students.to_transformers",
                                     description="Convert a student into a transformers vision-model folder.")
    parser.add_argument("source", help="a run folder, or a released model name (with --weights)")
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--weights", default=None, help="checkpoint file of a released model")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")
    parser.add_argument("--no-verify", action="store_true", help="skip reloading the folder to compare outputs")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.out, weights=args.weights, overwrite=args.overwrite,
                      verify=not args.no_verify)
    except (UserError, OSError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}\nload it with:\nimport students.transformers_model\nfrom transformers import AutoModel\n"
          f"vision = AutoModel.from_pretrained('{out}')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
