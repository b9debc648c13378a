"""Both student families compile whole under `torch.compile(fullgraph=True)` and give eager's outputs.

The graphs are checked with the `aot_eager` backend: dynamo's capture (no graph break), fake-tensor shape
propagation and AOT tracing, without the minutes Inductor's C++ code generation takes on two cores.
"""

import json

import pytest
import torch

from conftest import GOLDEN
from students import SparseFormer, Sparsifiner
from students.sparsifiner import mask_kernel

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5, basis_coef_topk=2)


def compile_and_run(model, images):
    """(compiled output, the FX code of every graph dynamo captured)."""
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend=backend)(images)
    torch._dynamo.reset()
    return out, graphs


def test_sparseformer_compiles_whole_and_matches_eager():
    torch.manual_seed(0)
    model = SparseFormer(json.loads((GOLDEN / "tiny_btsp_clip.json").read_text())["config"]).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(images)
    got, graphs = compile_and_run(model, images)
    assert len(graphs) == 1
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


# "select": the approximation is formed and the kernel selects from it (K = 2 basis rows, a dense product);
# "fused": K = 17 >= 4 x top-2 makes it a CSR product on a CPU, which the kernel sums and selects in one pass.
@pytest.mark.parametrize("path,extra", [("select", {}), ("fused", {"reduce_n_factor": 1})])
def test_sparsifiner_with_the_compiled_mask_kernel_compiles_whole_and_matches_eager(path, extra):
    if not mask_kernel.available():
        pytest.skip(f"no compiled selection here: {mask_kernel.unavailable_reason()}")
    torch.manual_seed(0)
    model = Sparsifiner({**TINY, **extra}).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(images)
    got, graphs = compile_and_run(model, images)
    assert len(graphs) == 1
    op = "sparsifiner_select_bias" if path == "select" else "sparsifiner_combine_select_bias"
    assert op in graphs[0]  # the kernel runs inside the compiled graph, not torch's slower path
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
