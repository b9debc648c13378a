"""Write an evaluation set in another benchmark's format, so its tools score our exports.

    python -m data.export_eval_set EVAL_SET OUT --format clip_benchmark [--templates T] [--classnames C]

EVAL_SET is what ``python -m eval --data`` takes: an ImageFolder root (one sub-folder per class)
or labelled shards (a folder of ``.tar`` with ``dataset.json``, a pattern, or a list).

``clip_benchmark``: the WebDataset layout that CLIP_benchmark reads as ``--dataset wds/NAME
--dataset_root OUT`` (``clip_benchmark.datasets.builder.build_wds_dataset``)::

    OUT/test/0.tar, 1.tar, ...    one sample per image: s0000000.png (RGB) + s0000000.cls (label)
    OUT/test/nshards.txt          the number of shards
    OUT/classnames.txt            one class name per line, in label order
    OUT/zeroshot_classification_templates.txt   one prompt per line, {c} where the name goes

Class names and templates are the ones ``python -m eval`` would use for the same set and
options (the set's own names, ImageNet-1k's for a folder of 1000 WordNet ids; the set's own
templates from its ``dataset.json``, else OpenAI's 80), so both tools prompt with the same
texts. Images are decoded as evaluation decodes them and stored as PNG, which is lossless: both
tools see the same pixels. Images that do not decode are skipped, counted and named.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .evalsets import SkippedSample, eval_dataset, iter_eval_samples
from .outputs import write_text
from .prompts import dataset_templates, name_or_list_file, resolve_classnames, resolve_templates
from .shards import ShardSink, is_remote

FORMATS = ("clip_benchmark",)
CLIP_BENCHMARK_CLASSNAMES = "classnames.txt"
CLIP_BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)  # no metadata, fixed level: the same bytes every run
    return buf.getvalue()


def clip_benchmark_templates(templates) -> list[str]:
    """Templates as CLIP_benchmark writes them: ``{c}`` where the class name goes.

    ``templates`` is what ``data.prompts.resolve_templates`` returns: ``"{}"`` strings or
    open_clip's callables (``lambda c: f"a photo of a {c}."``).
    """
    out = [t("{c}") if callable(t) else t.replace("{}", "{c}") for t in templates]
    bad = [t for t in out if "\n" in t or "{c}" not in t]
    if bad:
        raise ValueError(f"templates must be one line each with a place for the class name; bad: {bad[:3]}")
    return out


def export_clip_benchmark(source, out_dir: str | Path, *, split: str = "test",
                          classnames: str | Sequence[str] | None = None, templates: str | Sequence[str] | None = None,
                          maxcount: int = 10000, overwrite: bool = False, progress: bool = True,
                          allow_pipe: bool = False) -> dict:
    """Write evaluation set ``source`` in CLIP_benchmark's ``wds/`` layout (module docstring).

    ``classnames`` and ``templates`` as in ``python -m eval`` (None: the set's own); ``allow_pipe``
    lets ``pipe:`` shard URLs run their commands. OUT must lie apart from the set. Returns
    ``dict(out_dir, split, num_samples, num_shards, classnames, templates, skipped=[{name, error}])``.
    """
    dataset = eval_dataset(source, allow_pipe=allow_pipe)  # no transform: PIL images, as evaluation decodes them
    names = resolve_classnames(classnames, dataset.classnames)
    if any("\n" in n for n in names):
        raise ValueError("a class name holds a line break: classnames.txt has one name per line")
    prompts = clip_benchmark_templates(resolve_templates(templates if templates is not None
                                                         else dataset_templates(source)))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"the output folder {out} is a file; choose another OUT")
    check_apart(source, dataset, out)
    split_dir = out / split
    old = sorted(split_dir.glob("*.tar")) if split_dir.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"{split_dir} already holds shards ({old[0].name}, ...); pass --overwrite or "
                              "choose an empty folder")
    split_dir.mkdir(parents=True, exist_ok=True)
    for path in old:
        path.unlink()

    skipped, n = [], 0
    samples = tqdm(iter_eval_samples(dataset), total=_length(dataset), desc=f"export {split}", unit="img",
                   disable=not progress)
    with ShardSink(split_dir, maxcount=maxcount, pattern="%d.tar") as sink:  # {0..N-1}.tar, as it reads them
        for sample in samples:
            if isinstance(sample, SkippedSample):
                skipped.append({"name": sample.name, "error": sample.error})
                continue
            image, label = sample
            sink.write({"__key__": f"s{n:07d}", "png": _png(image), "cls": str(int(label)).encode()})
            n += 1
        shards = sink.close()
    if not n:
        raise ValueError(f"no image of {source} could be read ({len(skipped)} skipped)")
    write_text(split_dir / "nshards.txt", f"{len(shards)}\n")
    write_text(out / CLIP_BENCHMARK_CLASSNAMES, "\n".join(names) + "\n")
    write_text(out / CLIP_BENCHMARK_TEMPLATES, "\n".join(prompts) + "\n")
    return dict(out_dir=str(out), split=split, num_samples=n, num_shards=len(shards), classnames=names,
                templates=prompts, skipped=skipped)


def check_apart(source, dataset, out: Path) -> None:
    """Refuse an output folder that is, holds or lies inside the evaluation set being read: the export
    replaces the shards of ``OUT/SPLIT`` (``--overwrite``) and adds folders, which would delete or change
    its own input."""
    sources = source if isinstance(source, (list, tuple)) else [source]
    inputs = [Path(os.fspath(s)).expanduser() for s in sources if not is_remote(os.fspath(s))]
    inputs += [Path(u) for u in getattr(dataset, "urls", []) if not is_remote(u)]
    inputs += [Path(dataset.root)] if hasattr(dataset, "root") else []
    target = out.expanduser().resolve()
    for path in inputs:
        path = path.resolve()
        if path == target or target in path.parents:
            raise ValueError(f"OUT {out} holds the evaluation set being exported ({path}): the export would replace its "
                             f"own input; choose an OUT apart from the evaluation set")
        if path.is_dir() and path in target.parents:
            raise ValueError(f"OUT {out} lies inside the evaluation set being exported ({path}): the export would add "
                             f"its files to its own input; choose an OUT apart from the evaluation set")


def clip_benchmark_command(name: str, root, split: str = "test", model: str = "local-dir:EXPORT_FOLDER") -> str:
    """The command that scores an OpenCLIP export on an exported set as `python -m eval` does: float32
    (``--no_amp``; CLIP_benchmark's default autocast is bfloat16 on a CPU) and the loader in the main process
    (``--num_workers 0``: CLIP_benchmark's default 4 workers refuse a set of fewer shards)."""
    return (f"python -m eval.clip_benchmark eval --dataset wds/{name} --dataset_root {root} --split {split} "
            f"--model {model} --task zeroshot_classification --no_amp --num_workers 0 --output {name}_result.json")


def _length(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # remote shards without dataset.json
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.export_eval_set", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_set", help="ImageFolder root or labelled shards (what python -m eval --data takes)")
    parser.add_argument("out_dir", help="output folder (CLIP_benchmark: its --dataset_root)")
    parser.add_argument("--format", default="clip_benchmark", choices=FORMATS, help="clip_benchmark (default)")
    parser.add_argument("--split", default="test", help="split folder name (default test, CLIP_benchmark's default)")
    parser.add_argument("--classnames", help="'imagenet' or a file with one name per line (default: the set's own)")
    parser.add_argument("--templates", help="openai | simple | demo | file with one '{}' template per line "
                                            "(default: the set's own, else openai)")
    parser.add_argument("--maxcount", type=int, default=10000, help="most samples per shard (default 10000)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already in OUT/SPLIT")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--allow-pipe", action="store_true", help="let pipe: shard URLs run their shell commands")
    args = parser.parse_args(argv)
    try:
        info = export_clip_benchmark(args.eval_set, args.out_dir, split=args.split,
                                     classnames=name_or_list_file(args.classnames),
                                     templates=name_or_list_file(args.templates), maxcount=args.maxcount,
                                     overwrite=args.overwrite, progress=not args.quiet, allow_pipe=args.allow_pipe)
    except (OSError, ValueError) as exn:  # user errors: a message, not a traceback
        print(f"error: {exn}", file=sys.stderr)
        return 2
    skipped = info["skipped"]
    if skipped:
        named = ", ".join(s["name"] for s in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        print(f"skipped {len(skipped)} unreadable image(s): {named}", file=sys.stderr)
    name = Path(info["out_dir"]).name or "eval_set"
    print(f"wrote {info['num_samples']} images ({len(info['classnames'])} classes, {len(info['templates'])} "
          f"templates) in {info['num_shards']} shard(s) to {info['out_dir']}\n"
          f"score an OpenCLIP export on it with:\n"
          f"{clip_benchmark_command(name, info['out_dir'], info['split'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
