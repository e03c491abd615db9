"""The teacher's parts in process: its losses against skimage, CLIP towers from local files, the net at any size."""

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from weatherkd import models
from weatherkd.errors import UserError
from weatherkd.losses import restoration as L
from weatherkd.models import clip


def photo_pair():
    clean = skimage.data.astronaut()[:96, :128].astype(np.float64) / 255
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 0.05, clean.shape), 0, 1)
    to_t = lambda a: torch.from_numpy(a).permute(2, 0, 1)[None]  # noqa: E731
    return clean, noisy, to_t(clean), to_t(noisy)


def test_ssim_and_psnr_losses_match_skimage():
    clean, noisy, tc, tn = photo_pair()
    ref = structural_similarity(clean, noisy, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert abs(float(L.ssim(tn, tc)[0]) - ref) < 1e-6
    assert float(L.ssim_loss(tc, tc)) == pytest.approx(0.0, abs=1e-7)
    assert float(L.ssim_loss(tn, tc)) == pytest.approx(1 - ref, abs=1e-6)
    psnr = peak_signal_noise_ratio(clean, noisy, data_range=1.0)
    assert float(L.psnr_loss(tn, tc, ceiling_db=90)) * -10 == pytest.approx(psnr, abs=1e-4)
    assert 0 < psnr + float(L.psnr_loss(tn, tc)) * 10 < 0.2  # the 40 dB ceiling barely moves a 26 dB image


def test_the_psnr_loss_of_an_image_already_restored_stays_bounded():
    """A clean pair returned almost exactly must not outweigh the degraded images (it did, without
    the ceiling: the teacher learned to return its input unchanged)."""
    clean, noisy, tc, tn = photo_pair()
    grads = []
    for err in (0.05, 1e-3, 1e-5):  # per-pixel error of the output
        out = (tc + err * torch.randn_like(tc)).requires_grad_()
        L.psnr_loss(out, tc).backward()
        grads.append(float(out.grad.norm()))
    assert grads[2] < grads[1] < 10 * grads[0], grads


def test_the_keep_loss_reads_only_what_the_weather_left_alone_and_pulls_as_hard_on_small_changes():
    clean, noisy, tc, tn = photo_pair()
    x = tc.clone()
    x[..., :48, :] += torch.where(tc > 0.5, -0.1, 0.1)[..., :48, :]  # weather on the top half, clean below
    out = x.clone()
    out[..., :48, :] = tc[..., :48, :]  # restored where there was weather: nothing for this loss to say
    assert float(L.keep_loss(out, x, tc)) == 0.0
    out[..., 48:, :] += 0.01  # a small change where nothing was degraded
    share = 48 / 96  # the loss is a mean over every pixel
    assert float(L.keep_loss(out, x, tc)) == pytest.approx(0.01 * share, rel=1e-6)
    grads = []
    for err in (0.05, 1e-3):  # L1's pull: the same for a big and a small change
        o = (x + err).requires_grad_()
        L.keep_loss(o, x, tc).backward()
        grads.append(float(o.grad.abs().sum()))
    assert grads[0] == pytest.approx(grads[1])


def test_text_classification_is_cross_entropy_with_soft_labels():
    torch.manual_seed(0)
    emb, text = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(3, 8), dim=-1)
    labels = torch.tensor([0, 2, 1, 1])
    hard = F.one_hot(labels, 3).float()
    scale = torch.tensor(10.0)
    assert float(L.text_classification(emb, text, scale, hard)) == pytest.approx(
        float(F.cross_entropy(scale * emb @ text.t(), labels)), abs=1e-6)
    soft = 0.7 * hard + 0.3 * F.one_hot(torch.tensor([1, 0, 2, 0]), 3).float()
    logp = F.log_softmax(scale * emb @ text.t(), -1)
    assert float(L.text_classification(emb, text, scale, soft)) == pytest.approx(
        float(-(soft * logp).sum(1).mean()), abs=1e-6)


def test_srd_is_zero_when_features_match_and_scale_free():
    torch.manual_seed(0)
    weather = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    clean = [torch.randn_like(f) for f in weather]
    residual = [w - c for w, c in zip(weather, clean)]
    assert float(L.srd_loss(residual, weather, clean)) == pytest.approx(0.0, abs=1e-5)
    assert float(L.srd_loss([3 * r for r in residual], weather, clean)) == pytest.approx(0.0, abs=1e-5)
    # Wider CLIP features are channel-pooled and resized to the SAR map: pooled copies match exactly.
    wide_w, wide_c = [torch.randn(2, 32, 16, 16)], [torch.zeros(2, 32, 16, 16)]
    sar = [F.interpolate(L.channel_pool(wide_w[0], 8), size=(8, 8), mode="bilinear", align_corners=False)]
    assert float(L.srd_loss(sar, wide_w, wide_c)) == pytest.approx(0.0, abs=1e-5)
    assert float(L.srd_loss([torch.randn(2, 8, 8, 8)], weather[:1], clean[:1])) > 0.3


def test_perceptual_loss_needs_local_weights_and_loads_them(tmp_path):
    with pytest.raises(UserError, match="loss.vgg_weights: the perceptual loss needs local VGG16 weights"):
        L.Perceptual("")
    with pytest.raises(UserError, match="file not found"):
        L.Perceptual(str(tmp_path / "vgg.pth"))
    import torchvision

    vgg = torchvision.models.vgg16().features[:16]  # a random VGG, saved the way torchvision lays it out
    torch.save({f"features.{k}": v for k, v in vgg.state_dict().items()}, tmp_path / "vgg.pth")
    loss = L.Perceptual(str(tmp_path / "vgg.pth"))
    assert torch.equal(loss.features[0].weight, vgg[0].weight)
    _, _, tc, tn = photo_pair()
    assert float(loss(tc.float(), tc.float())) == 0.0
    pred = tn.float().requires_grad_()
    value = loss(pred, tc.float())
    value.backward()
    assert value.item() > 0 and pred.grad is not None
    assert all(p.grad is None for p in loss.parameters())


def test_clip_towers_from_local_files_or_loud_random(tmp_path):
    with pytest.raises(UserError, match=r"model.clip.image.pretrained is not set"):
        clip.create(clip.ClipTowerConfig("wkd-tiny-vit"), False, "model.clip.image")
    with pytest.raises(UserError, match="model.clip.image.pretrained: file not found"):
        clip.create(clip.ClipTowerConfig("wkd-tiny-vit", str(tmp_path / "nope.pt")), False, "model.clip.image")
    with pytest.warns(UserWarning, match="random wkd-tiny-vit tower"):
        model, random_init = clip.create(clip.ClipTowerConfig("wkd-tiny-vit"), True, "model.clip.image")
    assert random_init
    # A local checkpoint goes through open_clip's own loader (the path real ViT-B-32 weights take).
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    loaded, random_init = clip.create(clip.ClipTowerConfig("wkd-tiny-vit", str(tmp_path / "tiny.pt")), False, "k")
    assert not random_init
    x = torch.rand(2, 3, 40, 56)
    assert torch.allclose(clip.ImagePrior(loaded)(x), clip.ImagePrior(model)(x))
    assert clip.ImagePrior(model)(x).shape == (2, 64)
    rn, _ = clip.create(clip.ClipTowerConfig("wkd-tiny-rn"), True, "model.clip.residual")
    feats = clip.ResidualFeatures(rn)(x)
    assert [f.shape[1] for f in feats] == [16, 128, 256, 512]  # stem, layer2, layer3, layer4
    text = clip.text_features(model, "wkd-tiny-vit", clip.weather_prompts(["rain_haze", "snow"]))
    assert text.shape == (2, 32) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    assert clip.weather_prompts(["rain_haze"]) == ["An image with rain and haze"]


def test_clipweather_any_size_tiled_and_baseline():
    net = models.build("clipweather_net", size="tiny", prior_dim=64, text_dim=32)
    prior = torch.rand(1, 64)
    for h, w in ((37, 50), (64, 64), (100, 33)):
        assert net(torch.rand(1, 3, h, w), prior).shape == (1, 3, h, w)
    x = torch.rand(1, 3, 20, 24)
    assert torch.allclose(net(x, prior), x, atol=1e-6), "a fresh net starts as the identity"
    with pytest.raises(ValueError, match="needs the CLIP prior"):
        net(x)
    base = models.build("transweather", size="tiny")
    assert base(torch.rand(2, 3, 40, 40)).shape == (2, 3, 40, 40)
    assert not any("prior_embed" in n or ".sar." in n for n, _ in base.named_parameters())
    params = sum(p.numel() for p in models.build("clipweather_net", size="base", prior_dim=768).parameters())
    assert 30e6 < params < 45e6  # the paper: 126M with CLIP ViT-B/32 (~88M)


def test_clipweather_decoder_norm_adds_batchnorm_to_the_conv_path_only():
    plain = models.build("clipweather_net", size="tiny", prior_dim=64, text_dim=32)
    net = models.build("clipweather_net", size="tiny", prior_dim=64, text_dim=32, decoder_norm="batch")
    norms = [n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(n.split(".")[0] in ("up3", "up2", "up1", "stem", "head") for n in norms)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    # Only normalisation layers were added: the convs and attention are the same shapes.
    conv_shapes = lambda m: [p.shape for n, p in m.named_parameters() if p.dim() > 1]  # noqa: E731
    assert conv_shapes(net) == conv_shapes(plain)
    x, prior = torch.rand(2, 3, 40, 36), torch.rand(2, 64)
    assert torch.allclose(net(x, prior), x, atol=1e-6), "it starts as the identity, in training mode too"
    assert torch.allclose(net.eval()(x, prior), x, atol=1e-6)
    with pytest.raises(UserError, match="decoder_norm must be 'none' or 'batch'"):
        models.build("clipweather_net", size="tiny", decoder_norm="layer")
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in models.build("transweather", decoder_norm="batch").modules())
