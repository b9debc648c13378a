"""`forward_tokens(images, layer, class_token)`: the tokens after a block, as LLaVA selects them,
for students (SparseFormer, MediaSparseFormer) and teachers (open_clip, timm)."""

import warnings

import pytest
import torch

from students import MediaSparseFormer, SparseFormer
from students.sparseformer.construct import bootstrap_student, inherited_units
from students.sparseformer.released import v1_config
from teachers import create_teacher

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 6, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TEACHER_SPECS = {
    "openclip": {"kind": "openclip", "model": "tiny-clip", "model_cfg": TINY_CLIP_CFG, "pretrained": None},
    "timm": {"kind": "timm", "model": "vit_tiny_patch16_224", "pretrained": None,
             "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 64, "num_heads": 2}},
    "dinov2_reg": {"kind": "timm", "model": "vit_small_patch14_reg4_dinov2", "pretrained": None,
                   "model_kwargs": {"img_size": 28, "patch_size": 7, "depth": 6, "embed_dim": 64, "num_heads": 2,
                                    "init_values": 1.0}},
}


def make_teacher(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights warn, on purpose
        teacher = create_teacher(TEACHER_SPECS[kind])
    with torch.no_grad():  # random norms and biases: an identity LayerNorm would hide a missing norm
        for p in teacher.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return teacher


@pytest.fixture(scope="module", params=list(TEACHER_SPECS))
def teacher(request):
    torch.manual_seed(0)
    return make_teacher(request.param)


@pytest.fixture(scope="module")
def clip_student():
    torch.manual_seed(1)
    teacher = make_teacher("openclip")
    student, _ = bootstrap_student(teacher, tokens=9, num_points=4, conv_dim=16, pg_inner_dim=16)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student.eval()


def _images(teacher_or_size, batch=2):
    size = teacher_or_size.preprocess.size if hasattr(teacher_or_size, "preprocess") else teacher_or_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(3))


# --------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------
def test_student_blocks_are_the_inherited_teacher_blocks(clip_student):
    teacher, student = clip_student
    x = _images(teacher)
    blocks = inherited_units(student)
    assert student.num_blocks == len(blocks) == teacher.depth - teacher.depth // 3
    with torch.no_grad():
        tokens = student.forward_tokens(x, layer=0)
        assert tokens.shape == (2, 9, teacher.width)  # 8 latent tokens + the class token, entering block 0
        for k, block in enumerate(blocks, start=1):
            tokens, _ = block(tokens, None, None)
            torch.testing.assert_close(student.forward_tokens(x, layer=k), tokens, rtol=0, atol=0)
            if k < student.num_blocks:  # -1 is the final-normed output instead
                torch.testing.assert_close(student.forward_tokens(x, layer=k - student.num_blocks - 1), tokens,
                                           rtol=0, atol=0)


def test_student_last_layer_is_final_normed_and_the_class_token_is_optional(clip_student):
    teacher, student = clip_student
    x = _images(teacher)
    with torch.no_grad():
        details = student.forward_details(x)
        last = student.forward_tokens(x)
        torch.testing.assert_close(last, details.tokens, rtol=0, atol=0)
        raw = student.forward_tokens(x, layer=student.num_blocks)
        torch.testing.assert_close(student.norm(raw), last, rtol=0, atol=0)
        assert not torch.allclose(raw, last)
        # The class token is first; the model's head reads it.
        torch.testing.assert_close(student.proj(last[:, 0]), student(x), rtol=1e-5, atol=1e-6)
        for layer in (-1, -2, 0):
            with_cls = student.forward_tokens(x, layer=layer)
            without = student.forward_tokens(x, layer=layer, class_token=False)
            assert without.shape == (2, 8, teacher.width)
            torch.testing.assert_close(without, with_cls[:, 1:], rtol=0, atol=0)


def test_student_hidden_states_of_one_pass_are_the_selected_tokens(clip_student):
    teacher, student = clip_student
    x = _images(teacher)
    with torch.no_grad():
        states = student.forward_hidden_states(x)
        assert len(states) == student.num_blocks + 1
        for layer in range(-len(states) + 1, len(states)):
            if layer != -1:
                torch.testing.assert_close(states[layer], student.forward_tokens(x, layer=layer), rtol=0, atol=0)


@pytest.mark.parametrize("layer", [5, -6, 1.0, True])
def test_student_layer_outside_the_model_names_the_range(clip_student, layer):
    teacher, student = clip_student
    with pytest.raises(IndexError, match=r"4 blocks, so layer must be an integer in \[-5, 4\]"):
        student.forward_tokens(_images(teacher), layer=layer)


def test_v1_blocks_follow_the_focusing_units_and_there_is_no_class_token():
    cfg = v1_config("tiny_v1", 9, 64, 64, 3, 0.0)
    model = SparseFormer({**cfg, "num_sampling_points": 4, "conv_dim": 16}).eval()
    assert model.num_blocks == 3  # the two focusing units carry RoI ops; the plain blocks follow
    x = _images((32, 32))
    with torch.no_grad():
        out = model.forward_tokens(x, layer=-2, class_token=False)
        torch.testing.assert_close(out, model.forward_tokens(x, layer=-2), rtol=0, atol=0)  # nothing to drop
        assert out.shape == (2, 9, 64)
        torch.testing.assert_close(model.forward_tokens(x), model.forward_details(x).tokens, rtol=0, atol=0)


def test_media_sparseformer_selects_tokens_of_a_video():
    torch.manual_seed(4)
    teacher = make_teacher("timm")
    student, _ = bootstrap_student(teacher, tokens=5, num_points=4, conv_dim=16, pg_inner_dim=16)
    video = MediaSparseFormer(student.config, replicates=2).eval()
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert video.forward_tokens(x, layer=-2, class_token=False).shape == (1, 8, 64)
        torch.testing.assert_close(video.forward_tokens(x), video.forward_details(x).tokens, rtol=0, atol=0)


# --------------------------------------------------------------------------
# Teachers: against each library's own token outputs
# --------------------------------------------------------------------------
def test_teacher_last_layer_is_the_librarys_own_final_tokens(teacher):
    x = _images(teacher)
    with torch.no_grad():
        if teacher.kind == "timm":
            ref = teacher.model.forward_features(x)  # norm(blocks(...)), every token
            torch.testing.assert_close(teacher.forward_tokens(x), ref, rtol=0, atol=0)
        else:
            visual = teacher.model.visual
            visual.output_tokens = True
            try:
                _, ref = visual(x)  # ln_post on the patch tokens
            finally:
                visual.output_tokens = False
            torch.testing.assert_close(teacher.forward_tokens(x, class_token=False), ref, rtol=0, atol=1e-6)


def test_teacher_intermediate_layers_are_the_librarys_block_outputs(teacher):
    x = _images(teacher)
    n, prefix = teacher.depth, teacher.num_prefix_tokens
    with torch.no_grad():
        for layer in (1, n // 2, -2, n):
            block = layer % (n + 1) - 1  # the block whose output hidden_states[layer] is
            if teacher.kind == "timm":
                (patches, prefix_tokens), = teacher.model.forward_intermediates(
                    x, indices=[block], norm=False, output_fmt="NLC", return_prefix_tokens=True,
                    intermediates_only=True)
                ref = torch.cat([prefix_tokens, patches], dim=1)
            else:
                ref = teacher.model.visual.forward_intermediates(
                    x, indices=[block], output_fmt="NLC", intermediates_only=True,
                    output_extra_tokens=True)
                ref = torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], dim=1)
            ours = teacher.forward_tokens(x, layer=layer)
            assert ours.shape == (2, prefix + teacher.num_patches, teacher.width)
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(teacher.forward_tokens(x, layer=layer, class_token=False), ref[:, prefix:],
                                       rtol=0, atol=1e-6)


def test_teacher_layer_zero_is_the_embedded_input_and_out_of_range_is_refused(teacher):
    x = _images(teacher)
    torch.testing.assert_close(teacher.forward_tokens(x, layer=0), teacher.embed_tokens(x), rtol=0, atol=0)
    with pytest.raises(IndexError, match=r"6 blocks, so layer must be an integer in \[-7, 6\]"):
        teacher.forward_tokens(x, layer=7)
