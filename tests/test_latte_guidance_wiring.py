"""Latte.generate end to end with a network of known output: the requested labels reach the network, the
unconditional branch gets the null class K, classifier-free guidance uses the configured scale, and the sampled
latents are decoded with the VAE's scale_factor undone (the three ways a class-conditional demo can look untrained
while its loss falls; checked for issue 10)."""

import torch
from einops import repeat
from torch import nn

from vidgen.lightning_modules.latte import Latte


class ClassLatents(nn.Module):
    """Predicts x0 = the latent clip of its class (row K: the null class), whatever x_t and t are."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)  # [K + 1, F, C, h, w]
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, y=None, **_):
        self.seen.append(y.clone())
        return self.table[y].to(x.dtype)


def test_generate_guides_with_the_null_class_and_decodes_unscaled_latents():
    k, s, scale = 5, 3.0, 0.5
    model = Latte(size="S", depth=2, hidden_size=32, num_heads=2, num_frames=4, resolution=16, num_classes=k,
                  class_dropout_prob=0.1, vae={"kind": "pixels", "factor": 2, "scale_factor": scale},
                  learn_sigma=False, diffusion={"predict": "x0"}, sampler="ddim", sample_steps=4, cfg_scale=s)
    c = model.config
    table = (torch.rand(k + 1, c.num_frames, c.in_channels, c.input_size, c.input_size,
                        generator=torch.Generator().manual_seed(0)) - 0.5) * 0.1
    model.model = ClassLatents(table)
    labels = torch.tensor([3, 0, 4])
    video = model.generate({"label": labels}, generator=torch.Generator().manual_seed(1))

    y_seen = torch.stack(model.model.seen)  # [steps, 2B]: one doubled batch [cond; uncond] per step
    assert y_seen.shape == (4, 6)
    assert (y_seen[:, :3] == labels).all() and (y_seen[:, 3:] == k).all()
    # DDIM's last step returns the guided x0 prediction: z_null + s (z_y - z_null), in the scaled latent space
    z = table[k] + s * (table[labels] - table[k])
    frames = torch.nn.functional.interpolate(
        (z / scale).flatten(0, 1), scale_factor=2, mode="nearest").unflatten(0, (3, c.num_frames))
    want = repeat(frames, "b f c h w -> b c f h w").clamp(-1, 1)
    torch.testing.assert_close(video, want, atol=1e-5, rtol=0)
