"""The compiled CPU key selection gives exactly torch's mask (ties included), and its absence is handled."""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from students import Sparsifiner
from students.sparsifiner import mask_kernel
from students.sparsifiner.model import _csr_combination, attention_bias, topk_index

needs_kernel = pytest.mark.skipif(not mask_kernel.available(),
                                  reason=f"no compiled selection here: {mask_kernel.unavailable_reason()}")


def torch_bias(approx, budget, prefix, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(mask_kernel, "select_bias", lambda *a: None)
        return attention_bias(approx, budget, prefix, torch.float32)


def approximations(seed, b=2, h=3, n=65, prefix=1):
    """Non-negative rows as the predictor gives them, with the ties that make top-k's choice its own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, h, n - prefix, n, generator=g)
    x[0, 0, :4] = 0.0  # all-zero rows: every key tied
    x[0, 1, :4, 10:] = 0.0  # fewer non-zero keys than most budgets: ties at 0
    x[1, 0, :4] = torch.randint(0, 3, (4, n), generator=g).float() / 4  # few distinct values
    x[1, 2, 5, :] = 0.5  # one constant row
    return x


class Counting:
    def __init__(self):
        self.rows = 0

    def __call__(self, x, k):
        self.rows += x.shape[0]
        return topk_index(x, k)


@needs_kernel
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("budget", [1, 17, 40, 64])
def test_compiled_selection_is_exactly_torchs_mask(prefix, budget, monkeypatch):
    x = approximations(budget * 10 + prefix, prefix=prefix)
    redo = Counting()
    monkeypatch.setattr(mask_kernel, "_topk_index", redo)
    fast = mask_kernel.select_bias(x, budget, prefix)
    assert fast is not None and fast.dtype == torch.float32 and fast.shape == (2, 3, 65, 65)
    assert torch.equal(fast, torch_bias(x, budget, prefix, monkeypatch))
    assert ((fast[:, :, prefix:] == 0).sum(-1) == budget).all() and (fast[:, :, :prefix] == 0).all()
    # The tied rows went back to torch.topk (the constant and all-zero rows at least); the rest did not.
    assert 5 <= redo.rows < 20
    assert torch.equal(attention_bias(x, budget, prefix, torch.float32), fast)


def combination_terms(seed, b=2, h=3, n=65, prefix=1, num_basis=24, terms=4):
    g = torch.Generator().manual_seed(seed)
    coef = torch.rand(b, h, n - prefix, num_basis, generator=g).softmax(-1)
    index = topk_index(coef, terms)
    basis = torch.rand(num_basis, n, generator=g)
    basis[basis < 0.3] = 0.0  # thresholded, as |proj_back_n| is
    basis[3] = 0.0  # a row that is all zero: rows made of it alone are all tied
    index[0, 0, :3] = 3
    basis[5, :] = 0.25  # a constant row: ties in rows made of it
    index[1, 1, :3] = 5
    return index, coef.gather(-1, index), basis


@needs_kernel
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("budget", [1, 17, 64])
def test_fused_combination_and_selection_give_the_csr_paths_bits(prefix, budget, monkeypatch):
    index, values, basis = combination_terms(budget + prefix, prefix=prefix)
    redo = Counting()
    monkeypatch.setattr(mask_kernel, "_topk_index", redo)
    fused = mask_kernel.combine_select_bias(index, values, basis, budget, prefix)
    approx = _csr_combination(index, values, basis)
    assert fused is not None and torch.equal(fused, torch_bias(approx, budget, prefix, monkeypatch))
    # The tied rows went back to torch.topk, from the same approx rows; at budget 64 of 65 a zero key is often
    # among the last two (a key where all four basis rows are zero).
    assert redo.rows >= 3 and (budget == 64 or redo.rows < 20)


@needs_kernel
def test_a_sparsifier_runs_the_same_with_and_without_it(monkeypatch):
    torch.manual_seed(0)
    model = Sparsifiner(dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                             attn_keep_rate=0.25, basis_coef_topk=2)).eval()
    images = torch.randn(3, 3, 32, 32)
    calls, fused = [], mask_kernel.combine_select_bias
    with torch.no_grad():
        with monkeypatch.context() as m:  # K = 10 >= 4 x top-2: the CSR regime, the fused kernel
            m.setattr(mask_kernel, "combine_select_bias",
                      lambda *a: calls.append(1) or fused(*a))
            fast = model.forward_features(images)
        with monkeypatch.context() as m:
            m.setattr(mask_kernel, "select_bias", lambda *a: None)
            m.setattr(mask_kernel, "combine_select_bias", lambda *a: None)
            slow = model.forward_features(images)
        details = model.forward_details(images)  # the boolean masks, from torch.topk
    assert calls == [1, 1] and torch.equal(fast, slow)
    assert torch.allclose(details.tokens, fast, atol=1e-6)


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORMER_CACHE", str(tmp_path))
    monkeypatch.setattr(mask_kernel, "_tried", False)
    monkeypatch.setattr(mask_kernel, "_lib", None)
    monkeypatch.setattr(mask_kernel, "_reason", None)


def test_without_a_compiler_torchs_path_runs_and_says_why(monkeypatch, tmp_path, caplog):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv("CC", "no-such-compiler-here")
    x = approximations(0)
    with caplog.at_level(logging.WARNING, logger="students.sparsifiner.mask_kernel"):
        assert mask_kernel.select_bias(x, 17, 1) is None
        assert not mask_kernel.available()
    assert "no-such-compiler-here" in mask_kernel.unavailable_reason()
    assert len([r for r in caplog.records if "torch.topk is used instead" in r.getMessage()]) == 1  # once
    assert torch.equal(attention_bias(x, 17, 1, torch.float32), torch_bias(x, 17, 1, monkeypatch))


@needs_kernel
def test_a_compiler_without_openmp_or_native_flags_still_builds_it(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    wrapper = tmp_path / "plain-cc"
    wrapper.write_text("#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in -fopenmp|-march=native) "
                       "echo \"unsupported $a\" >&2; exit 1;; esac; done\n"
                       f"exec {shutil.which(os.environ.get('CC') or 'cc')} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    x = approximations(3)
    fast = mask_kernel.select_bias(x, 17, 1)
    assert fast is not None and mask_kernel.unavailable_reason() is None
    assert torch.equal(fast, torch_bias(x, 17, 1, monkeypatch))


def test_it_can_be_switched_off(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setenv(mask_kernel.ENV_SWITCH, "0")
    assert mask_kernel.select_bias(approximations(0), 17, 1) is None
    assert mask_kernel.unavailable_reason() == f"{mask_kernel.ENV_SWITCH}=0"
    assert not list(tmp_path.rglob("*.so"))


PLANTED = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  FILE *f = fopen(getenv("PLANTED_MARKER"), "w");
  if (f) fclose(f);
}
/* the kernel's three symbols, writing nothing: a mask of whatever the memory held */
int sparsifiner_select_bias(void) { return 0; }
int sparsifiner_combine_select_bias(void) { return 0; }
void sparsifiner_combine_rows(void) {}
"""

# A process that builds or loads the kernel (cache folder and temporary folder given by the environment),
# checks its masks against torch's path and names the kernel library it mapped.
PROCESS = """
import torch
from pathlib import Path
from students.sparsifiner import mask_kernel
from students.sparsifiner.model import attention_bias, topk_index
g = torch.Generator().manual_seed(0)
x = torch.rand(2, 3, 64, 65, generator=g)
fast = mask_kernel.select_bias(x, 17, 1)
assert fast is not None, mask_kernel.unavailable_reason()
want = torch.full((2, 3, 65, 65), float("-inf"))
want[:, :, :1] = 0.0
want[:, :, 1:].scatter_(-1, topk_index(x, 17), 0.0)
assert torch.equal(fast, want), "not torch's mask"
maps = Path("/proc/self/maps").read_text().splitlines() if Path("/proc/self/maps").exists() else []
print("mapped", sorted({line.split(maxsplit=5)[-1] for line in maps if "sparsifiner" in line}))
"""


def _process(tmp_path, cache):
    env = dict(os.environ, SPARSEFORMER_CACHE=str(cache), TMPDIR=str(tmp_path / "tmp"),
               PLANTED_MARKER=str(tmp_path / "planted-ran"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    (tmp_path / "tmp").mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-c", PROCESS], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@needs_kernel
def test_a_library_planted_in_the_cache_folder_is_never_loaded(tmp_path):
    """A cache folder can be shared or copied: whatever library sits in it (here one whose constructor creates
    a file and whose kernel symbols write nothing) is not loaded; the kernel is built afresh in a private
    folder of the process and its masks are torch's."""
    cache = tmp_path / "cache"
    _process(tmp_path, cache)  # a first process, and whatever it leaves in the cache folder
    kernels = cache / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    for lib in [*kernels.glob("*.so"), kernels / "sparsifiner_select_0123456789abcdef.so"]:
        subprocess.run([shutil.which(os.environ.get("CC") or "cc"), "-shared", "-fPIC", str(src), "-o", str(lib)],
                       check=True)
    out = _process(tmp_path, cache)
    assert not (tmp_path / "planted-ran").exists()
    assert str(cache) not in out


@needs_kernel
def test_it_is_built_once_per_process_in_a_private_folder_that_is_then_gone(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    log = tmp_path / "cc.log"
    wrapper = tmp_path / "logging-cc"
    wrapper.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexec {shutil.which(os.environ.get('CC') or 'cc')} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))
    x = approximations(1)
    want = torch_bias(x, 17, 1, monkeypatch)
    assert torch.equal(mask_kernel.select_bias(x, 17, 1), want)
    assert torch.equal(mask_kernel.select_bias(x, 17, 1), want)  # the loaded library, reused
    builds = log.read_text().splitlines()
    assert len(builds) == 1 and str(private) in builds[0]  # compiled once, into the private folder
    assert not list(private.iterdir())  # removed once loaded (the process keeps its mapping)
    assert not (tmp_path / "kernels").exists()  # nothing written to, or read from, the cache folder


@needs_kernel
def test_a_temporary_folder_that_cannot_hold_libraries_is_named_in_one_line(monkeypatch, tmp_path, caplog):
    _fresh(monkeypatch, tmp_path)

    def noexec(path, *args, **kwargs):
        raise OSError(f"{path}: failed to map segment from shared object")

    monkeypatch.setattr(mask_kernel.ctypes, "CDLL", noexec)
    with caplog.at_level(logging.WARNING, logger="students.sparsifiner.mask_kernel"):
        assert mask_kernel.select_bias(approximations(0), 17, 1) is None
    assert "set TMPDIR" in mask_kernel.unavailable_reason()
    assert len(caplog.records) == 1 and "\n" not in caplog.records[0].getMessage()


@needs_kernel
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the loaded libraries from /proc (Linux)")
def test_it_runs_in_torchs_openmp_runtime_not_a_second_one():
    # Our library depends on the soname libgomp.so.1; other packages vendor renamed copies (scikit-learn's
    # libgomp-<hash>.so), which are not what it binds to.
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if Path(line.split()[-1]).name.startswith("libgomp.so")}
    assert len(runtimes) <= 1, runtimes


def test_other_inputs_are_left_to_torch():
    x = approximations(0)
    assert mask_kernel.select_bias(x.double(), 17, 1) is None
    assert mask_kernel.select_bias(x.requires_grad_(), 17, 1) is None
    assert mask_kernel.select_bias(x.detach()[:, :, :10], 17, 1) is None  # not [N - P, N]


@needs_kernel
def test_a_kernel_that_cannot_allocate_leaves_every_row_to_torchs_top_k(monkeypatch):
    """The kernel reports failure (its row buffer could not be allocated) having written nothing: every row is
    then redone by torch's top-k, so the mask is still exactly torch's."""
    lib = mask_kernel._lib

    class Failing:
        def __getattr__(self, name):
            return getattr(lib, name)

        def sparsifiner_select_bias(self, *args):
            return 1

        def sparsifiner_combine_select_bias(self, *args):
            return 1

    monkeypatch.setattr(mask_kernel, "_lib", Failing())
    x = approximations(5)
    assert torch.equal(mask_kernel.select_bias(x, 17, 1), torch_bias(x, 17, 1, monkeypatch))
    index, values, basis = combination_terms(5)
    want = torch_bias(_csr_combination(index, values, basis), 17, 1, monkeypatch)
    assert torch.equal(mask_kernel.combine_select_bias(index, values, basis, 17, 1), want)
