"""The demo probe (issue 10 §2): label algebra, augmentation that keeps labels true, accuracy on real val clips."""

import os
from types import SimpleNamespace

import pytest
import torch

from vidgen.lightning_modules.probe import VideoProbe, fit_clip


def test_class_is_shape_times_direction_and_caption_words_fill_the_rest():
    p = VideoProbe(channels=[8, 8, 8], norm_groups=4)
    t = p.targets(None, ["a yellow triangle moving up", "a photo of a cat"])
    assert t["class"].tolist() == [2 * 4 + 2, -1] and t["colour"].tolist() == [3, -1]
    assert p.chance()["class"] == pytest.approx(1 / 12)


def test_reversal_and_mirror_swap_the_direction_label_with_the_pixels():
    torch.manual_seed(0)
    p = VideoProbe(channels=[8, 8, 8], norm_groups=4, temporal_strides=[1])
    video = torch.arange(2 * 3 * 8 * 4 * 4, dtype=torch.float32).reshape(2, 3, 8, 4, 4)
    tgt = p.targets(torch.tensor([0, 6]), None)  # square left, circle up
    for _ in range(20):
        out, t = p._augment(video, tgt)
        for i in range(2):
            combos = {(r, m): video[i].flip(1) if r else video[i] for r in (0, 1) for m in (0, 1)}
            combos = {k: (v.flip(3) if k[1] else v) for k, v in combos.items()}
            (reversed_, mirrored), = [k for k, v in combos.items() if torch.equal(out[i], v)]
            d0 = tgt["direction"][i].item()
            expect = d0
            if reversed_:
                expect = {0: 1, 1: 0, 2: 3, 3: 2}[expect]
            if mirrored:
                expect = {0: 1, 1: 0}.get(expect, expect)
            assert t["direction"][i].item() == expect
            assert t["class"][i].item() == t["shape"][i].item() * 4 + expect


def test_fit_clip_picks_frames_evenly_and_resizes():
    v = torch.arange(16.0).view(1, 1, 16, 1, 1).expand(1, 3, 16, 64, 64)
    out = fit_clip(v, 8, 32)
    assert out.shape == (1, 3, 8, 32, 32)
    assert out[0, 0, :, 0, 0].tolist() == torch.linspace(0, 15, 8).round().tolist()


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo data set as ``vidgen demo`` builds it (768 procedural train clips, 48 per val/test, the real clips),
    in a temporary folder: ~20-30 s. ``fast=True`` (48 train / 12 val clips) also reads 100%, but 95% of 12 clips
    is all of them; the full set is what the demo's probe is trained and measured on."""
    from vidgen.demo_data import build_demo_data

    out = tmp_path_factory.mktemp("demo_data")
    build_demo_data(str(out), seed=0, fast=False)
    return out


@pytest.mark.slow
def test_probe_accuracy_on_real_val_clips(demo_data, tmp_path):
    """Issue 10: the probe (configs/eval/probe_tiny.yaml, its 500 steps: the demo's own stage) reaches >= 95% on
    every head on the real procedural val clips. ~140 CPU-s with the data build (measured 2.5 min on one core)."""
    from vidgen.demos import probe

    ctx = SimpleNamespace(data_dir=demo_data, out_dir=tmp_path, fast=False, seed=0, results={}, log=lambda m: None)
    res = probe.run(ctx)
    # issue 10 asks for >= 95% class accuracy: measured 100% on every head (48 clips, 500 steps, 768 train clips);
    # with 192 train clips and 600 steps an older probe read 85% (square vs circle at 32^2 is the hard part)
    assert res["summary"].startswith("probe accuracy on 48 real val clips"), res["summary"]
    assert all(v >= 0.95 for v in res["accuracy"].values()), res["summary"]
    assert os.path.isfile(res["checkpoint"])
