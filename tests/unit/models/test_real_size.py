"""The allweather configs' models at their real sizes, with random weights built offline: what
the papers report, and what each student was sized to."""

from pathlib import Path

import pytest
import torch

from weatherkd import config as C
from weatherkd import cost, models, stages

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
PAPER_TEACHER_PARAMS, PAPER_TEACHER_GFLOPS = 126e6, 51.5  # Tan et al. 2024 (docs/references.md), at 256×256
DCKD_STUDENT_SHARE = 3.8 / 26.1  # DCKD: the deraining student's parameters over its teacher's


def load(stage: str, name: str = "allweather"):
    return C.load(stages.get(stage).config_class, CONFIGS / stage / f"{name}.yaml")


def built(stage: str, name: str = "allweather") -> torch.nn.Module:
    m = load(stage, name).model
    return models.build(m.arch, **m.arch_kwargs())


@pytest.fixture(scope="module")
def teacher():
    """The exported allweather teacher (the net + its ViT-B-32 image tower, as `weatherkd teacher`
    exports it; the RN50x4 tower serves CLIP-SRD in training only and is not part of it)."""
    m = load("teacher").model
    model = models.build("clipweather", net={"size": m.size, "prior_dim": 768, "text_dim": 512},
                         clip_image=m.clip.image.name).eval()
    return model, cost.params(model), cost.flops(model, 256)


def test_the_teacher_is_the_papers_size(teacher):
    teacher, params, flops = teacher
    gflops = flops / 1e9
    assert abs(params / PAPER_TEACHER_PARAMS - 1) <= 0.10, params
    assert abs(gflops / PAPER_TEACHER_GFLOPS - 1) <= 0.10, gflops
    assert cost.params(teacher.prior) > 80e6  # the count includes the ViT-B-32 image tower


def test_the_students_meet_their_targets(teacher):
    _, teacher_params, teacher_flops = teacher
    large, medium = built("distill"), built("distill", "allweather-student-medium")
    assert abs(cost.params(large) / (DCKD_STUDENT_SHARE * teacher_params) - 1) <= 0.10
    assert abs(cost.flops(medium, 256) / (teacher_flops / 10) - 1) <= 0.10
    x = torch.rand(1, 3, 67, 93)  # any size
    with torch.no_grad():
        assert large(x).shape == medium(x).shape == x.shape


def test_the_vq_has_the_five_levels_dckd_weights():
    vq = built("vq")
    levels = vq.features(torch.zeros(1, 3, 32, 32))
    assert len(levels) == len(load("distill").dckd.level_weights) == 5
