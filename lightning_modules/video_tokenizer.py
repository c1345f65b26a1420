"""Video tokenizer / autoencoder: MAGVIT 3D-VQ (spec magvit.md Part 1), MAGVIT-v2 causal LFQ tokenizer (Part 5),
and the KL / plain autoencoders later models use, all trained with the MAGVIT recipe:

    L_G = L2 (+L1) + 0.1·L_perc + 0.1·L_adv + bottleneck terms          (§1.9)
    L_D = softplus(−D(x)) + softplus(D(x̂)) + 10·R1 + λ_LeCam·R_LeCam      (§1.7)

G and D are updated from one forward pass, each on its own gradient (manual optimisation, two optimisers, two
schedules).  Batches follow the DEVELOPERS.md contract (video in [−1, 1]); with ``arch.zero_centered: false`` (the
MAGVIT configs) the network sees [0, 1] pixels and losses/PSNR are computed there.

Note on ``trainer.max_steps``: Lightning counts every optimizer step, so once the discriminator is on one batch is
two steps (G and D).  The model's own batch counter (``train_steps``) drives schedules, annealing and ``start_step``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import asdict, dataclass, fields

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from einops import rearrange
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from .nn.checkpoint import KeyReport, safe_load
from .nn.conv3d import ArchConfig, ConfigError, Decoder, Encoder, ResBlock, causal_param_names
from .nn.discriminator import DiscriminatorBlock, StyleGANDiscriminator
from .nn.gan_losses import LeCamEMA, adaptive_weight, discriminator_loss, generator_loss, r1_penalty
from .nn.inflation import MODES as INFLATION_MODES
from .nn.inflation import inflate_state_dict
from .nn.optim import WarmupCosine, cpu_multi_tensor
from .nn.perceptual import KINDS as PERCEPTUAL_KINDS
from .nn.perceptual import PerceptualLoss
from .nn.quantizers import (BOTTLENECKS, BitBalance, CodebookUsage, DiagonalGaussian, IdentityBottleneck,
                            LookupFreeQuantizer, VectorQuantizer)

from .nn.checkpoint import EMA_PREFIX, ema_state_dict
from .nn.ema import attach_ema
from .nn.batches import eval_rows
from .nn.step_logs import log_step
from .nn.vae import LatentAutoencoder, VAEConfig


# ------------------------------------------------------------------------------------------------------------ config
@dataclass
class BottleneckConfig:
    """Bottleneck (§1.5 VQ, §5.1 LFQ, KL Gaussian, none).  Defaults are the MAGVIT VQ (1024 × 256)."""

    kind: str = "vq"                       # vq | lfq | kl | none
    codebook_size: int = 1024              # vq: entries; lfq: 2^K (must be a power of two)
    dim: int | None = 256                  # vq code dim; kl / none latent channels; lfq: K (derived when null)
    commitment_weight: float = 0.25
    codebook_weight: float = 1.0
    entropy_weight: float = 0.1
    entropy_temperature: float = 0.01
    entropy_anneal_ratio: float = 0.0      # +weight·ratio·max(0, 1 − step/steps)
    entropy_anneal_steps: int = 0
    entropy_group_bits: int | None = 9     # lfq: bits per entropy group (null: all bits in one group, exact)
    kl_weight: float = 1e-6

    def validate(self):
        if self.kind not in BOTTLENECKS:
            raise ConfigError(f"bottleneck.kind must be one of {BOTTLENECKS}, got {self.kind!r}")
        if self.kind == "lfq":
            k = int(round(math.log2(self.codebook_size)))
            if 2 ** k != self.codebook_size:
                raise ConfigError(f"bottleneck.codebook_size must be a power of two for LFQ, got {self.codebook_size}")
            if self.dim not in (None, k):
                raise ConfigError(f"LFQ latent dim is log2(codebook_size) = {k}; set bottleneck.dim to {k} or null")
        elif not self.dim or self.dim < 1:
            raise ConfigError(f"bottleneck.dim must be a positive integer for {self.kind!r}, got {self.dim!r}")

    @property
    def latent_dim(self) -> int:
        return int(round(math.log2(self.codebook_size))) if self.kind == "lfq" else int(self.dim)


@dataclass
class DiscriminatorConfig:
    """3D StyleGAN discriminator (§1.6); ``blur`` for MAGVIT-v2 (§5.2)."""

    enabled: bool = True
    filters: int = 64
    channel_multipliers: tuple[int, ...] = (2, 4, 4, 4, 4)
    blur: bool = False
    start_step: int = 0                    # batches before the GAN terms switch on (MAGVIT: 0)


@dataclass
class LossConfig:
    """Loss weights (§1.7–1.9)."""

    l2_weight: float = 1.0
    l1_weight: float = 0.0
    perceptual_weight: float = 0.1
    perceptual_weights: str | None = None  # local torchvision state dict; null → perceptual loss off (one warning)
    perceptual_kind: str = "logits"        # logits: ImageNet-classifier logit L2 (MAGVIT); lpips: LPIPS-VGG (SD VAE)
    perceptual_arch: str = "resnet50"
    perceptual_resize: int = 224
    adversarial_weight: float = 0.1
    adaptive_weight: bool = False          # VQGAN-style ‖∇L_rec‖/‖∇L_adv‖ at the decoder's last layer
    r1_weight: float = 10.0
    r1_every: int = 1                      # lazy R1 (scaled by r1_every) when > 1; MAGVIT: every step
    lecam_weight: float = 0.001            # Part 7 item 2: 0 in released v1 configs, 0.001 in v2 reimplementations
    lecam_decay: float = 0.999


@dataclass
class OptimConfig:
    """Adam(W) β=(0, 0.99), lr 1e-4 for G and D, linear warmup then cosine to 0 (§1.10)."""

    lr: float = 1e-4
    disc_lr: float | None = None           # null: same as lr
    betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    total_steps: int | None = None         # cosine decay to 0 at this batch; null: constant after warmup
    gradient_clip: float | None = None     # global-norm clipping of G and D grads (MAGVIT: none); trainer's is unused


def _coerce(cls, value):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = {f.name for f in fields(cls)}
        unknown = set(value) - names
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {sorted(unknown)}; allowed: {sorted(names)}")
        value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        return cls(**value)
    raise ConfigError(f"expected a {cls.__name__} or a mapping, got {type(value).__name__}")


def make_bottleneck(cfg: BottleneckConfig) -> nn.Module:
    anneal = dict(entropy_anneal_ratio=cfg.entropy_anneal_ratio, entropy_anneal_steps=cfg.entropy_anneal_steps)
    if cfg.kind == "vq":
        return VectorQuantizer(cfg.codebook_size, cfg.latent_dim, cfg.commitment_weight, cfg.codebook_weight,
                               cfg.entropy_weight, cfg.entropy_temperature, **anneal)
    if cfg.kind == "lfq":
        return LookupFreeQuantizer(cfg.latent_dim, cfg.commitment_weight, cfg.entropy_weight, cfg.entropy_temperature,
                                   cfg.entropy_group_bits, **anneal)
    if cfg.kind == "kl":
        return DiagonalGaussian(cfg.latent_dim, cfg.kl_weight)
    return IdentityBottleneck(cfg.latent_dim)


# ------------------------------------------------------------------------------------------------------------ module
class VideoTokenizer(L.LightningModule):
    """MAGVIT 3D-VQ / MAGVIT-v2 causal LFQ tokenizer, KL-VAE or plain AE with GAN training (§1, §5)."""

    fsdp_block_classes = (ResBlock, DiscriminatorBlock)

    def __init__(self, arch: ArchConfig | None = None, bottleneck: BottleneckConfig | None = None,
                 discriminator: DiscriminatorConfig | None = None, loss: LossConfig | None = None,
                 optim: OptimConfig | None = None, num_frames: int = 16, resolution: int = 128,
                 init_from_2d: str | None = None, inflation: str = "central", inference_only: bool = False,
                 init_from: str | None = None, init_kind: str = "seed_voken"):
        """
        Args:
            arch / bottleneck / discriminator / loss / optim: config groups (dataclasses or mappings).
            num_frames, resolution: the training clip shape (checked now; sizes the discriminator's Dense layer).
            init_from_2d: a checkpoint of the per-frame 2D model of the same layout (``arch.dims: 2``) to inflate
                from (§1.11): generator, discriminator, LeCam anchors and EMA weights, central or average
                (``inflation``); causal kernels take the last temporal slice.
            inference_only: build encoder/bottleneck/decoder only (used by :meth:`load_frozen`).
            init_from, init_kind: a pretrained tokenizer to start from; ``seed_voken``: a SEED-Voken (Open-MAGVIT2)
                video tokenizer Lightning checkpoint, loaded strictly by :meth:`load_seed_voken` (EMA weights when
                the file has them); the arch must be the Open-MAGVIT2 layout (``SEED_VOKEN_ARCH``).
        """
        super().__init__()
        self.arch = _coerce(ArchConfig, arch)
        self.bcfg = _coerce(BottleneckConfig, bottleneck)
        self.dcfg = _coerce(DiscriminatorConfig, discriminator)
        self.lcfg = _coerce(LossConfig, loss)
        self.ocfg = _coerce(OptimConfig, optim)
        self.arch.validate()
        self.bcfg.validate()
        if inflation not in INFLATION_MODES:
            raise ConfigError(f"inflation must be one of {INFLATION_MODES}, got {inflation!r}")
        _check_init_from(init_from, init_kind, init_from_2d, self.arch, self.bcfg)
        if self.lcfg.r1_every < 1:
            raise ConfigError(f"loss.r1_every must be >= 1, got {self.lcfg.r1_every}")
        self.validate_frames(num_frames, self.arch)
        self.validate_resolution(resolution, self.arch)
        self.num_frames, self.resolution = num_frames, resolution
        self.save_hyperparameters({
            "arch": asdict(self.arch), "bottleneck": asdict(self.bcfg), "discriminator": asdict(self.dcfg),
            "loss": asdict(self.lcfg), "optim": asdict(self.ocfg), "num_frames": num_frames,
            "resolution": resolution, "init_from_2d": init_from_2d, "inflation": inflation,
            "init_from": init_from, "init_kind": init_kind})
        self.automatic_optimization = False
        self.frozen = False
        self.train_steps = 0

        dim = self.bcfg.latent_dim
        self.encoder = Encoder(self.arch, 2 * dim if self.bcfg.kind == "kl" else dim)
        self.quantizer = make_bottleneck(self.bcfg)
        self.decoder = Decoder(self.arch, dim)

        self.discriminator = self.perceptual = None
        if not inference_only:
            if self.dcfg.enabled:
                self.discriminator = StyleGANDiscriminator(
                    self.arch.in_channels, self.dcfg.filters, tuple(self.dcfg.channel_multipliers), num_frames,
                    resolution, self.arch.dims, self.dcfg.blur)
                self.lecam = LeCamEMA(self.lcfg.lecam_decay)
            if self.lcfg.perceptual_weight > 0:
                self.perceptual = PerceptualLoss(self.lcfg.perceptual_weights, self.lcfg.perceptual_arch,
                                                 self.lcfg.perceptual_resize, kind=self.lcfg.perceptual_kind)
            self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
            self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
            if self.codebook_size is not None:
                self.val_usage = CodebookUsage(self.codebook_size)
            if self.bcfg.kind == "lfq":
                self.val_bits = BitBalance(dim)
        if init_from_2d:
            self.inflate_from_2d(init_from_2d, inflation)
        self.load_report: KeyReport | None = None
        if init_from:
            self.load_report = self.load_seed_voken(init_from)

    # ------------------------------------------------------------------------------------------------- validation
    @classmethod
    def validate_config(cls, init_args: dict):
        """Check a config's init args without building the model (called by the CLI before any work)."""
        arch = _coerce(ArchConfig, init_args.get("arch"))
        arch.validate()
        _coerce(BottleneckConfig, init_args.get("bottleneck")).validate()
        for group, kind in (("discriminator", DiscriminatorConfig), ("loss", LossConfig), ("optim", OptimConfig)):
            _coerce(kind, init_args.get(group))
        loss = _coerce(LossConfig, init_args.get("loss"))
        if loss.perceptual_kind not in PERCEPTUAL_KINDS:
            raise ConfigError(f"loss.perceptual_kind must be one of {PERCEPTUAL_KINDS}, got {loss.perceptual_kind!r}")
        if loss.perceptual_weight > 0 and loss.perceptual_weights and not os.path.isfile(loss.perceptual_weights):
            raise ConfigError(f"loss.perceptual_weights={loss.perceptual_weights!r} is not a file: put the "
                              f"{'VGG-16' if loss.perceptual_kind == 'lpips' else loss.perceptual_arch} weights there "
                              "(README: external inputs) or set it to null (perceptual loss off)")
        cls.validate_frames(init_args.get("num_frames", 16), arch)
        cls.validate_resolution(init_args.get("resolution", 128), arch)
        if init_args.get("inflation", "central") not in INFLATION_MODES:
            raise ConfigError(f"inflation must be one of {INFLATION_MODES}, got {init_args['inflation']!r}")
        _check_init_from(init_args.get("init_from"), init_args.get("init_kind", "seed_voken"),
                         init_args.get("init_from_2d"), arch, _coerce(BottleneckConfig, init_args.get("bottleneck")))

    @staticmethod
    def validate_frames(num_frames: int, arch: ArchConfig | dict | None = None) -> int:
        """Check a clip length for this layout and return the latent length; raises ConfigError with the fix."""
        a = _coerce(ArchConfig, arch)
        tf = a.temporal_factor
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ConfigError(f"num_frames must be a positive integer, got {num_frames!r}")
        if a.causal:
            if (num_frames - 1) % tf:
                n = (num_frames - 1) // tf
                raise ConfigError(f"num_frames must be 1+{tf}n for the causal tokenizer (e.g. {1 + tf * n} or "
                                  f"{1 + tf * (n + 1)}), got {num_frames}")
            return 1 + (num_frames - 1) // tf
        if num_frames % tf:
            raise ConfigError(f"num_frames must be a multiple of {tf} (the temporal downsampling of "
                              f"arch.temporal_downsample={list(a.temporal_downsample)}), got {num_frames}")
        return num_frames // tf

    @staticmethod
    def validate_resolution(resolution: int, arch: ArchConfig | dict | None = None) -> int:
        a = _coerce(ArchConfig, arch)
        sf = a.spatial_factor
        if not isinstance(resolution, int):
            raise ConfigError(f"resolution must be one integer (square clips), got {resolution!r}")
        if resolution < sf or resolution % sf:
            raise ConfigError(f"resolution must be a multiple of {sf} (the spatial downsampling of "
                              f"{len(a.channel_multipliers)} stages), got {resolution!r}")
        return resolution // sf

    def _check_video(self, video: Tensor):
        if video.dim() != 5 or video.shape[1] != self.arch.in_channels:
            raise ValueError(f"expected video [B, {self.arch.in_channels}, T, H, W], got shape {tuple(video.shape)}")
        try:
            self.validate_frames(video.shape[2], self.arch)
            for s in video.shape[-2:]:
                self.validate_resolution(s, self.arch)
        except ConfigError as e:
            raise ValueError(f"video of shape {tuple(video.shape)}: {e}") from None

    # ------------------------------------------------------------------------------------------------- public API
    @property
    def codebook_size(self) -> int | None:
        """Number of token values (None for continuous latents)."""
        return self.quantizer.codebook_size

    @property
    def latent_channels(self) -> int:
        return self.bcfg.latent_dim

    def token_shape(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        """Token / latent grid (T', H', W') for a T×H×W clip."""
        return (self.validate_frames(T, self.arch), self.validate_resolution(H, self.arch),
                self.validate_resolution(W, self.arch))

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        """Latent tensor shape (C, T', H', W') per clip; tokens have shape (T', H', W') = latent_shape[1:]."""
        return (self.latent_channels, *self.token_shape(T, H, W))

    def _to_net(self, video: Tensor) -> Tensor:
        return video if self.arch.zero_centered else (video + 1) * 0.5

    def _from_net(self, x: Tensor) -> Tensor:
        return x if self.arch.zero_centered else x * 2 - 1

    def _grad_ctx(self):
        return torch.no_grad() if self.frozen else contextlib.nullcontext()

    def encode(self, video: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Video [B, C, T, H, W] in [−1, 1] → tokens int64 [B, T', H', W'] (VQ/LFQ) or latents [B, C', T', H', W']
        (KL: posterior mean, or a sample with ``sample=True``; none: the encoder output)."""
        self._check_video(video)
        with self._grad_ctx():
            z = self.encoder(self._to_net(video))
            if self.bcfg.kind in ("vq", "lfq"):
                return self.quantizer.encode(z)
            if self.bcfg.kind == "kl":
                return self.quantizer(z, sample=sample, generator=generator).latents
            return z

    def tokens_to_latents(self, tokens: Tensor) -> Tensor:
        """Tokens int64 [B, T', H', W'] → quantised latents [B, C', T', H', W'] (what the decoder sees)."""
        if self.codebook_size is None:
            raise ValueError(f"a {self.bcfg.kind!r} bottleneck has no tokens; pass latents to decode()")
        if tokens.min() < 0 or tokens.max() >= self.codebook_size:
            raise ValueError(f"token values must lie in [0, {self.codebook_size}), got [{tokens.min()}, {tokens.max()}]")
        return self.quantizer.indices_to_latents(tokens.long())

    def decode(self, x: Tensor) -> Tensor:
        """Tokens [B, T', H', W'] or latents [B, C', T', H', W'] → video [B, C, T, H, W] in [−1, 1] (unclipped)."""
        with self._grad_ctx():
            if not x.is_floating_point():
                x = self.tokens_to_latents(x)
            return self._from_net(self.decoder(x.to(self.decoder.conv_in.weight.dtype)))

    def forward(self, video: Tensor) -> Tensor:
        """Reconstruction of a [−1, 1] video (deterministic: VQ/LFQ codes, KL posterior mean)."""
        return self._reconstruct(video)[0]

    def _reconstruct(self, video: Tensor) -> tuple[Tensor, Tensor | None]:
        self._check_video(video)
        z = self.encoder(self._to_net(video))
        out = self.quantizer(z, sample=False) if self.bcfg.kind == "kl" else self.quantizer(z)
        return self._from_net(self.decoder(out.latents)).clamp(-1, 1), out.indices

    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Reconstruct ``batch["video"]`` (first ``num_samples``) → [B, C, T, H, W] in [−1, 1]."""
        if batch is None or "video" not in batch:
            raise ValueError("a tokenizer reconstructs its input: pass batch={'video': [B, C, T, H, W] in [-1, 1]}")
        video = batch["video"]
        if num_samples is not None:
            video = video[:num_samples]
        return self._reconstruct(video.to(self.device, self.decoder.conv_in.weight.dtype))[0]

    def prediction_inputs(self) -> dict:
        """A tokenizer reconstructs clips: ``vidgen predict`` needs ``--data.predict_shards``."""
        return {"kind": "video"}

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Reconstructions of the batch's clips, the originals as conditioning rows (``vidgen predict`` with
        ``--data.predict_shards``); the ``PredictionWriter`` callback writes the files."""
        videos = self.generate(batch).float().clamp(-1, 1)
        n = videos.shape[0]
        keys = list(batch.get("key") or [f"r{self.global_rank}_{batch_idx:05d}_{i:03d}" for i in range(n)])[:n]
        return {"videos": videos, "keys": keys, "cond_videos": batch["video"][:n].float()}

    @classmethod
    def load_frozen(cls, path: str, map_location: str | torch.device = "cpu") -> "VideoTokenizer":
        """Eval-mode, no-grad tokenizer with the EMA generator weights of a training checkpoint, or, for a recipe
        ``.yaml`` whose ``model.init_args.init_from`` names a pretrained (SEED-Voken) checkpoint, that checkpoint
        loaded into the recipe's layout (so ``vidgen tokenize --checkpoint configs/videopoet/tokenizer_seed_voken.yaml``
        and the VideoPoet ``tokenizer_path`` take public tokenizers)."""
        if str(path).endswith((".yaml", ".yml")):
            return cls._frozen_from_recipe(str(path), map_location)
        ckpt = safe_load(path, map_location=map_location)
        if "hyper_parameters" not in ckpt:
            raise ValueError(f"{path} has no hyper_parameters; it is not a VideoTokenizer checkpoint")
        kind = str(ckpt["hyper_parameters"].get("_class_path") or cls.__name__).rsplit(".", 1)[-1]
        if kind != cls.__name__:  # the model class LightningCLI saved
            raise ConfigError(f"{path} is a {kind} checkpoint, not a {cls.__name__} one: give a tokenizer run's "
                              "checkpoint (e.g. runs/<tokenizer recipe>/checkpoints/last.ckpt)")
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        hp = {k: v for k, v in ckpt["hyper_parameters"].items() if k in names}
        model = cls(**{**hp, "init_from_2d": None, "init_from": None, "inference_only": True})
        weights = ema_state_dict(ckpt)
        own = model.state_dict()
        missing = [k for k in own if k not in weights]
        if missing:
            raise KeyError(f"{path} lacks generator weights {missing[:5]}{'...' if len(missing) > 5 else ''}")
        model.load_state_dict({k: weights[k] for k in own})
        model.freeze()
        model.frozen = True
        return model

    @classmethod
    def _frozen_from_recipe(cls, path: str, map_location) -> "VideoTokenizer":
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
        args = dict(((cfg.get("model") or {}).get("init_args")) or {})
        if not args.get("init_from"):
            raise ConfigError(f"{path}: a recipe used as a frozen tokenizer needs model.init_args.init_from (the "
                              "pretrained checkpoint to load); for our own runs pass the trained .ckpt instead")
        names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ConfigError(f"{path}: unknown model.init_args {unknown}; allowed: {sorted(names)}")
        cls.validate_config(args)
        model = cls(**{**args, "init_from_2d": None, "inference_only": True}).to(map_location)
        model.freeze()
        model.frozen = True
        return model

    def load_seed_voken(self, path: str, weights: str = "auto") -> KeyReport:
        """Load a SEED-Voken (Open-MAGVIT2) tokenizer checkpoint (Lightning ``.ckpt``) into this tokenizer by key
        mapping (``seed_voken_key_map``), strictly; prints and returns the key report.  Video tokenizers
        (``video_lfqgan.VQModel``) need ``SEED_VOKEN_ARCH``; image tokenizers (``lfqgan.VQModel``) load into the
        per-frame image model (``SEED_VOKEN_IMAGE_ARCH``, dims 2), which can then inflate into a video one.

        ``weights``: ``auto`` takes the EMA weights (``model_ema.<name without dots>``) when the file has them, as
        SEED-Voken's own reconstruction scripts do (``ema_scope``), else the raw ones; ``ema`` / ``raw`` force one.
        The discriminator / LPIPS tensors (``loss.*``) are training-only and skipped (counted in the report).
        Any missing, unexpected or shape-mismatched generator tensor raises a one-line ``ValueError``."""
        problem = seed_voken_layout_problem(self.arch, self.bcfg)
        if problem:
            raise ConfigError(problem)
        if weights not in ("auto", "ema", "raw"):
            raise ValueError(f"weights must be 'auto', 'ema' or 'raw', got {weights!r}")
        ckpt = safe_load(path)
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(sd, dict):
            raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint or state dict")
        sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
        has_ema = any(k.startswith(SEED_EMA_PREFIX) for k in sd)
        if weights == "ema" and not has_ema:
            raise ValueError(f"{path} has no EMA weights ({SEED_EMA_PREFIX}*); load with weights='raw'")
        use_ema = has_ema and weights != "raw"
        own = {k: v for k, v in self.state_dict().items() if k.startswith(("encoder.", "quantizer.", "decoder."))}
        names = seed_voken_key_map(self.arch, own)
        mapped, used = {}, set()
        for ours, theirs in names.items():
            src = SEED_EMA_PREFIX + theirs.replace(".", "") if use_ema else theirs
            if src in sd:
                w = sd[src]
                if self.arch.dims == 2 and w.dim() == 4 and own[ours].dim() == 5:  # nn.Conv2d kernel: T axis of 1
                    w = rearrange(w, "o i kh kw -> o i 1 kh kw")
                mapped[ours] = w
                used |= {src, theirs}
        skipped = [k for k in sd if k not in used and k.startswith(("loss.", SEED_EMA_PREFIX))]
        unexpected = {k: sd[k] for k in sd if k not in used and k not in skipped}
        kind = f"seed_voken, {'EMA' if use_ema else 'raw'} weights; {len(skipped)} training-only tensors skipped"
        report = KeyReport.compare({**mapped, **unexpected}, own, source=str(path), kind=kind,
                                   model="VideoTokenizer")
        print(report.table(), flush=True)
        if not report.exact:
            first = ([f"missing {k} {list(s)}" for k, s in report.missing]
                     + [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in report.mismatched]
                     + [f"unexpected {k} {list(s)}" for k, s in report.unexpected])[0]
            raise ValueError(f"{path} does not match this tokenizer (strict SEED-Voken load): "
                             f"{len(report.missing)} missing, {len(report.mismatched)} shape mismatches, "
                             f"{len(report.unexpected)} unexpected (first: {first}); set arch.filters, "
                             "channel_multipliers, num_res_blocks and bottleneck.codebook_size to the checkpoint's "
                             "ddconfig ch, ch_mult, num_res_blocks and n_embed")
        self.load_state_dict({k: mapped[k] for k in report.loaded}, strict=False)
        return report

    def inflate_from_2d(self, path: str, mode: str = "central") -> dict[str, list[str]]:
        """Initialise from a 2D (per-frame) checkpoint of the same layout (§1.11): generator, discriminator, LeCam
        anchors and — when the checkpoint has them — the EMA weights (the EMA buffers are attached here so the EMA
        callback keeps them).  Causal kernels take the 2D kernel in their last temporal slice (§5.2)."""
        ckpt = safe_load(path)
        arch2 = (ckpt.get("hyper_parameters") or {}).get("arch")
        if arch2 is not None:
            a2 = _coerce(ArchConfig, arch2)
            if a2.kind != self.arch.kind or a2.dims != 2:
                raise ConfigError(f"init_from_2d={path!r} holds a {a2.kind!r} dims={a2.dims} model; inflation needs "
                                  f"the per-frame image model of the same layout (arch.kind={self.arch.kind!r}, dims: 2)")
        src = ckpt.get("state_dict", ckpt)
        if any(k.startswith(EMA_PREFIX) for k in src):
            attach_ema(self)
        causal = causal_param_names(self)
        causal |= {EMA_PREFIX + k for k in causal}
        try:
            state, report = inflate_state_dict(src, self.state_dict(), mode, causal)
        except ValueError as e:
            if "discriminator.fc1" in str(e):
                raise ConfigError(f"{e}. The 3D discriminator's time axis must pool down to 1 frame for its Dense "
                                  "layer to match the 2D one: use more discriminator.channel_multipliers entries "
                                  f"or fewer frames (now {self.num_frames})") from None
            raise
        self.load_state_dict(state)
        gen = ("encoder.", "decoder.", "quantizer.")
        if any(k.startswith(gen) for k in report["kept"]):
            raise ConfigError(f"init_from_2d={path!r} lacks generator weights such as "
                              f"{[k for k in report['kept'] if k.startswith(gen)][:3]}")
        self.inflation_report = report
        return report

    # ------------------------------------------------------------------------------------------------- training
    def configure_optimizers(self):
        o = self.ocfg
        gen = [p for n, p in self.named_parameters() if n.startswith(("encoder.", "quantizer.", "decoder."))]
        opts = [cpu_multi_tensor(torch.optim.AdamW(gen, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay))]
        if self.discriminator is not None:
            opts.append(cpu_multi_tensor(torch.optim.AdamW(self.discriminator.parameters(), lr=o.disc_lr or o.lr,
                                                           betas=tuple(o.betas), weight_decay=o.weight_decay)))
        scheds = [torch.optim.lr_scheduler.LambdaLR(opts[0], WarmupCosine(o.warmup_steps, o.total_steps))]
        if len(opts) > 1:  # D's schedule counts D's steps, which start at discriminator.start_step
            total_d = None if o.total_steps is None else max(1, o.total_steps - self.dcfg.start_step)
            scheds.append(torch.optim.lr_scheduler.LambdaLR(opts[1], WarmupCosine(o.warmup_steps, total_d)))
        return opts, scheds

    def _listed(self, x):
        return list(x) if isinstance(x, (list, tuple)) else [x]

    def training_step(self, batch: dict, batch_idx: int):
        opts = self._listed(self.optimizers())
        scheds = self._listed(self.lr_schedulers())
        step = self.train_steps
        video = batch["video"]
        self._check_video(video)
        x = self._to_net(video)
        lc = self.lcfg
        logs = {}

        # ---- generator
        opt_g = opts[0]
        self.toggle_optimizer(opt_g)
        z = self.encoder(x)
        q = self.quantizer(z, step=step)
        recon = self.decoder(q.latents)
        rec = lc.l2_weight * F.mse_loss(recon.float(), x.float())
        logs["rec_l2"] = rec.detach()
        if lc.l1_weight:
            l1 = F.l1_loss(recon.float(), x.float())
            rec = rec + lc.l1_weight * l1
            logs["rec_l1"] = l1.detach()
        loss_g = rec + q.loss
        for k, v in q.terms.items():
            logs[k] = v.detach()
        if self.perceptual is not None and self.perceptual.enabled:
            perc = self.perceptual(self._to01(x), self._to01(recon))
            loss_g = loss_g + lc.perceptual_weight * perc
            logs["perceptual"] = perc.detach()
        gan_on = self.discriminator is not None and step >= self.dcfg.start_step
        if gan_on and lc.adversarial_weight:
            g_adv = generator_loss(self.discriminator(recon))
            w = lc.adversarial_weight
            if lc.adaptive_weight:
                aw = adaptive_weight(rec, g_adv, self.decoder.last_layer)
                w = w * aw
                logs["adaptive_weight"] = aw
            loss_g = loss_g + w * g_adv
            logs["g_adv"] = g_adv.detach()
        logs["loss_g"] = loss_g.detach()
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        self._clip(opt_g)
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        # ---- discriminator (same forward pass: the reconstruction made before the G step)
        if gan_on:
            opt_d = opts[1]
            self.toggle_optimizer(opt_d)
            do_r1 = lc.r1_weight > 0 and step % lc.r1_every == 0
            real = x.detach().requires_grad_(do_r1)
            logits = self.discriminator(torch.cat([real, recon.detach()]))
            real_logits, fake_logits = logits.float().chunk(2)
            d_adv = discriminator_loss(real_logits, fake_logits)
            loss_d = d_adv
            if do_r1:
                r1 = r1_penalty(real_logits, real)
                loss_d = loss_d + lc.r1_weight * lc.r1_every * r1
                logs["r1"] = r1.detach()
            if lc.lecam_weight:
                lecam = self.lecam(real_logits, fake_logits)
                loss_d = loss_d + lc.lecam_weight * lecam
                logs["lecam"] = lecam.detach()
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            self._clip(opt_d)
            opt_d.step()
            self.untoggle_optimizer(opt_d)
            self.lecam.update(real_logits.detach(), fake_logits.detach())
            logs.update(d_adv=d_adv.detach(), loss_d=loss_d.detach(), logits_real=real_logits.detach().mean(),
                        logits_fake=fake_logits.detach().mean())
        # each schedule counts its own optimizer's steps: D's warmup starts at its first step (dcfg.start_step)
        scheds[0].step()
        if gan_on and len(scheds) > 1:
            scheds[1].step()
        self.train_steps += 1
        logs["lr"] = torch.tensor(scheds[0].get_last_lr()[0])
        if len(scheds) > 1:
            logs["lr_d"] = torch.tensor(scheds[1].get_last_lr()[0])
        log_step(self, {**{f"train/{k}": v for k, v in logs.items()}, "train/rec": logs["rec_l2"]}, video.shape[0],
                 prog_bar=("train/rec",))
        return loss_g.detach()

    def _clip(self, opt):
        if self.ocfg.gradient_clip:
            self.clip_gradients(opt, gradient_clip_val=self.ocfg.gradient_clip, gradient_clip_algorithm="norm")

    def _to01(self, x: Tensor) -> Tensor:
        return (x + 1) * 0.5 if self.arch.zero_centered else x

    def on_save_checkpoint(self, checkpoint: dict):
        checkpoint["tokenizer_train_steps"] = self.train_steps

    def on_load_checkpoint(self, checkpoint: dict):
        self.train_steps = int(checkpoint.get("tokenizer_train_steps", 0))

    # ------------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: dict, batch_idx: int):
        batch, bs = eval_rows(batch)  # DDP padding dropped (all padding: one row, weight 0, no metric update)
        video = batch["video"]
        recon, idx = self._reconstruct(video)
        real01 = rearrange((video.float() + 1) * 0.5, "b c t h w -> (b t) c h w").clamp(0, 1)
        fake01 = rearrange((recon.float() + 1) * 0.5, "b c t h w -> (b t) c h w")
        if bs:
            self.val_psnr.update(fake01, real01)
            self.val_ssim.update(fake01, real01)
        self.log("val/rec_l2", F.mse_loss(fake01, real01), batch_size=bs, sync_dist=True)
        self.log("val/psnr", self.val_psnr, batch_size=bs, prog_bar=True)
        self.log("val/ssim", self.val_ssim, batch_size=bs)
        if idx is not None and bs:
            self.val_usage.update(idx)
            if self.bcfg.kind == "lfq":
                self.val_bits.update(idx)

    def on_validation_epoch_end(self):
        if self.codebook_size is not None and hasattr(self, "val_usage"):
            u = self.val_usage.compute()
            self.log_dict({"val/codebook_usage": u["usage"].float(), "val/perplexity": u["perplexity"].float()})
            self.val_usage.reset()
            if self.bcfg.kind == "lfq":
                self.log("val/lfq_bit_balance", self.val_bits.compute().float())
                self.val_bits.reset()


# ------------------------------------------------------------------------------------------------------- SEED-Voken
# Open-MAGVIT2 video tokenizers (TencentARC/SEED-Voken, src/Open_MAGVIT2: models/video_lfqgan.py,
# modules/diffusionmodules/improved_video_model.py, modules/vqvae/lookup_free_quantize.py). Their LFQ equals ours
# (sign with 0 -> -1, index sum_d [z_d > 0] 2^d, first channel = LSB; no parameters), so only the CNN needs switches.
SEED_EMA_PREFIX = "model_ema."
#: The arch switches of the Open-MAGVIT2 CNN (each documented on ``ArchConfig``); temporal_downsample follows their
#: rule "space and time where the channel multiplier is not 1" and is checked separately.
SEED_VOKEN_ARCH = dict(kind="magvit2", dims=3, padding="zeros", norm_groups=32, zero_centered=True,
                       norm_per_frame=False, downsample_padding="symmetric", adaptive_norm="stats",
                       mid_adaptive_norm=False, depth_to_space="pt ph pw c", causal_upsample_keep="first")
#: The Open-MAGVIT2 image tokenizer (``lfqgan.VQModel``, ``improved_model.py``: the same CNN in 2D, nn.Conv2d keys
#: without ``.conv_1``, every level downsamples space) is our per-frame image model (dims 2) with these switches.
SEED_VOKEN_IMAGE_ARCH = {**SEED_VOKEN_ARCH, "dims": 2, "norm_per_frame": None}


def seed_voken_layout_problem(arch: ArchConfig, bottleneck: BottleneckConfig) -> str | None:
    """One line naming the first setting that differs from the Open-MAGVIT2 video (dims 3) or image (dims 2)
    layout, or None."""
    image = arch.dims == 2
    for key, want in (SEED_VOKEN_IMAGE_ARCH if image else SEED_VOKEN_ARCH).items():
        if getattr(arch, key) != want:
            which = "image" if image else "video"
            return (f"init_kind: seed_voken needs arch.{key}: {want!r} (the Open-MAGVIT2 {which} layout), got "
                    f"{getattr(arch, key)!r}; see configs/videopoet/tokenizer_seed_voken.yaml")
    want_td = [False if image else m != 1 for m in arch.channel_multipliers[:-1]]
    if list(arch.temporal_downsample) != want_td:
        return (f"init_kind: seed_voken downsamples time where the channel multiplier is not 1: set "
                f"arch.temporal_downsample: {want_td} for channel_multipliers {list(arch.channel_multipliers)}, got "
                f"{list(arch.temporal_downsample)}")
    if bottleneck.kind != "lfq":
        return (f"init_kind: seed_voken needs bottleneck.kind: lfq (Open-MAGVIT2 is an LFQ tokenizer), got "
                f"{bottleneck.kind!r}")
    return None


def _check_init_from(init_from, init_kind, init_from_2d, arch: ArchConfig, bottleneck: BottleneckConfig):
    if init_kind != "seed_voken":
        raise ConfigError(f"init_kind must be 'seed_voken' (the only pretrained tokenizer format), got {init_kind!r}")
    if not init_from:
        return
    if init_from_2d:
        raise ConfigError("init_from and init_from_2d are both set; start from one checkpoint (set the other to null)")
    problem = seed_voken_layout_problem(arch, bottleneck)
    if problem:
        raise ConfigError(problem)
    if not os.path.isfile(init_from):
        raise ConfigError(f"init_from={init_from!r} is not a file: put the SEED-Voken video tokenizer .ckpt there")


def seed_voken_key_map(arch: ArchConfig, own: dict | None = None) -> dict[str, str]:
    """Our generator key -> SEED-Voken key (``Encoder.down[i].block[j]`` / ``downsample`` / ``mid_block``,
    ``Decoder.mid_block`` / ``adaptive[i]`` / ``up[i].block[j]`` / ``up[i].upsample.conv1``; causal convs wrap the
    kernel in ``.conv_1``, the image model's nn.Conv2d do not; the 1x1 shortcut is ``nin_shortcut``). ``own``:
    restrict to these keys."""
    L, n = len(arch.channel_multipliers), arch.num_res_blocks
    c = "" if arch.dims == 2 else ".conv_1"
    mods = {"encoder.conv_in": f"encoder.conv_in{c}", "encoder.norm_out": "encoder.norm_out",
            "encoder.conv_out": f"encoder.conv_out{c}", "decoder.conv_in": f"decoder.conv_in{c}",
            "decoder.norm_out": "decoder.norm_out", "decoder.conv_out": f"decoder.conv_out{c}"}

    def res(ours: str, theirs: str):
        mods.update({f"{ours}.norm1": f"{theirs}.norm1", f"{ours}.norm2": f"{theirs}.norm2",
                     f"{ours}.conv1": f"{theirs}.conv1{c}", f"{ours}.conv2": f"{theirs}.conv2{c}",
                     f"{ours}.shortcut": f"{theirs}.nin_shortcut{c}"})

    k = 0
    for i in range(L):
        for j in range(n):
            res(f"encoder.blocks.{k}", f"encoder.down.{i}.block.{j}")
            k += 1
        if i < L - 1:
            mods[f"encoder.blocks.{k}.conv"] = f"encoder.down.{i}.downsample{c}"
            k += 1
    for j in range(n):
        res(f"encoder.blocks.{k + j}", f"encoder.mid_block.{j}")
        res(f"decoder.mid.blocks.{j}", f"decoder.mid_block.{j}")
    for s in range(L):  # our stages run deep -> shallow; theirs are indexed by level
        i = L - 1 - s
        for name in ("gamma", "beta"):
            mods[f"decoder.stages.{s}.adanorm.{name}"] = f"decoder.adaptive.{i}.{name}"
        for j in range(n):
            res(f"decoder.stages.{s}.blocks.{j}", f"decoder.up.{i}.block.{j}")
        if i > 0:
            mods[f"decoder.stages.{s}.upsample.conv"] = f"decoder.up.{i}.upsample.conv1{c}"
    out = {}
    for key in (own if own is not None else [f"{m}.{p}" for m in mods for p in ("weight", "bias")]):
        mod, leaf = key.rsplit(".", 1)
        if mod in mods:
            out[key] = f"{mods[mod]}.{leaf}"
    return out


# ------------------------------------------------------------------------------------------------------------ sizes
# §1.12 (MAGVIT), §1.12 BAIR row, §5.2 (MAGVIT-v2).  Configs spell these out; this table is the reference.
SIZES: dict[str, dict] = {
    "magvit-B": dict(arch=ArchConfig(filters=64), discriminator=DiscriminatorConfig(filters=64), batch=128),
    "magvit-L": dict(arch=ArchConfig(filters=128), discriminator=DiscriminatorConfig(filters=128), batch=256),
    "magvit-B-bair64": dict(arch=ArchConfig(filters=64, channel_multipliers=(1, 2, 4), temporal_downsample=(True, True)),
                            discriminator=DiscriminatorConfig(filters=64, channel_multipliers=(2, 4, 4, 4)), batch=128),
    "magvit2": dict(arch=ArchConfig(kind="magvit2", filters=128, num_res_blocks=4,
                                    temporal_downsample=(False, True, True)),
                    bottleneck=BottleneckConfig(kind="lfq", codebook_size=2 ** 18, dim=None),
                    discriminator=DiscriminatorConfig(filters=128, blur=True), batch=256),
    # Open-MAGVIT2 video tokenizer (SEED-Voken configs/Open-MAGVIT2/gpu/ucf101_lfqfan_128_L.yaml): ch 128,
    # ch_mult [1,2,2,4], 4 res blocks, 2^18 codes, 17x128^2 clips, 2 x 64 GPUs per batch; init_kind: seed_voken.
    "open-magvit2-video-L": dict(arch=ArchConfig(filters=128, channel_multipliers=(1, 2, 2, 4), num_res_blocks=4,
                                                 temporal_downsample=(False, True, True), **SEED_VOKEN_ARCH),
                                 bottleneck=BottleneckConfig(kind="lfq", codebook_size=2 ** 18, dim=None), batch=128),
    # Open-MAGVIT2 image tokenizer (SEED-Voken configs/Open-MAGVIT2/gpu/imagenet_lfqgan_256_L.yaml): ch_mult
    # [1,1,2,2,4], 256^2 -> 16^2 tokens; the per-frame image model (dims 2).
    "open-magvit2-image-L": dict(arch=ArchConfig(filters=128, channel_multipliers=(1, 1, 2, 2, 4), num_res_blocks=4,
                                                 temporal_downsample=(False,) * 4, **SEED_VOKEN_IMAGE_ARCH),
                                 bottleneck=BottleneckConfig(kind="lfq", codebook_size=2 ** 18, dim=None)),
}


def latent_autoencoder(config: VAEConfig | dict | None) -> LatentAutoencoder:
    """The frozen ``LatentAutoencoder`` of a VAE config; kind ``tokenizer`` loads our checkpoint here (EMA weights), so
    the block in ``nn/vae.py`` needs no LightningModule."""
    cfg = VAEConfig.coerce(config)
    cfg.validate()
    return LatentAutoencoder(cfg, tokenizer=VideoTokenizer.load_frozen(cfg.path) if cfg.kind == "tokenizer" else None)
