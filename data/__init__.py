"""Data for bootstrapping: WebDataset shards, the training stream, evaluation sets and the demo set.

* ``data.shards``: ``make_shards`` (also ``python -m data.make_shards``), ``resolve_shards``,
  ``shard_sample_counts``, shard reading; ``data.reencode``: ``--max-size`` re-encoding.
* ``data.decode``: ``decode_sample``, skipping undecodable samples, the decode paths
  (``data.decode`` in a recipe) and ``EncodedImage`` (a JPEG decoded when its view is known).
* ``data.stream``: ``build_train_loader`` — per-rank loader with equal batch counts on all ranks.
* ``data.transforms``: ``train_transform`` (a ``ReplayableTrainTransform``) / ``eval_transform``.
* ``data.targets``: cached teacher targets (written by ``python -m bootstrap.cache_targets``):
  manifest, target shards read beside the image shards, view choice.
* ``data.evalsets``: ``build_eval_loader``, ``FolderEvalSet``, ``ShardEvalSet`` (with class names).
* Video: ``data.video`` (decoding through PyAV or torchcodec, ``decode_video_sample``),
  ``data.video_transforms`` (``ClipSampling``, ``ReplayableClipTransform``, ``ClipEvalTransform``),
  ``data.video_stream`` (``build_video_train_loader``, ``build_video_eval_loader``),
  ``data.video_shards`` (``make_video_shards``: what ``python -m data.make_shards`` does for videos).
* ``data.demo``: ``make_demo_dataset`` (also ``python -m data.demo``), ``DEMO_CLASSNAMES``,
  ``DEMO_TEMPLATES``.
* ``data.locks``: ``cache_lock``, for cache folders that several processes may fill at once.

Submodules are imported on use, so ``import data`` stays light.
"""
