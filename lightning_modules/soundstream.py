"""SoundStream-style audio tokenizer (Zeghidour et al. 2021) as VideoPoet uses it (spec make_a_video_videopoet.md
§2.2): a convolutional waveform autoencoder with a residual VQ bottleneck, **4 levels × 1024 codes** at about
**50 latent frames per second** (16 kHz with stride 2·4·5·8 = 320; 2.125 s → 106 frames → 424 tokens).

Reading order, as in the paper:

1. :class:`CausalConv1d`, :class:`ResidualUnit`, :class:`EncoderBlock`, :class:`DecoderBlock` — SoundStream Fig. 3:
   each encoder block is residual units with dilations 1, 3, 9 followed by a strided convolution that doubles the
   channels; the decoder mirrors it with transposed convolutions. Causal padding (the streaming codec).
2. ``nn.quantizers.ResidualVectorQuantizer`` — the RVQ of §2.2, shared with the other tokenizers' VQ code.
3. :class:`STFTDiscriminator`, :class:`MultiScaleSTFTDiscriminator` — SoundStream's STFT discriminator (2D
   convolutions on the real and imaginary parts of the complex STFT), at several window lengths (EnCodec's
   multi-scale form).
4. :class:`SoundStream` — the LightningModule. Generator loss (SoundStream §3.4)::

       L_G = λ_wave·|x − x̂|₁ + λ_spec·Σ_s (|S_s(x) − S_s(x̂)|₁ + α_s·‖log S_s(x) − log S_s(x̂)‖₂) + RVQ terms
             + λ_adv·mean_k softplus(−D_k(x̂)) + λ_feat·feature matching
       L_D = mean_k softplus(−D_k(x)) + softplus(D_k(x̂))

   with G and D updated from one forward pass (manual optimisation), the adversarial and R1-free non-saturating
   losses of the video tokenizer (``nn.gan_losses``).

Choices that differ from the paper, each stated once:

- Spectral loss on linear-frequency STFT magnitudes (SoundStream: mel), windows ``2^6 … 2^11`` at 16 kHz, α_s =
  sqrt(s/2) [deviation: no mel filterbank here].
- Non-saturating GAN loss (SoundStream: hinge), so the audio and video tokenizers share ``nn.gan_losses``.
- Codebooks initialised from the first batch's residual vectors (SoundStream: k-means on the first batch); no
  EMA codebook updates (the shared VQ learns its codebook by gradient) and no quantizer dropout.
- Training on random crops of ``train_crop_seconds`` (SoundStream trains on short crops too).
- A clip of ``S`` samples gives ``F = floor(S / hop)`` latent frames (the paper's 2.125 s → 106); decoding gives
  ``F·hop`` samples, zero-padded back to ``S`` by :meth:`SoundStream.reconstruct`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .nn.checkpoint import ema_state_dict, safe_load
from .nn.gan_losses import discriminator_loss, generator_loss
from .nn.quantizers import CodebookUsage, ResidualVectorQuantizer
from .nn.batches import eval_rows
from .nn.step_logs import log_step
from .nn.seeding import step_generator, training_stream

__all__ = ["SoundStreamConfigError", "SoundStreamConfig", "CausalConv1d", "ResidualUnit", "EncoderBlock",
           "DecoderBlock", "AudioEncoder", "AudioDecoder", "STFTDiscriminator", "MultiScaleSTFTDiscriminator",
           "multiscale_spectral_loss", "reconstruction_quality", "SoundStream", "SOUNDSTREAM_SIZES"]


class SoundStreamConfigError(ValueError):
    """A SoundStream setting that cannot work; the message names the key and the fix."""


# ====================================================================================================================
# Config
# ====================================================================================================================
@dataclass
class SoundStreamConfig:
    """Every setting of :class:`SoundStream` (the LightningModule's arguments are these fields)."""

    size: str = "16k"                            # a row of SOUNDSTREAM_SIZES; the fields below override it
    sample_rate: int | None = None
    channels: int | None = None                  # C: the first block's width (then 2C, 4C, ...)
    strides: list[int] | None = None             # hop = product: 320 at 16 kHz → 50 frames/s
    dilations: list[int] = field(default_factory=lambda: [1, 3, 9])
    latent_dim: int | None = None
    levels: int = 4                              # §2.2: 4 RVQ levels
    codebook_size: int = 1024                    # §2.2: 1024 codes per level
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    # generator losses (SoundStream §3.4)
    waveform_weight: float = 1.0
    spectral_weight: float = 1.0
    spectral_windows: list[int] | None = None    # default 2^6 .. 2^11 (scaled with the sample rate)
    adversarial_weight: float = 1.0
    feature_weight: float = 10.0
    # discriminator
    discriminator: bool = True
    disc_ffts: list[int] | None = None           # default (1024, 512, 256) at 16 kHz
    disc_filters: int = 16
    disc_start_step: int = 0
    # optimisation
    lr: float = 1e-4
    disc_lr: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = 0
    total_steps: int | None = None
    gradient_clip: float | None = 1.0
    train_crop_seconds: float | None = 1.0       # random crop per training clip (None: the whole clip)
    seed: int = 0

    def resolved(self) -> "SoundStreamConfig":
        if self.size not in SOUNDSTREAM_SIZES:
            raise SoundStreamConfigError(f"size must be one of {list(SOUNDSTREAM_SIZES)}, got {self.size!r}")
        base = SOUNDSTREAM_SIZES[self.size]
        out = SoundStreamConfig(**{f.name: getattr(self, f.name) for f in fields(self)})
        for k, v in base.items():
            if getattr(out, k) is None:
                setattr(out, k, list(v) if isinstance(v, tuple) else v)
        scale = out.sample_rate / 16000
        if out.spectral_windows is None:
            out.spectral_windows = sorted({max(16, int(2 ** e * scale)) for e in range(6, 12)})
        if out.disc_ffts is None:
            out.disc_ffts = [max(64, int(n * scale)) for n in (1024, 512, 256)]
        return out

    def validate(self) -> None:
        c = self.resolved()
        if not c.strides or any(int(s) < 1 for s in c.strides):
            raise SoundStreamConfigError(f"strides must be positive integers, got {c.strides}")
        if c.levels < 1 or c.codebook_size < 2:
            raise SoundStreamConfigError(f"levels must be >= 1 and codebook_size >= 2, got {c.levels}, "
                                         f"{c.codebook_size} (paper: 4 x 1024)")
        if c.sample_rate < 1000:
            raise SoundStreamConfigError(f"sample_rate must be >= 1000 Hz, got {c.sample_rate}")
        if c.train_crop_seconds is not None and c.train_crop_seconds * c.sample_rate < 2 * c.hop:
            raise SoundStreamConfigError(f"train_crop_seconds={c.train_crop_seconds} holds fewer than 2 latent "
                                         f"frames (hop {c.hop} samples); raise it or set null (whole clips)")
        if not c.dilations:
            raise SoundStreamConfigError("dilations must list at least one residual unit (paper: [1, 3, 9])")

    @property
    def hop(self) -> int:
        return int(math.prod(self.strides or SOUNDSTREAM_SIZES[self.size]["strides"]))


# ====================================================================================================================
# SoundStream Fig. 3: encoder and decoder
# ====================================================================================================================
class CausalConv1d(nn.Conv1d):
    """A 1D convolution that sees only the past: left padding (k − 1)·dilation (SoundStream: streaming)."""

    def forward(self, x: Tensor) -> Tensor:
        pad = (self.kernel_size[0] - 1) * self.dilation[0]
        return super().forward(F.pad(x, (pad, 0)))


class ResidualUnit(nn.Module):
    """Fig. 3 residual unit: ELU → dilated causal conv (k = 7) → ELU → 1×1 conv, added to the input."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = CausalConv1d(channels, channels, 7, dilation=dilation)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(F.elu(self.conv(F.elu(x))))


class EncoderBlock(nn.Module):
    """Fig. 3 encoder block: residual units (dilations 1, 3, 9), then a strided causal conv (k = 2·stride) that
    downsamples time by ``stride`` and changes the width to ``out_ch``."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilations: list[int]):
        super().__init__()
        self.units = nn.Sequential(*[ResidualUnit(in_ch, d) for d in dilations])
        self.down = CausalConv1d(in_ch, out_ch, 2 * stride, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.elu(self.units(x)))


class DecoderBlock(nn.Module):
    """Fig. 3 decoder block: a transposed conv (k = 2·stride) upsampling time by ``stride`` (causal: the last
    ``stride`` outputs, which would need the future, are dropped), then residual units."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dilations: list[int]):
        super().__init__()
        self.stride = stride
        self.up = nn.ConvTranspose1d(in_ch, out_ch, 2 * stride, stride=stride)
        self.units = nn.Sequential(*[ResidualUnit(out_ch, d) for d in dilations])

    def forward(self, x: Tensor) -> Tensor:
        y = self.up(F.elu(x))[..., : x.shape[-1] * self.stride]
        return self.units(y)


class AudioEncoder(nn.Module):
    """Waveform ``[B, 1, S]`` → latents ``[B, D, S / hop]``: conv (k = 7, C) → blocks (2C, 4C, …) → conv (k = 3, D)."""

    def __init__(self, c: SoundStreamConfig):
        super().__init__()
        widths = [c.channels * 2 ** i for i in range(len(c.strides) + 1)]
        self.conv_in = CausalConv1d(1, widths[0], 7)
        self.blocks = nn.Sequential(*[EncoderBlock(widths[i], widths[i + 1], s, c.dilations)
                                      for i, s in enumerate(c.strides)])
        self.conv_out = CausalConv1d(widths[-1], c.latent_dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_out(F.elu(self.blocks(self.conv_in(x))))


class AudioDecoder(nn.Module):
    """Latents ``[B, D, F]`` → waveform ``[B, 1, F·hop]``, the encoder mirrored."""

    def __init__(self, c: SoundStreamConfig):
        super().__init__()
        widths = [c.channels * 2 ** i for i in range(len(c.strides) + 1)][::-1]
        self.conv_in = CausalConv1d(c.latent_dim, widths[0], 7)
        self.blocks = nn.Sequential(*[DecoderBlock(widths[i], widths[i + 1], s, c.dilations)
                                      for i, s in enumerate(reversed(c.strides))])
        self.conv_out = CausalConv1d(widths[-1], 1, 7)

    @property
    def last_layer(self) -> Tensor:
        return self.conv_out.weight

    def forward(self, z: Tensor) -> Tensor:
        return self.conv_out(F.elu(self.blocks(self.conv_in(z))))


# ====================================================================================================================
# Multi-scale STFT discriminator
# ====================================================================================================================
class STFTDiscriminator(nn.Module):
    """SoundStream's STFT discriminator at one window length: the complex STFT as 2 channels (real, imaginary)
    ``[B, 2, frames, bins]`` → 2D convs striding over frequency → per-(frame, band) logits; the activations of
    every layer are returned for feature matching."""

    def __init__(self, n_fft: int, filters: int = 16):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        chans = [2, filters, 2 * filters, 4 * filters, 4 * filters]
        self.convs = nn.ModuleList([nn.Conv2d(2, filters, (7, 7), padding=(3, 3))] + [
            nn.Conv2d(chans[i], chans[i + 1], (3, 4), stride=(1, 2), padding=(1, 1)) for i in range(1, 4)])
        self.out = nn.Conv2d(chans[-1], 1, (3, 3), padding=(1, 1))

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        spec = torch.stft(rearrange(x.float(), "b 1 s -> b s"), self.n_fft, self.hop, window=self.window,
                          return_complex=True)
        h = rearrange(torch.view_as_real(spec), "b f t c -> b c t f")
        feats = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), 0.2)
            feats.append(h)
        return self.out(h), feats


class MultiScaleSTFTDiscriminator(nn.Module):
    """STFT discriminators at several window lengths (e.g. 1024, 512, 256 at 16 kHz)."""

    def __init__(self, ffts: list[int], filters: int = 16):
        super().__init__()
        self.discs = nn.ModuleList(STFTDiscriminator(int(n), filters) for n in ffts)

    def forward(self, x: Tensor) -> list[tuple[Tensor, list[Tensor]]]:
        return [d(x) for d in self.discs]


def feature_matching(real: list[tuple[Tensor, list[Tensor]]], fake: list[tuple[Tensor, list[Tensor]]]) -> Tensor:
    """SoundStream's feature loss: mean over scales and layers of |D(x) − D(x̂)|₁ / mean |D(x)| (relative L1)."""
    terms = [F.l1_loss(f, r.detach()) / r.detach().abs().mean().clamp_min(1e-5)
             for (_, rf), (_, ff) in zip(real, fake) for r, f in zip(rf, ff)]
    return torch.stack(terms).mean()


# ====================================================================================================================
# Reconstruction losses and quality
# ====================================================================================================================
def stft_magnitude(x: Tensor, n_fft: int) -> Tensor:
    """|STFT| of ``[B, 1, S]`` with a Hann window of ``n_fft`` and hop ``n_fft / 4`` → ``[B, bins, frames]``."""
    win = torch.hann_window(n_fft, device=x.device)
    return torch.stft(rearrange(x.float(), "b 1 s -> b s"), n_fft, n_fft // 4, window=win,
                      return_complex=True).abs()


#: floor inside the log of the spectral loss (magnitudes of a Hann-windowed full-scale tone are ~n_fft/4): bins far
#: below the signal (silence) do not dominate it
LOG_EPS = 0.1


def multiscale_spectral_loss(x: Tensor, y: Tensor, windows: list[int]) -> Tensor:
    """SoundStream's multi-scale spectral reconstruction loss on linear STFT magnitudes (module doc):
    Σ_s mean|S_s(x) − S_s(y)| + α_s·sqrt(mean (log S_s(x) − log S_s(y))²), α_s = sqrt(s / 2), averaged over s."""
    total = x.new_zeros(()).float()
    for s in windows:
        a, b = stft_magnitude(x, s), stft_magnitude(y, s)
        lin = (a - b).abs().mean()
        log = (torch.log(a + LOG_EPS) - torch.log(b + LOG_EPS)).pow(2).mean().clamp_min(1e-12).sqrt()
        total = total + lin + math.sqrt(s / 2) * log
    return total / len(windows)


@torch.no_grad()
def reconstruction_quality(x: Tensor, y: Tensor, n_fft: int = 512) -> dict[str, float]:
    """Quality of reconstructions ``y`` of ``x`` (both ``[B, 1, S]``): SNR in dB (10·log10 Σx² / Σ(x − y)²,
    over the batch) and the log-spectral distance in dB (RMS over bins of 20·log10 (|X| + ε)/(|Y| + ε), mean over
    frames; ε = ``LOG_EPS``, the spectral loss's floor, so silent bins count as equal)."""
    x, y = x.float(), y.float()
    snr = 10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum().clamp_min(1e-12))
    a, b = stft_magnitude(x, n_fft), stft_magnitude(y, n_fft)
    lsd = (20 * (torch.log10(a + LOG_EPS) - torch.log10(b + LOG_EPS))).pow(2).mean(1).sqrt().mean()
    return {"snr_db": float(snr), "log_spectral_distance_db": float(lsd)}


# ====================================================================================================================
# LightningModule
# ====================================================================================================================
class SoundStream(L.LightningModule):
    """SoundStream audio tokenizer (§2.2) trained with reconstruction, RVQ and multi-scale STFT adversarial losses.

    Batches: ``audio`` float ``[B, 1, S]`` in [−1, 1] (``VideoDataModule(audio_rate=...)``), optionally
    ``has_audio`` (rows without a track are left out of the losses). ``encode`` → codes ``[B, levels, F]``;
    ``decode`` → waveform ``[B, 1, F·hop]``. The token order VideoPoet uses (level-major) is
    ``videopoet.Vocabulary.audio``.
    """

    fsdp_block_classes = (EncoderBlock, DecoderBlock)

    def __init__(self, size: str = "16k", sample_rate: int | None = None, channels: int | None = None,
                 strides: list[int] | None = None, dilations: list[int] | None = None, latent_dim: int | None = None,
                 levels: int = 4, codebook_size: int = 1024, commitment_weight: float = 0.25,
                 codebook_weight: float = 1.0, waveform_weight: float = 1.0, spectral_weight: float = 1.0,
                 spectral_windows: list[int] | None = None, adversarial_weight: float = 1.0,
                 feature_weight: float = 10.0, discriminator: bool = True, disc_ffts: list[int] | None = None,
                 disc_filters: int = 16, disc_start_step: int = 0, lr: float = 1e-4, disc_lr: float | None = None,
                 betas: list[float] | None = None, warmup_steps: int = 0, total_steps: int | None = None,
                 gradient_clip: float | None = 1.0, train_crop_seconds: float | None = 1.0, seed: int = 0,
                 inference_only: bool = False):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__", "inference_only")}
        super().__init__()
        self.save_hyperparameters(args)
        cfg = self.make_config(args)
        cfg.validate()
        self.config = c = cfg.resolved()
        self.automatic_optimization = False
        self.train_steps = 0
        self.encoder = AudioEncoder(c)
        self.quantizer = ResidualVectorQuantizer(c.levels, c.codebook_size, c.latent_dim, c.commitment_weight,
                                                 c.codebook_weight)
        self.decoder = AudioDecoder(c)
        self.discriminator = None
        if c.discriminator and not inference_only:
            self.discriminator = MultiScaleSTFTDiscriminator(c.disc_ffts, c.disc_filters)
        self.val_usage = CodebookUsage(c.codebook_size) if not inference_only else None
        self._val: list[dict[str, float]] = []

    # ---------------------------------------------------------------------------------------------------- config
    @staticmethod
    def make_config(args: Mapping[str, Any]) -> SoundStreamConfig:
        names = {f.name for f in fields(SoundStreamConfig)}
        a = {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items() if k in names and v is not None}
        return SoundStreamConfig(**a)

    @classmethod
    def validate_config(cls, init_args: Mapping[str, Any]) -> None:
        """Called by the CLI before anything is built."""
        sig = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(init_args) - sig
        if unknown:
            raise SoundStreamConfigError(f"unknown SoundStream arguments {sorted(unknown)}; allowed: {sorted(sig)}")
        cls.make_config(init_args).validate()

    @property
    def sample_rate(self) -> int:
        return int(self.config.sample_rate)

    @property
    def hop(self) -> int:
        return self.config.hop

    def frames_for(self, num_samples: int) -> int:
        """Latent frames of a clip of ``num_samples`` samples: floor(S / hop) (2.125 s at 16 kHz → 106)."""
        return int(num_samples) // self.hop

    # ---------------------------------------------------------------------------------------------------- codec
    def _check(self, audio: Tensor) -> Tensor:
        if audio.ndim != 3 or audio.shape[1] != 1:
            raise ValueError(f"audio must be [B, 1, S] (mono, data.audio_channels: 1), got {tuple(audio.shape)}")
        f = self.frames_for(audio.shape[-1])
        if f < 1:
            raise ValueError(f"audio of {audio.shape[-1]} samples is shorter than one latent frame ({self.hop})")
        return audio[..., : f * self.hop].to(self.device, self.decoder.conv_out.weight.dtype)

    @torch.no_grad()
    def encode(self, audio: Tensor) -> Tensor:
        """``[B, 1, S]`` → RVQ codes int64 ``[B, levels, floor(S / hop)]``."""
        return self.quantizer.encode(self.encoder(self._check(audio)))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes ``[B, L, F]`` (``L`` ≤ levels) → waveform ``[B, 1, F·hop]`` in [−1, 1]."""
        return self.decoder(self.quantizer.indices_to_latents(codes.to(self.device).long())).float().clamp(-1, 1)

    @torch.no_grad()
    def reconstruct(self, audio: Tensor) -> Tensor:
        """``[B, 1, S]`` → its reconstruction ``[B, 1, S]`` (the tail beyond ``F·hop`` is silence)."""
        y = self.decode(self.encode(audio))
        return F.pad(y, (0, audio.shape[-1] - y.shape[-1]))

    def forward(self, audio: Tensor) -> Tensor:
        return self.reconstruct(audio)

    # ---------------------------------------------------------------------------------------------------- contracts
    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """The batch's own videos (an audio tokenizer does not change pictures; its reconstructions are
        :meth:`reconstruct` and the ``audio`` of :meth:`predict_step`)."""
        if batch is None or batch.get("video") is None:
            raise ValueError("SoundStream reconstructs a clip's soundtrack: pass batch={'video', 'audio'}")
        return batch["video"][:num_samples].float()

    def prediction_inputs(self) -> dict:
        """Reconstructs soundtracks: ``vidgen predict`` needs ``--data.predict_shards`` (with ``data.audio_rate``)."""
        return {"kind": "video"}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """The clips with their reconstructed soundtracks (written as muxed mp4 + wav by the ``PredictionWriter``)."""
        if batch.get("audio") is None:
            raise ValueError("SoundStream predicts from clips with audio: set data.audio_rate "
                             f"{self.sample_rate} in the predict data")
        audio = self.reconstruct(batch["audio"])
        n = audio.shape[0]
        keys = list(batch.get("key") or [f"r{self.global_rank}_{batch_idx:05d}_{i:03d}" for i in range(n)])[:n]
        videos = batch["video"].float() if batch.get("video") is not None else torch.zeros(n, 3, 1, 8, 8)
        return {"videos": videos, "keys": keys, "audio": audio.cpu(), "sample_rate": self.sample_rate}

    @classmethod
    def load_frozen(cls, path: str, map_location: str | torch.device = "cpu") -> "SoundStream":
        """Eval-mode, no-grad codec with the (EMA when present) generator weights of a training checkpoint."""
        ckpt = safe_load(path, map_location=map_location)
        if "hyper_parameters" not in ckpt:
            raise ValueError(f"{path} has no hyper_parameters; it is not a SoundStream checkpoint")
        names = set(inspect.signature(cls.__init__).parameters) - {"self", "inference_only"}
        model = cls(**{k: v for k, v in ckpt["hyper_parameters"].items() if k in names}, inference_only=True)
        weights = ema_state_dict(ckpt)
        own = model.state_dict()
        missing = [k for k in own if k not in weights]
        if missing:
            raise KeyError(f"{path} lacks SoundStream weights {missing[:5]}")
        model.load_state_dict({k: weights[k] for k in own})
        model.freeze()
        return model

    # ---------------------------------------------------------------------------------------------------- training
    def configure_optimizers(self):
        from .nn.optim import WarmupCosine, cpu_multi_tensor

        c = self.config
        gen = [p for n, p in self.named_parameters() if n.startswith(("encoder.", "quantizer.", "decoder."))]
        opts = [cpu_multi_tensor(torch.optim.Adam(gen, lr=c.lr, betas=tuple(c.betas)))]
        scheds = [torch.optim.lr_scheduler.LambdaLR(opts[0], WarmupCosine(c.warmup_steps, c.total_steps))]
        if self.discriminator is not None:
            opts.append(cpu_multi_tensor(torch.optim.Adam(self.discriminator.parameters(), lr=c.disc_lr or c.lr,
                                                          betas=tuple(c.betas))))
            total_d = None if c.total_steps is None else max(1, c.total_steps - c.disc_start_step)
            scheds.append(torch.optim.lr_scheduler.LambdaLR(opts[1], WarmupCosine(c.warmup_steps, total_d)))
        return opts, scheds

    def training_audio(self, batch: Mapping[str, Any], step: int, stream: int = 0) -> Tensor:
        """The rows with audio (all rows when none has it flagged), randomly cropped to ``train_crop_seconds``
        (a multiple of the hop), the crop drawn from (seed, step, stream) so a resumed run crops the same
        (``nn.seeding``: each rank and micro-batch its own stream)."""
        x = torch.as_tensor(batch["audio"])
        has = batch.get("has_audio")
        if has is not None and bool(torch.as_tensor(has).any()):
            x = x[torch.as_tensor(has, device=x.device).bool()]
        c = self.config
        if c.train_crop_seconds is not None:
            n = min(x.shape[-1], int(c.train_crop_seconds * c.sample_rate) // self.hop * self.hop)
            g = step_generator(c.seed, step, stream)
            starts = torch.randint(0, x.shape[-1] - n + 1, (x.shape[0],), generator=g).tolist()
            x = torch.stack([x[i, :, s:s + n] for i, s in enumerate(starts)])
        return self._check(x)

    def generator_losses(self, x: Tensor, step: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """(L_G without the adversarial terms, the reconstruction, logs) for a crop ``x`` [B, 1, S]."""
        c = self.config
        x = self._check(x)
        q = self.quantizer(self.encoder(x), step=step)
        y = self.decoder(q.latents)
        wave = F.l1_loss(y.float(), x.float())
        spec = multiscale_spectral_loss(x, y, c.spectral_windows)
        loss = c.waveform_weight * wave + c.spectral_weight * spec + q.loss
        logs = {"wave_l1": wave.detach(), "spectral": spec.detach(), "rvq": q.loss.detach(),
                **{k: v.detach() for k, v in q.terms.items() if k.startswith("residual")}}
        return loss, y, logs

    def training_step(self, batch: dict, batch_idx: int):
        c = self.config
        opts = self.optimizers()
        opts = list(opts) if isinstance(opts, (list, tuple)) else [opts]
        scheds = self.lr_schedulers()
        scheds = list(scheds) if isinstance(scheds, (list, tuple)) else [scheds]
        step = self.train_steps
        x = self.training_audio(batch, step, training_stream(self, batch_idx))
        gan_on = self.discriminator is not None and step >= c.disc_start_step

        opt_g = opts[0]
        self.toggle_optimizer(opt_g)
        loss_g, y, logs = self.generator_losses(x, step)
        if gan_on:
            fake = self.discriminator(y)
            real = self.discriminator(x)
            g_adv = torch.stack([generator_loss(lg) for lg, _ in fake]).mean()
            feat = feature_matching(real, fake)
            loss_g = loss_g + c.adversarial_weight * g_adv + c.feature_weight * feat
            logs.update(g_adv=g_adv.detach(), feature=feat.detach())
        logs["loss_g"] = loss_g.detach()
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        if c.gradient_clip:
            self.clip_gradients(opt_g, gradient_clip_val=c.gradient_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        if gan_on:
            opt_d = opts[1]
            self.toggle_optimizer(opt_d)
            outs = self.discriminator(torch.cat([x, y.detach()]))
            loss_d = torch.stack([discriminator_loss(*lg.float().chunk(2)) for lg, _ in outs]).mean()
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            if c.gradient_clip:
                self.clip_gradients(opt_d, gradient_clip_val=c.gradient_clip, gradient_clip_algorithm="norm")
            opt_d.step()
            self.untoggle_optimizer(opt_d)
            logs["loss_d"] = loss_d.detach()
            scheds[1].step()
        scheds[0].step()
        self.train_steps += 1
        spectral = logs.pop("spectral")
        log_step(self, {"train/spectral": spectral, **{f"train/{k}": v for k, v in logs.items()}}, x.shape[0],
                 prog_bar=("train/spectral",))
        return loss_g.detach()

    def on_save_checkpoint(self, checkpoint: dict):
        checkpoint["soundstream_train_steps"] = self.train_steps

    def on_load_checkpoint(self, checkpoint: dict):
        self.train_steps = int(checkpoint.get("soundstream_train_steps", 0))

    # ---------------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int):
        batch, n = eval_rows(batch)  # DDP padding dropped (all padding: one row logged with weight 0)
        x = torch.as_tensor(batch["audio"]).to(self.device)
        has = batch.get("has_audio")
        if has is not None:
            x = x[torch.as_tensor(has, device=x.device).bool()]
        if x.shape[0] == 0:
            return None
        codes = self.encode(x)
        y = F.pad(self.decode(codes), (0, x.shape[-1] - codes.shape[-1] * self.hop))
        q = reconstruction_quality(x, y)
        bs = x.shape[0] if n else 0
        if bs:
            self.val_usage.update(codes[:, 0])
        self.log("val/snr_db", q["snr_db"], batch_size=bs, prog_bar=True, sync_dist=True)
        self.log("val/log_spectral_distance_db", q["log_spectral_distance_db"], batch_size=bs, sync_dist=True)
        self.log("val/spectral", multiscale_spectral_loss(x, y, self.config.spectral_windows), batch_size=bs,
                 sync_dist=True)
        return None

    def _usage_seen(self) -> float:
        """Codes counted this epoch over all ranks (the same decision on every rank: compute() syncs, and a rank
        whose batches were all padding counted none)."""
        seen = self.val_usage.counts.sum()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            seen = trainer.strategy.reduce(seen.clone(), reduce_op="sum")
        return float(seen)

    def on_validation_epoch_end(self):
        if self.val_usage is not None and self._usage_seen() > 0:
            u = self.val_usage.compute()
            self.log("val/codebook_usage_level0", u["usage"].float())
            self.log("val/perplexity_level0", u["perplexity"].float())
        if self.val_usage is not None:
            self.val_usage.reset()


# ====================================================================================================================
# Size table: SoundStream's published codec has C = 32, D = 64 at 24 kHz (strides 2·4·5·8 at 16 kHz for 50 Hz,
# spec §2.2); VideoPoet does not publish its audio tokenizer's width [unverified].
# ====================================================================================================================
SOUNDSTREAM_SIZES: dict[str, dict[str, Any]] = {
    "16k": {"sample_rate": 16000, "channels": 32, "strides": (2, 4, 5, 8), "latent_dim": 64},   # 50 frames/s
    "24k": {"sample_rate": 24000, "channels": 32, "strides": (2, 4, 6, 10), "latent_dim": 64},  # 50 frames/s
    "tiny": {"sample_rate": 8000, "channels": 8, "strides": (2, 4, 4, 5), "latent_dim": 32},    # 50 frames/s, CPU
}
