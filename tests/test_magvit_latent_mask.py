"""MAGVIT latent condition of the dynamic tasks (#11 §10): the paper's ispad rule (default) vs the released code's
stripe re-drawn at latent resolution (``latent_mask: official``)."""

import pytest
import torch

from vidgen.lightning_modules.magvit import (LATENT_MASK_RULES, MagvitConfig, MagvitConfigError, get_task,
                                             latent_condition_mask, official_latent_mask)


def test_official_rule_is_the_latent_stripe_and_differs_from_ispad():
    grid = (4, 16, 16)
    opd = get_task("OPD")
    official = official_latent_mask(opd, grid)
    w0 = torch.linspace(0, 8, 4).round().long()  # the released code's linspace(0, 8, 4) on the 16-wide grid
    cols = torch.arange(16)
    want = torch.stack([((cols >= s) & (cols < s + 8)).expand(16, 16) for s in w0])
    assert torch.equal(official, want)
    # paper: a supervoxel (4 frames x 4 x 4 px) is given when any of its pixels is; the pixel stripe moves inside
    # each 4-frame block, so ispad marks more columns given than the re-drawn latent stripe
    paper = latent_condition_mask(opd.given_pixels(16, 64, 64), grid)
    assert not torch.equal(paper, official) and bool((official <= paper).all())
    ipd = get_task("IPD")
    lat = official_latent_mask(ipd, grid)
    assert torch.equal(~lat, want & torch.stack([((cols >= 4) & (cols < 12))[:, None].expand(16, 16)] * 4))
    with pytest.raises(ValueError, match="OPD / IPD"):
        official_latent_mask(get_task("FP"), grid)


def test_latent_mask_option_is_validated():
    assert LATENT_MASK_RULES == ("paper", "official") and MagvitConfig().latent_mask == "paper"
    with pytest.raises(MagvitConfigError, match="latent_mask"):
        MagvitConfig(latent_mask="released", codebook_size=8, token_shape=[1, 2, 2]).validate()
