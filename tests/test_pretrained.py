"""Real checkpoint files, in the layouts the libraries write, load through the code path a user's
weights take; a wrong file is one line naming the config key and the mismatch. (Random weights:
nothing can be downloaded here. The files have the real names, layouts and shapes.)

The real-size CLIP and VGG16 files (~0.6 GB each, ~2 min in all) are marked slow:
`python -m pytest -m slow tests/test_pretrained.py`. The default run checks the same code path on
the tiny CLIP configs."""

import pytest
import torch
from safetensors.torch import save_file

from tiny_sd import save_sd15_layout
from weatherkd.errors import UserError
from weatherkd.losses import restoration as L
from weatherkd.models import clip, diffusion


def open_clip_files(name: str, root):
    """One random open_clip model saved in the three layouts open_clip reads: the Hub's
    open_clip_pytorch_model.bin and open_clip_model.safetensors, and a training checkpoint."""
    model = clip.build_random(name)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    root.mkdir(parents=True)
    torch.save(state, root / "open_clip_pytorch_model.bin")
    save_file(state, root / "open_clip_model.safetensors")
    torch.save({"epoch": 32, "name": name, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               root / "epoch_32.pt")
    return model, [root / "open_clip_pytorch_model.bin", root / "open_clip_model.safetensors", root / "epoch_32.pt"]


REAL = pytest.mark.slow


@pytest.mark.parametrize("name, key, wrong", [
    pytest.param("ViT-B-32", "model.clip.image", "ViT-B-16", marks=REAL),
    pytest.param("RN50x4", "model.clip.residual", "RN50", marks=REAL),
    ("wkd-tiny-vit", "model.clip.image", "wkd-tiny-rn")])
def test_open_clip_checkpoints_load_and_a_wrong_one_is_named(tmp_path, name, key, wrong):
    reference, files = open_clip_files(name, tmp_path / name)
    probe = "visual.conv1.weight"
    for path in files:
        model, random_init = clip.create(clip.ClipTowerConfig(name, str(path)), False, key)
        assert not random_init and torch.equal(model.state_dict()[probe], reference.state_dict()[probe]), path
    # The teacher's taps run on the loaded towers.
    tower = clip.ImagePrior(model) if "vit" in name.lower() else clip.ResidualFeatures(model)
    with torch.no_grad():
        out = tower(torch.rand(1, 3, 64, 64))
    assert (out.shape == (1, tower.width)) if isinstance(tower, clip.ImagePrior) else (len(out) == 4)

    _, (other, *_) = open_clip_files(wrong, tmp_path / wrong)
    with pytest.raises(UserError) as e:
        clip.create(clip.ClipTowerConfig(name, str(other)), False, key)
    msg = str(e.value)
    assert msg.startswith(f"{key}.pretrained: {other} does not fit open_clip {name}: ") and "\n" not in msg
    assert ("differ in shape" in msg and "in the file" in msg) or "are missing" in msg


def test_unreadable_or_pickled_clip_files_are_one_line(tmp_path):
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(b"\x00" * 10)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": print}, pickled)  # a callable: not plain data
    for path in (bad, pickled, tmp_path / "missing.bin"):
        with pytest.raises(UserError) as e:
            clip.create(clip.ClipTowerConfig("ViT-B-32", str(path)), False, "model.clip.image")
        assert str(e.value).startswith("model.clip.image.pretrained: ") and "\n" not in str(e.value)


@REAL
def test_torchvision_vgg16_file_loads_and_vgg11_is_named(tmp_path):
    import torchvision

    vgg = torchvision.models.vgg16()
    torch.save(vgg.state_dict(), tmp_path / "vgg16-397923af.pth")  # torchvision's file: features + classifier
    loss = L.Perceptual(str(tmp_path / "vgg16-397923af.pth"))
    assert torch.equal(loss.features[2].weight, vgg.features[2].weight)
    torch.save(torchvision.models.vgg11().state_dict(), tmp_path / "vgg11.pth")
    with pytest.raises(UserError, match=r"^loss.vgg_weights: .*vgg11.pth does not fit torchvision VGG16: "):
        L.Perceptual(str(tmp_path / "vgg11.pth"))


def test_a_stable_diffusion_15_folder_loads_and_runs_img2img(tmp_path):
    sd = diffusion.load(save_sd15_layout(tmp_path / "stable-diffusion-v1-5"))
    assert sd.prompt_width == 768 and sd.vae.config.scaling_factor == 0.18215
    gens = [torch.Generator().manual_seed(0)]
    out = diffusion.img2img(sd, torch.rand(1, 3, 64, 64), torch.randn(1, 8, 768), strength=0.5, steps=2,
                            generators=gens)
    assert out.shape == (1, 3, 64, 64) and 0 <= float(out.min()) <= float(out.max()) <= 1
    with pytest.raises(UserError, match="sd_path: .* is not a local diffusers Stable Diffusion folder"):
        diffusion.load(tmp_path / "stable-diffusion-v1-5" / "unet")
