"""``pixel``: the distance the distill step's kd and gt terms use (the consistency term is left to
test_distill_consistency.py, which checks it is L1)."""

import pytest
import torch

from weatherkd import config as C
from weatherkd import models
from weatherkd.recipes import distill

DISTANCES = {"l1": lambda a, b: (a - b).abs().mean(),
             "l2": lambda a, b: (a - b).pow(2).mean(),
             # Huber with β 1 (the student's output is not clamped, so an error may pass 1).
             "smooth_l1": lambda a, b: torch.where((a - b).abs() < 1, 0.5 * (a - b).pow(2),
                                                   (a - b).abs() - 0.5).mean()}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    net = models.build("residual_cnn", width=8, depth=3)
    torch.nn.init.normal_(net.body[-1].weight, 0, 0.2)
    return models.save(net, tmp_path_factory.mktemp("pixel") / "teacher")


def recipe_for(*overrides):
    recipe = distill.DistillRecipe(C.load(distill.Config, "configs/distill/demo.yaml", list(overrides)))
    for module in recipe.frozen.values():
        module.requires_grad_(False).eval()
    return recipe


@pytest.mark.parametrize("pixel", list(DISTANCES))
def test_the_kd_and_gt_terms_use_the_chosen_distance(teacher, pixel):
    torch.manual_seed(1)
    x, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    distance = DISTANCES[pixel]
    scratch = recipe_for("objective=scratch", f"pixel={pixel}")
    with torch.no_grad():
        losses = scratch.step(scratch.model, {"input": x, "target": target}, step=0)
        assert losses["gt"].item() == pytest.approx(distance(scratch.model(x), target).item(), rel=1e-5)
    kd = recipe_for("objective=kd", f"teacher={teacher}", "w_kd=2.0", "w_gt=0.5", f"pixel={pixel}")
    with torch.no_grad():
        losses = kd.step(kd.model, {"input": x, "target": target}, step=0)
        out, taught = kd.model(x), kd.frozen["teacher"](x).clamp(0, 1)
        assert losses["kd"].item() == pytest.approx(2.0 * distance(out, taught).item(), rel=1e-5)
        assert losses["gt"].item() == pytest.approx(0.5 * distance(out, target).item(), rel=1e-5)
        assert losses["loss"].item() == pytest.approx(losses["kd"].item() + losses["gt"].item(), rel=1e-6)


def test_l1_is_the_default_and_an_unknown_distance_is_a_config_error():
    assert C.load(distill.Config, "configs/distill/demo.yaml").pixel == "l1"
    with pytest.raises(C.ConfigError, match="must be one of 'l1', 'l2', 'smooth_l1'"):
        C.load(distill.Config, "configs/distill/demo.yaml", ["pixel=l3"])
