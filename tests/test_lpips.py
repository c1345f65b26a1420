"""LPIPS perceptual loss (#11 §8): the lpips package's linear heads + a VGG-16 backbone from a local file (a random
one here); nothing downloads, nothing enters the tokenizer's state_dict, and it is LPIPS Eq. 1 per frame."""

import os

import pytest
import torch

lpips = pytest.importorskip("lpips")

from vidgen.lightning_modules.nn.perceptual import PerceptualLoss  # noqa: E402


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    import torchvision

    torch.manual_seed(0)
    feats = torchvision.models.vgg16(weights=None).features  # random backbone; only features.* are needed
    path = tmp_path_factory.mktemp("vgg") / "vgg16_features.pth"
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
    return str(path)


def test_lpips_loads_local_backbone_and_package_heads(vgg_file):
    loss = PerceptualLoss(vgg_file, kind="lpips")
    net = loss._net[0]
    sd = torch.load(vgg_file)
    assert torch.equal(net.net.slice3._modules["10"].weight, sd["features.10.weight"])  # backbone from the file
    heads = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/vgg.pth"), map_location="cpu")
    assert torch.equal(net.lin0.model[-1].weight, heads["lin0.model.1.weight"])  # heads from the package
    assert not list(loss.parameters()) and not any("net" in k for k in loss.state_dict())

    torch.manual_seed(1)
    real = torch.rand(2, 3, 2, 32, 32)
    fake = (real + 0.2 * torch.randn_like(real)).clamp(0, 1).requires_grad_(True)
    d = loss(real, fake)
    assert loss(real, real).item() == pytest.approx(0.0, abs=1e-7) and d.item() > 0
    # Eq. 1 per frame, averaged over the B*T frames, inputs mapped from [0, 1] to [-1, 1]
    frames = lambda x: x.permute(0, 2, 1, 3, 4).reshape(-1, 3, 32, 32)  # noqa: E731
    want = net(frames(fake) * 2 - 1, frames(real) * 2 - 1).mean()
    torch.testing.assert_close(d, want)
    d.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0


def test_tokenizer_uses_lpips_and_checks_the_path(vgg_file, tmp_path):
    from vidgen.lightning_modules.nn.conv3d import ConfigError
    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    arch = dict(kind="magvit", filters=8, channel_multipliers=(1, 2), num_res_blocks=1, norm_groups=4,
                temporal_downsample=(True,))
    loss = dict(perceptual_kind="lpips", perceptual_weights=vgg_file, perceptual_weight=1.0)
    tok = VideoTokenizer(arch=arch, bottleneck=dict(kind="kl", dim=4), discriminator=dict(enabled=False),
                         loss=loss, num_frames=4, resolution=16)
    assert tok.perceptual.kind == "lpips" and tok.perceptual.enabled
    assert not any(k.startswith("perceptual") and "net" in k for k in tok.state_dict())
    with pytest.raises(ConfigError, match="perceptual_weights"):
        VideoTokenizer.validate_config({"arch": arch, "loss": {**loss, "perceptual_weights": str(tmp_path / "no.pth")},
                                        "num_frames": 4, "resolution": 16})
    with pytest.raises(ConfigError, match="perceptual_kind"):
        VideoTokenizer.validate_config({"arch": arch, "loss": {"perceptual_kind": "vgg"}, "num_frames": 4,
                                        "resolution": 16})
