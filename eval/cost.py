"""What a model costs: parameters, FLOPs (counted), throughput and peak memory.

The reusable measurements (``benchmarks/`` imports them):

* ``count_params(module)``: total and trainable parameters.
* ``count_flops(fn, example)``: FLOPs of ``fn(example)`` counted by
  ``torch.utils.flop_counter.FlopCounterMode``: 2 per multiply-add of matrix products,
  convolutions and attention. Element-wise ops, norms, softmax and bilinear sampling are not
  counted (they are a small share). Papers' "GFLOPs" for ViTs (e.g. 17.6 for ViT-B/16) are
  usually fvcore's multiply-add counts, i.e. ``gflops / 2``: reports give both (``gmacs``).
  Counting switches off ``nn.MultiheadAttention``'s fast path (``torch.backends.mha``): in
  inference (open_clip towers, teachers running under ``no_grad``) it otherwise takes a fused
  kernel the counter does not see. CPU attention (``_scaled_dot_product_flash_attention_for_cpu``) has no formula in torch's
  registry; it gets the same one as the GPU attention kernels.
* ``measure_throughput(fn, batch, iters, warmup)``: images per second under
  ``torch.inference_mode`` (CUDA synchronised around the timed loop).
* ``peak_memory(fn, batch)``: the most memory ``fn(batch)`` holds beyond what was allocated
  before the call (activations and workspace; weights and input are already there). CUDA:
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before. CPU: growth of the
  process's peak resident set (Linux ``VmHWM``, reset via ``/proc/self/clear_refs``) over its
  resident set before the call, after returning freed heap memory to the system
  (``malloc_trim``) so that reused free pages do not hide the growth; an estimate, ``None``
  where the kernel does not allow the reset.
"""

from __future__ import annotations

import ctypes
import gc
import time
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .features import autocast_context


def count_params(module: nn.Module) -> dict[str, int]:
    """``{"total": ..., "trainable": ...}`` parameters (shared parameters counted once)."""
    params = list(module.parameters())  # parameters() already yields each shared tensor once
    return dict(total=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad))


def _sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _extra_flop_formulas() -> dict:
    ops = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_fused_attention_overrideable"):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops[op] = _sdpa_flops
    return ops


def count_flops(fn: Callable[[Tensor], Any], example: Tensor, by_op: bool = False):
    """FLOPs of ``fn(example)`` for the whole batch (see the module docstring for what counts).

    With ``by_op=True`` returns ``(total, {op_name: flops})``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas())
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        # Under no_grad the counter's module tracker trips over parameters passed between modules.
        with torch.enable_grad(), counter:
            fn(example)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    total = counter.get_total_flops()
    if by_op:
        return total, {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(fn: Callable[[Tensor], Any], batch: Tensor, iters: int = 20, warmup: int = 5,
                       autocast_dtype: torch.dtype | None = None, progress: bool = False) -> dict[str, float]:
    """Images per second of ``fn`` on ``batch`` (inference mode): ``warmup`` untimed calls, then ``iters`` timed."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    with torch.inference_mode(), autocast_context(batch.device, autocast_dtype):
        for _ in range(warmup):
            fn(batch)
        _sync(batch.device)
        start = time.perf_counter()
        for _ in tqdm(range(iters), desc="throughput", disable=not progress, leave=False):
            fn(batch)
        _sync(batch.device)
        seconds = time.perf_counter() - start
    return dict(images_per_s=iters * batch.shape[0] / seconds, ms_per_batch=1000 * seconds / iters,
                batch_size=int(batch.shape[0]))


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "reset the peak resident set size to the current one" (Linux >= 4.0)
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    # Hand freed heap memory back to the OS, so that the next call's allocations show up as RSS growth
    # instead of reusing pages the process already holds. (Not mallopt: pinning the mmap threshold would
    # change how fast every later call allocates.)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[Tensor], Any], batch: Tensor, autocast_dtype: torch.dtype | None = None) -> int | None:
    """Bytes ``fn(batch)`` holds at its peak beyond what was allocated before (None if unmeasurable)."""
    device = batch.device
    with torch.inference_mode(), autocast_context(device, autocast_dtype):
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = fn(batch)
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - before
            del out
            return int(peak)
        if device.type != "cpu":
            return None
        _trim_heap()
        before = _proc_status_bytes("VmRSS")
        if before is None or not _reset_peak_rss():
            return None
        out = fn(batch)
        peak = _proc_status_bytes("VmHWM")
        del out
        return None if peak is None else max(0, peak - before)


def model_cost(fn: Callable[[Tensor], Any], module: nn.Module, image_size, batch_size: int = 32,
               device: str | torch.device = "cpu", iters: int = 10, warmup: int = 3,
               autocast_dtype: torch.dtype | None = None, throughput: bool = True, frames: int | None = None) -> dict:
    """Everything above for one model: ``fn`` maps normalised images ``[B, 3, H, W]`` (with ``frames``: clips
    ``[B, frames, 3, H, W]``) to its output.

    ``module`` holds the parameters that ``fn`` uses (e.g. the teacher's image tower). Returns
    ``params``, ``trainable_params``, ``gflops`` / ``gmacs`` per image (per clip), ``images_per_s``
    (clips per second), ``ms_per_batch``, ``batch_size``, ``weights_mb``, ``activation_peak_mb`` and
    ``peak_mb`` (weights + activations), ``device`` (and ``frames``).
    """
    device = torch.device(device)
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    shape = (3, h, w) if frames is None else (frames, 3, h, w)
    gen = torch.Generator().manual_seed(0)
    params = count_params(module)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    weights += sum(b.numel() * b.element_size() for b in module.buffers())
    one = torch.randn(1, *shape, generator=gen).to(device)
    flops = count_flops(fn, one)
    out = dict(params=params["total"], trainable_params=params["trainable"], gflops=flops / 1e9,
               gmacs=flops / 2e9, weights_mb=weights / 2**20, device=str(device), batch_size=batch_size,
               image_size=[h, w])
    if frames is not None:
        out["frames"] = frames
    if throughput:
        batch = torch.randn(batch_size, *shape, generator=gen).to(device)
        out.update(measure_throughput(fn, batch, iters, warmup, autocast_dtype))
        act = peak_memory(fn, batch, autocast_dtype)
        out["activation_peak_mb"] = None if act is None else act / 2**20
        out["peak_mb"] = None if act is None else (act + weights) / 2**20
        out["autocast"] = str(autocast_dtype).replace("torch.", "") if autocast_dtype else None
    return out


def compare_cost(models: Mapping[str, tuple[Callable[[Tensor], Any], nn.Module]], image_size, **kwargs) -> dict:
    """``model_cost`` for each ``name: (fn, module)``, e.g. teacher and student side by side."""
    return {name: model_cost(fn, module, image_size, **kwargs) for name, (fn, module) in models.items()}
