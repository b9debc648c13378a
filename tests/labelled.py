"""Helpers of the tests that train with labels: labelled shards from pixel arrays, and runs in this process."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from data.shards import ShardSink, prepare_out_dir, write_dataset_json
from test_bootstrap import run_here  # noqa: F401 (the runs in this process, as every run test makes them)


def write_labelled_shards(folder: Path, images: np.ndarray, labels: Sequence[int], classnames: Sequence[str] | None,
                          maxcount: int = 1000) -> Path:
    """``images`` [N, H, W, 3] uint8 as PNG samples with ``cls`` (in this order), and a dataset.json listing
    ``classnames`` (None: a dataset.json without them, as unlabelled shards have)."""
    folder = prepare_out_dir(folder, overwrite=True)
    with ShardSink(folder, maxcount=maxcount) as sink:
        for i, (pixels, label) in enumerate(zip(images, labels)):
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
            sample = {"__key__": f"{i:06d}", "png": buffer.getvalue()}
            if label is not None:
                sample["cls"] = str(int(label)).encode()
            sink.write(sample)
        shards = sink.close()
    write_dataset_json(folder, {"format": "webdataset", "created_by": "tests", "num_samples": len(images),
                                "shards": shards, "classnames": None if classnames is None else list(classnames),
                                "num_classes": None if classnames is None else len(classnames)})
    return folder
