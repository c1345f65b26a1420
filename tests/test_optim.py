"""``nn.optim.cpu_multi_tensor``: the multi-tensor (``foreach``) Adam/AdamW step on CPU gives the parameters bit for bit
what torch's default per-parameter loop gives (it only removes the loop's Python overhead)."""

import pytest
import torch
from torch import nn

from vidgen.lightning_modules.nn.optim import cpu_multi_tensor


def _train(make_opt, steps: int = 12):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    opt = make_opt(net)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=g) * 10.0 ** (i % 3 - 1)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()], opt


@pytest.mark.parametrize("kind", ["adamw_groups", "adam"])
def test_multi_tensor_step_matches_the_per_parameter_loop_bitwise(kind):
    def make(multi):
        def f(net):
            if kind == "adam":
                opt = torch.optim.Adam(net.parameters(), lr=3e-3, betas=(0.9, 0.99))
            else:
                decay = [p for p in net.parameters() if p.ndim > 1]
                rest = [p for p in net.parameters() if p.ndim <= 1]
                opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                        lr=2e-3, betas=(0.9, 0.96))
            return cpu_multi_tensor(opt) if multi else opt
        return f

    loop, opt_loop = _train(make(False))
    multi, opt_multi = _train(make(True))
    assert all(g["foreach"] is None for g in opt_loop.param_groups)
    assert all(g["foreach"] is True for g in opt_multi.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(loop, multi))
    assert not all(torch.equal(a, b) for a, b in zip(loop, _train(make(False), steps=11)[0]))  # the check can fail


def test_groups_that_chose_keep_their_choice():
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, device="meta"))
    opt = cpu_multi_tensor(torch.optim.AdamW([{"params": [p], "foreach": False}, {"params": [q]}]))
    assert opt.param_groups[0]["foreach"] is False  # named explicitly
    assert opt.param_groups[1]["foreach"] is None  # not a CPU tensor: torch decides
