"""Sparsifiner's key selection on a CPU, compiled: each approx row's `budget` largest keys written straight
into the additive attention mask (0 kept, -inf dropped), one pass per row.

Why: `torch.topk` on a CPU builds a (value, index) pair per entry and runs `std::nth_element` over them; at
ViT-B/16 224 px that is about 8% of a block's time, the largest cost Sparsifiner adds to its ViT, and
forming the [B, H, N-P, N] approximation and the fill and scatter of the [B, H, N, N] mask add 4-5% more.
Here each row's budget-th largest value is found by a bisection on its int32 bit pattern (non-negative
float32 values order as their bit patterns): vectorised counts over a row that stays in L1, at most one
per bit below the row maximum's highest and stopping once exactly `budget` values remain, then one pass
writes the mask row.

- `select_bias(approx, ...)`: from the approximation, exactly `attention_bias`'s mask.
- `combine_select_bias(index, values, basis, ...)`: from the approximation's terms (the top-k coefficients
  and the thresholded basis), summing each row in a buffer of its own, so the approximation is never
  formed. The sum runs in the terms' order, a product then a sum (no fused multiply-add), which is how
  torch's CSR product forms it: the same bits, so the same mask as `attention_bias(_csr_combination(...))`.

Exactly the mask that `torch.topk` gives, not merely *a* top-k: when the threshold value is tied (more
entries equal it than places left), which of them topk keeps is its own choice, so such rows are flagged
and redone with `torch.topk` from the same approx row. Ties are rare except at 0 (a sparse approximation
with fewer non-zero entries than the budget).

Built on first use in each process with the system C compiler (`$CC`, else `cc`), in about 0.15 s, into a
private temporary folder that is removed once the library is loaded: nothing is cached, so no library that
someone else placed in a cache folder is ever loaded. Without a compiler, or with
`SPARSIFINER_CPU_KERNEL=0`, both return None and the caller runs torch's path (a one-line warning says why,
once). Plain C called through ctypes (which releases the GIL), no torch extension build. Where torch's
parallel backend is OpenMP the rows run in torch's own pool (the library binds to the libgomp.so.1 torch
loaded, not a second runtime); a compiler without -fopenmp gets a pthreads build. Both calls are torch custom
operators (`torch.library.custom_op`, with fake implementations giving the mask's shape), so a Sparsifiner
compiles whole under `torch.compile(fullgraph=True)` with the kernel in its graph.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "combine_select_bias", "select_bias", "unavailable_reason"]

log = logging.getLogger(__name__)

ENV_SWITCH = "SPARSIFINER_CPU_KERNEL"

SOURCE = r"""
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  /* input: either approx rows (x), or the sparse combination that forms them (index, values, basis) */
  const int32_t *x;        /* [rows, n] non-negative float32 bit patterns, or 0 */
  const int64_t *index;    /* [rows, terms] basis rows of each approx row */
  const float *values;     /* [rows, terms] their coefficients */
  const float *basis;      /* [K, n] */
  int terms;
  int64_t begin, end;      /* this thread's rows */
  int n, k;                /* keys per row, keys kept */
  int rows_per_group;      /* predicted rows per (image, head): N - P */
  int prefix;              /* P dense rows that precede them in every [N, N] mask */
  float *out;              /* [groups, N, N] additive mask */
  uint8_t *tied;           /* [rows] 1 = threshold tied: the caller redoes the row */
  int failed;
} job_t;

/* sum_t values[t] * basis[index[t]], in the terms' order, a product then a sum (no fused multiply-add):
   the same float32 operations as torch's CSR product, so the same bits */
static void combine_row(const int64_t *index, const float *values, int terms, const float *basis, int n,
                        float *row) {
  memset(row, 0, sizeof(float) * (size_t)n);
  for (int t = 0; t < terms; t++) {
    const float v = values[t];
    const float *b = basis + index[t] * n;
    for (int m = 0; m < n; m++) {
      const float p = v * b[m];
      row[m] = row[m] + p;
    }
  }
}

/* The k-th largest of n non-negative values (as int32 bit patterns): the largest t with #{x >= t} >= k,
   built bit by bit from the top (below the row maximum's highest bit), then the mask row {x >= t}. A
   candidate with exactly k values at or above it ends the search early: those k are the top k, and no
   value outside them equals one inside. Returns whether the threshold is tied (more than k kept). */
static int select_row(const int32_t *x, int n, int k, float *o) {
  int32_t t = 0, top = 0;
  for (int m = 0; m < n; m++) top = x[m] > top ? x[m] : top;
  for (int bit = 30; bit >= 0; bit--) {
    const int32_t c = t | (1 << bit);
    if (c > top) continue; /* nothing at or above c */
    int count = 0;
    for (int m = 0; m < n; m++) count += x[m] >= c;
    if (count >= k) t = c;
    if (count == k) break;
  }
  int kept = 0;
  for (int m = 0; m < n; m++) {
    const int keep = x[m] >= t;
    kept += keep;
    o[m] = keep ? 0.0f : -INFINITY;
  }
  return kept != k;
}

static void run_rows(job_t *j) {
  const int n = j->n;
  float *row = 0;
  if (!j->x && !(row = (float *)malloc(sizeof(float) * (size_t)n))) { j->failed = 1; return; }
  for (int64_t i = j->begin; i < j->end; i++) {
    const int64_t group = i / j->rows_per_group, r = i % j->rows_per_group;
    float *o = j->out + (group * (int64_t)(j->rows_per_group + j->prefix) + j->prefix + r) * n;
    const int32_t *x = j->x ? j->x + i * n : (const int32_t *)row;
    if (!j->x) combine_row(j->index + i * j->terms, j->values + i * j->terms, j->terms, j->basis, n, row);
    j->tied[i] = (uint8_t)select_row(x, n, j->k, o);
  }
  free(row);
}

#ifdef _OPENMP
#include <omp.h>
/* In the process's OpenMP pool, the one torch's own kernels use (libgomp.so.1 is loaded by torch first, and
   this library's dependency resolves to it): threads of our own would share the cores with torch's
   workers, which spin for a while after each of torch's parallel regions, and run at half speed. */
static int run_all(job_t proto, int64_t rows, int threads) {
  if (threads > rows) threads = (int)rows;
  if (threads < 1) threads = 1;
  const int64_t per = (rows + threads - 1) / threads;
  int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : failed)
  for (int t = 0; t < threads; t++) {
    job_t job = proto;
    job.begin = t * per < rows ? t * per : rows;
    job.end = (t + 1) * per < rows ? (t + 1) * per : rows;
    run_rows(&job);
    failed |= job.failed;
  }
  return failed;
}
#else
static void *run(void *job) { run_rows((job_t *)job); return 0; }

static int run_all(job_t proto, int64_t rows, int threads) {
  enum { MAX_THREADS = 256 };
  pthread_t th[MAX_THREADS];
  job_t jobs[MAX_THREADS];
  if (threads > MAX_THREADS) threads = MAX_THREADS;
  if (threads > rows) threads = (int)rows;
  if (threads < 1) threads = 1;
  const int64_t per = (rows + threads - 1) / threads;
  for (int t = 0; t < threads; t++) {
    jobs[t] = proto;
    jobs[t].begin = t * per < rows ? t * per : rows;
    jobs[t].end = (t + 1) * per < rows ? (t + 1) * per : rows;
  }
  int started = 1;
  for (; started < threads; started++)
    if (pthread_create(&th[started], 0, run, &jobs[started]) != 0) break;
  for (int t = started; t < threads; t++) run_rows(&jobs[t]); /* no thread: its rows run here */
  run_rows(&jobs[0]);
  int failed = jobs[0].failed;
  for (int t = 1; t < started; t++) pthread_join(th[t], 0);
  for (int t = 1; t < threads; t++) failed |= jobs[t].failed;
  return failed;
}
#endif

int sparsifiner_select_bias(const int32_t *x, int64_t rows, int n, int k, int rows_per_group, int prefix,
                            float *out, uint8_t *tied, int threads) {
  job_t j = {x, 0, 0, 0, 0, 0, 0, n, k, rows_per_group, prefix, out, tied, 0};
  return run_all(j, rows, threads);
}

int sparsifiner_combine_select_bias(const int64_t *index, const float *values, const float *basis, int terms,
                                    int64_t rows, int n, int k, int rows_per_group, int prefix, float *out,
                                    uint8_t *tied, int threads) {
  job_t j = {0, index, values, basis, terms, 0, 0, n, k, rows_per_group, prefix, out, tied, 0};
  return run_all(j, rows, threads);
}

/* The approximation rows `which` (the tied ones), summed as the kernel summed them. */
void sparsifiner_combine_rows(const int64_t *index, const float *values, const float *basis, int terms, int n,
                              const int64_t *which, int64_t count, float *out) {
  for (int64_t r = 0; r < count; r++)
    combine_row(index + which[r] * terms, values + which[r] * terms, terms, basis, n, out + r * n);
}
"""

_lock = threading.Lock()
_lib = None
_reason: str | None = None  # why the kernel is unavailable (None: not tried yet, or available)
_tried = False


def _build(cc: str, flags: list[str], folder: Path) -> Path:
    src = folder / "select.c"
    src.write_text(SOURCE)
    out = folder / "sparsifiner_select.so"
    done = subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cc} failed: {(done.stderr or done.stdout).strip()[:500]}")
    return out


def _compile() -> ctypes.CDLL:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} is not on PATH; set $CC)")
    # -ffp-contract=off: the combination must round as torch's CSR product does (a product, then a sum)
    base = ["-O3", "-ffp-contract=off", "-shared", "-fPIC", "-pthread"]
    # OpenMP where torch's parallel backend is OpenMP (the kernel then runs in torch's own pool), and the
    # CPU's own vector instructions; each dropped in turn if this compiler refuses it (Apple's clang has no
    # -fopenmp, some compilers no -march=native).
    openmp = ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []
    attempts = [base + ["-march=native"] + openmp, base + ["-march=native"], base]
    # Built by this process into a folder of its own (mkdtemp: mode 0700, a fresh name), loaded, and the
    # folder removed (the process keeps its mapping). No library from a shared or copied cache is ever loaded,
    # so none can run code or pose as the kernel; the build takes about 0.15 s once per process.
    with tempfile.TemporaryDirectory(prefix="sparsifiner-kernel-") as folder:
        for flags in attempts if openmp else attempts[1:]:
            try:
                path = _build(cc, flags, Path(folder))
                break
            except RuntimeError:
                if flags is attempts[-1]:
                    raise
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise RuntimeError(f"the kernel built in {tempfile.gettempdir()} did not load ({e}); if that folder "
                               f"is mounted noexec, set TMPDIR to one that is not") from None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.sparsifiner_select_bias.restype = i32
    lib.sparsifiner_select_bias.argtypes = [p, i64, i32, i32, i32, i32, p, p, i32]
    lib.sparsifiner_combine_select_bias.restype = i32
    lib.sparsifiner_combine_select_bias.argtypes = [p, p, p, i32, i64, i32, i32, i32, i32, p, p, i32]
    lib.sparsifiner_combine_rows.restype = None
    lib.sparsifiner_combine_rows.argtypes = [p, p, p, i32, i32, p, i64, p]
    return lib


def _load():
    global _lib, _reason, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
                _reason = f"{ENV_SWITCH}=0"
                log.warning("Sparsifiner's compiled CPU key selection is off (%s); torch.topk is used instead "
                            "(the same masks, slower).", _reason)
            else:
                try:
                    _lib = _compile()
                except Exception as e:  # any failure leaves torch's path, which computes the same mask
                    _reason = str(e)
                    log.warning("Sparsifiner's compiled CPU key selection is unavailable (%s); torch.topk "
                                "is used instead (the same masks, slower).", e)
            _tried = True
    return _lib


@torch.compiler.assume_constant_result  # under torch.compile: decided once when tracing, not a graph break
def available() -> bool:
    """Whether the compiled selection can run here (compiles it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _reason


def _applies(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and not t.requires_grad


def _topk_index(x: Tensor, k: int) -> Tensor:
    """`students.sparsifiner.topk_index` on float32 rows (their int32 bit patterns, as it takes them): the same
    top-k call, so among tied values the same choice as torch's path."""
    return x.view(torch.int32).topk(k, dim=-1, sorted=False).indices


def _finish(bias: Tensor, tied: Tensor, approx_rows, budget: int, rows: int, num_prefix: int) -> Tensor:
    """Redo the tied rows with torch's top-k (its own choice among equal values), from the same approx rows
    (`approx_rows(which)` gives them)."""
    redo = tied.nonzero().squeeze(1)
    if redo.numel():
        n = bias.shape[-1]
        flat = approx_rows(redo)
        fixed = torch.full_like(flat, float("-inf")).scatter_(-1, _topk_index(flat, budget), 0.0)
        bias.view(-1, n)[(redo // rows) * n + num_prefix + redo % rows] = fixed
    return bias


def _empty_bias(b: int, h: int, n: int, num_prefix: int) -> Tensor:
    bias = torch.empty((b, h, n, n), dtype=torch.float32)
    bias[:, :, :num_prefix] = 0.0
    return bias


def _fake_bias(b: int, h: int, n: int, like: Tensor) -> Tensor:
    return like.new_empty((b, h, n, n))


# The kernel calls are torch custom operators, so that `torch.compile(fullgraph=True)` keeps them in the graph
# (a ctypes call cannot be traced): each is opaque to the compiler, which sees only the mask's shape (the fake
# implementations). Neither fails: where the kernel cannot allocate its row buffer every row is marked tied and
# so redone by torch's top-k.
@torch.library.custom_op("sparseformer_bootstrap::sparsifiner_select_bias", mutates_args=())
def _select_bias_op(approx: Tensor, budget: int, num_prefix: int) -> Tensor:
    b, h, rows, n = approx.shape
    x = approx.contiguous()
    bias = _empty_bias(b, h, n, num_prefix)
    tied = torch.empty(b * h * rows, dtype=torch.uint8)
    if _lib.sparsifiner_select_bias(x.data_ptr(), b * h * rows, n, budget, rows, num_prefix, bias.data_ptr(),
                                    tied.data_ptr(), torch.get_num_threads()):
        tied.fill_(1)
    return _finish(bias, tied, lambda which: x.view(-1, n)[which], budget, rows, num_prefix)


@_select_bias_op.register_fake
def _(approx, budget, num_prefix):
    b, h, _, n = approx.shape
    return _fake_bias(b, h, n, approx)


@torch.library.custom_op("sparseformer_bootstrap::sparsifiner_combine_select_bias", mutates_args=())
def _combine_select_bias_op(index: Tensor, values: Tensor, basis: Tensor, budget: int, num_prefix: int) -> Tensor:
    b, h, rows, terms = values.shape
    n = basis.shape[1]
    index, values, basis = index.contiguous(), values.contiguous(), basis.contiguous()
    bias = _empty_bias(b, h, n, num_prefix)
    tied = torch.empty(b * h * rows, dtype=torch.uint8)
    if _lib.sparsifiner_combine_select_bias(index.data_ptr(), values.data_ptr(), basis.data_ptr(), terms,
                                            b * h * rows, n, budget, rows, num_prefix, bias.data_ptr(),
                                            tied.data_ptr(), torch.get_num_threads()):
        tied.fill_(1)

    def approx_rows(which: Tensor) -> Tensor:
        out = torch.empty(which.numel(), n)
        _lib.sparsifiner_combine_rows(index.data_ptr(), values.data_ptr(), basis.data_ptr(), terms, n,
                                      which.contiguous().data_ptr(), which.numel(), out.data_ptr())
        return out

    return _finish(bias, tied, approx_rows, budget, rows, num_prefix)


@_combine_select_bias_op.register_fake
def _(index, values, basis, budget, num_prefix):
    b, h = values.shape[:2]
    return _fake_bias(b, h, basis.shape[1], values)


def select_bias(approx: Tensor, budget: int, num_prefix: int) -> Tensor | None:
    """The additive mask [B, H, N, N] (float32: 0 kept, -inf dropped) of each approx row's `budget` largest
    keys, prefix rows all kept; exactly `attention_bias`'s. None where the kernel does not apply (not a CPU
    float32 tensor, or no kernel): the caller then runs torch's path."""
    if not _applies(approx) or approx.dim() != 4 or budget < 1:
        return None
    b, h, rows, n = approx.shape
    if rows + num_prefix != n or budget >= n or not available():
        return None
    return _select_bias_op(approx, budget, num_prefix)


def combine_select_bias(index: Tensor, values: Tensor, basis: Tensor, budget: int, num_prefix: int) -> Tensor | None:
    """`select_bias` of the approximation Σ_t values[..., t] · basis[index[..., t]] ([B, H, N-P, N]) without
    forming it: each row is summed, selected and written in one pass. The sum runs in the terms' order, a
    product then a sum, as torch's CSR product (`students.sparsifiner._csr_combination`) does, so the rows
    and the mask are bit for bit those of that path."""
    if not (_applies(values) and _applies(basis)) or index.dtype != torch.int64 or values.dim() != 4:
        return None
    b, h, rows, terms = values.shape
    n = basis.shape[1]
    if index.shape != values.shape or rows + num_prefix != n or not 1 <= budget < n or not available():
        return None
    return _combine_select_bias_op(index, values, basis, budget, num_prefix)
