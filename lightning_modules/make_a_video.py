"""Make-A-Video (Singer et al. 2022, arXiv 2209.14792), part 1: the prior P and the decoder D / D^t of Eq. 1
``ŷ_t = SR_h ∘ SR_l^t ∘ ↑F ∘ D^t ∘ P ∘ (x̂, C_x(x))`` (spec make_a_video_videopoet.md §1.1-§1.3, §1.5, §1.6).

* ``DiffusionPrior`` (P, §1.2): DALL-E 2's diffusion prior. A causal transformer over
  ``[x̂ (text token encodings), x_e (text embedding), timestep embedding, noised y_e, learned query]`` whose output at
  the query is the clean CLIP image embedding (x0-prediction, MSE), cosine schedule, condition dropout for
  classifier-free guidance. Trained on (frame or still, caption) pairs only; never on video.
* ``MakeAVideoDecoder`` (D, then D^t, §1.2-§1.5): a pseudo-3D U-Net (``nn/unet.py``) conditioned on y_e (projected
  and added to the timestep embedding, plus context tokens) and, in the video stage, on fps. The video stage sees
  NO text: y_e is the CLIP image embedding of a frame of the training clip (``cond_frame``). Image stage -> video
  stage: temporal layers added at identity, image weights loaded (``init_from``), spatial layers frozen or at a
  lower learning rate (``spatial_lr_scale``; the paper contradicts itself, §1.5).
* Sampling (``MakeAVideoDecoder.generate``): text -> C_x -> P -> y_e -> D^t (fps) -> frames, CFG on both models.

The paper publishes no sizes, steps or guidance scales (§1.6): defaults below are DALL-E 2 / DALLE2-pytorch /
Imagen ones and marked [unverified].
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from vidgen.lightning_modules.clip import pick_frames
from vidgen.lightning_modules.nn.attention import Mlp, MultiHeadAttention
from vidgen.lightning_modules.nn.checkpoint import KeyReport, read_state_dict
from vidgen.lightning_modules.nn.diffusion import DiffusionConfig, create_diffusion
from vidgen.lightning_modules.nn.embeddings import TimestepEmbedder
from vidgen.lightning_modules.nn.optim import cpu_multi_tensor
from vidgen.lightning_modules.nn.batches import eval_rows
from vidgen.lightning_modules.nn.step_logs import log_step
from vidgen.lightning_modules.nn.text_encoders import TextEncoderConfig, build_text_encoder
from vidgen.lightning_modules.nn.unet import (PseudoAttention3d, ResBlock, UNet, UNetConfig, UNetConfigError,
                                              unet_config)

__all__ = ["PriorConfig", "DiffusionPriorNetwork", "DiffusionPrior", "MakeAVideoDecoder", "MakeAVideoConfigError",
           "PRIOR_SIZES", "unet_state_dict", "load_stage"]


class MakeAVideoConfigError(ValueError):
    """A Make-A-Video setting that cannot work; the message names the key and the fix."""


def _frozen(module: nn.Module, name: str, value: nn.Module | None) -> None:
    """Hold a frozen network (CLIP, the prior) outside the module tree: not trained, not in checkpoints (reloaded
    from its path), moved to the module's device on use."""
    object.__setattr__(module, name, value)


def _clip(config: Mapping | None) -> nn.Module:
    cfg = {"kind": "open_clip", "image_tower": True, **dict(config or {})}
    if cfg.get("kind") != "open_clip" or not cfg.get("image_tower"):
        raise MakeAVideoConfigError("clip must be an open_clip model with both towers (kind: open_clip, image_tower: true)")
    return build_text_encoder(cfg)


def _check_clip(config: Mapping | None) -> None:
    cfg = {"kind": "open_clip", "image_tower": True, **dict(config or {})}
    try:
        TextEncoderConfig(**cfg).validate()
    except (TypeError, ValueError, FileNotFoundError) as e:
        raise MakeAVideoConfigError(f"clip: {e}") from None
    if not cfg.get("checkpoint") and not cfg.get("model_cfg"):
        raise MakeAVideoConfigError("clip.checkpoint is required: a local open_clip file or a vidgen CLIP run's "
                                    "last.ckpt (configs/make_a_video/clip_tiny.yaml trains one)")


def _diffusion_args(a: Mapping[str, Any]) -> dict:
    """The U-Net stages' diffusion (D^t, ↑F, SR): cosine schedule, eps, fixed variance, MSE, clipped x0; ``sampler``,
    ``sample_steps`` and the ``diffusion`` overrides from the stage's hyper-parameters."""
    return {"schedule": "cosine", "predict": "eps", "learn_sigma": False, "loss": "mse", "clip_denoised": True,
            "sampler": a["sampler"], "sample_steps": a["sample_steps"], **(a.get("diffusion") or {})}


def video_stage_adamw(unet: UNet, video: bool, lr: float, spatial_lr_scale: float, weight_decay: float):
    """AdamW; in a video stage (§3.2: temporal layers added to a trained image U-Net) the pretrained spatial layers
    run at ``spatial_lr_scale`` x lr (0: frozen), the new temporal/fps layers at lr."""
    new, spatial = [], []
    for name, p in unet.named_parameters():
        if p.requires_grad:
            (new if not video or UNet.is_new_video_parameter(name) else spatial).append(p)
    groups = [{"params": new, "lr": lr}]
    if spatial and spatial_lr_scale > 0:
        groups.append({"params": spatial, "lr": lr * spatial_lr_scale})
    return cpu_multi_tensor(torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay))


class CLIPConditionedDiffusion(L.LightningModule):
    """What P and D share: a frozen CLIP beside the module, and the diffusion training/validation steps over
    ``model_inputs(batch, train) -> (x0, kwargs)`` with the network ``self.denoiser``."""

    denoiser_name: str  # the attribute holding the trained network

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self, self.denoiser_name)

    def _clip_on_device(self) -> nn.Module:
        if self.clip.device != self.device:
            self.clip.to(self.device)
        return self.clip

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0, kw = self.model_inputs(batch, train=True)
        mask = kw.pop("loss_mask", None)  # ↑F: the loss over masked frames only
        loss = self.diffusion.training_losses(self.denoiser, x0, kw, mask=mask)["loss"].mean()
        log_step(self, {"train/loss": loss}, x0.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        batch, n = eval_rows(batch)  # DDP padding dropped (all padding: one row logged with weight 0)
        x0, kw = self.model_inputs(batch, train=False)
        mask = kw.pop("loss_mask", None)
        g = torch.Generator().manual_seed(1000 + batch_idx)  # the same t and noise at every validation
        loss = self.diffusion.training_losses(self.denoiser, x0, kw, generator=g, mask=mask)["loss"].mean()
        self.log("val/loss", loss, prog_bar=True, batch_size=n, sync_dist=True)
        return loss


# ----------------------------------------------------------------------------------------------------------------------
# The prior P (§1.2): DALL-E 2's diffusion prior
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class PriorConfig:
    """Prior network shape. embed_dim: CLIP embedding width; text_dim: CLIP text token width; dim/depth/heads:
    the causal transformer; max_text_len: text token encodings kept (x̂)."""

    embed_dim: int = 768
    text_dim: int = 768
    dim: int = 768
    depth: int = 12
    heads: int = 12
    max_text_len: int = 77
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise MakeAVideoConfigError(f"prior dim={self.dim} is not divisible by heads={self.heads}")
        if self.depth < 1 or self.max_text_len < 1:
            raise MakeAVideoConfigError("prior depth and max_text_len must be >= 1")


class PriorBlock(nn.Module):
    """Pre-LN causal transformer block (DALLE2-pytorch ``CausalTransformer``: rotary positions, causal mask)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads=heads, rope=True, causal=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act="gelu")

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DiffusionPriorNetwork(nn.Module):
    """DALL-E 2 prior network (§1.2): causal transformer over [x̂, x_e, t, noised y_e, query] -> y_e at the query.

    Dropped conditions (``cond_drop`` True) use learned null text encodings and a learned null text embedding
    (DALLE2-pytorch ``null_text_encodings`` / ``null_text_embeds``); padding tokens of x̂ also take the null
    encodings, so the attention is purely causal.
    """

    def __init__(self, config: PriorConfig):
        super().__init__()
        c = self.config = config
        self.text_tokens_in = nn.Linear(c.text_dim, c.dim)
        self.text_embed_in = nn.Linear(c.embed_dim, c.dim)
        self.image_embed_in = nn.Linear(c.embed_dim, c.dim)
        self.time_embed = TimestepEmbedder(c.dim)
        self.null_text_encodings = nn.Parameter(torch.randn(c.max_text_len, c.dim) * 0.02)
        self.null_text_embed = nn.Parameter(torch.randn(c.dim) * 0.02)
        self.learned_query = nn.Parameter(torch.randn(c.dim) * 0.02)
        self.blocks = nn.ModuleList([PriorBlock(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.dim)
        self.out = nn.Linear(c.dim, c.embed_dim)

    def sequence(self, x_t: Tensor, t: Tensor, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor,
                 cond_drop: Tensor | None = None) -> Tensor:
        """The input sequence ``[B, L + 4, dim]``: x̂ (L), x_e, timestep, noised y_e, learned query."""
        c = self.config
        b = x_t.shape[0]
        tok = self.text_tokens_in(text_tokens[:, : c.max_text_len].float())
        mask = text_mask[:, : c.max_text_len].bool()
        if tok.shape[1] < c.max_text_len:  # pad to the fixed length with the null encodings
            pad = c.max_text_len - tok.shape[1]
            tok = torch.cat([tok, tok.new_zeros(b, pad, c.dim)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(b, pad)], dim=1)
        emb = self.text_embed_in(text_embed.float())
        if cond_drop is not None:
            drop = cond_drop.to(x_t.device).bool()
            mask = mask & ~drop[:, None]
            emb = torch.where(drop[:, None], self.null_text_embed[None], emb)
        null = repeat(self.null_text_encodings, "l d -> b l d", b=b)
        tok = torch.where(mask[..., None], tok, null)
        parts = [tok, emb[:, None], self.time_embed(t)[:, None], self.image_embed_in(x_t.float())[:, None],
                 repeat(self.learned_query, "d -> b 1 d", b=b)]
        return torch.cat(parts, dim=1)

    def transformer(self, seq: Tensor) -> Tensor:
        for blk in self.blocks:
            seq = blk(seq)
        return self.norm(seq)

    def forward(self, x_t: Tensor, t: Tensor, text_embed: Tensor, text_tokens: Tensor, text_mask: Tensor,
                cond_drop: Tensor | None = None) -> Tensor:
        seq = self.sequence(x_t, t, text_embed, text_tokens, text_mask, cond_drop)
        return self.out(self.transformer(seq)[:, -1])


class DiffusionPrior(CLIPConditionedDiffusion):
    """P (§1.2): (x̂, x_e) -> y_e with a DALL-E 2 diffusion prior; trained on captioned stills and single frames.

    Args:
        clip: ``TextEncoderConfig`` fields of the frozen CLIP with both towers (``checkpoint``: a local open_clip
            file or a vidgen CLIP run).
        dim, depth, heads, max_text_len: the causal transformer (DALLE2-pytorch defaults for ViT-L/14 CLIP: 768,
            12, 12, 77 [unverified for Make-A-Video]).
        steps, schedule: 1000 cosine steps, x0-prediction, MSE (DALL-E 2 prior).
        cond_drop_prob: text conditions dropped together for CFG (DALL-E 2: 10%).
        image_frame: which frame of a video clip pairs with its caption ('random').
        sampler, sample_steps, cfg_scale: generation (DDIM 64 steps [DALL-E 2 samples the prior with 64 strided
            steps], guidance 1.0 [unverified]).
        embed_scale: y_e (unit norm) is scaled by sqrt(embed_dim) for diffusion (DALLE2-pytorch ``image_embed_scale``).
    """

    fsdp_block_classes = (PriorBlock,)
    denoiser_name = "network"

    def __init__(
        self,
        clip: dict | None = None,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        max_text_len: int = 77,
        steps: int = 1000,
        schedule: Literal["cosine", "linear"] = "cosine",
        cond_drop_prob: float = 0.1,
        image_frame: Literal["random", "first", "middle", "last"] = "random",
        sampler: Literal["ddpm", "ddim"] = "ddim",
        sample_steps: int | str = 64,
        cfg_scale: float = 1.0,
        lr: float = 1.1e-4,
        weight_decay: float = 6.0e-2,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.validate_config(dict(self.hparams))
        clip_model = _clip(clip)
        _frozen(self, "clip", clip_model)
        self.config = PriorConfig(embed_dim=clip_model.embed_dim, text_dim=clip_model.token_dim, dim=dim, depth=depth,
                                  heads=heads, max_text_len=min(max_text_len, clip_model.max_length))
        self.network = DiffusionPriorNetwork(self.config)
        self.diffusion = create_diffusion(DiffusionConfig(schedule=schedule, steps=steps, predict="x0",
                                                          learn_sigma=False, loss="mse", sampler=sampler,
                                                          sample_steps=sample_steps))
        self.embed_scale = self.config.embed_dim ** 0.5

    @classmethod
    def validate_config(cls, args: Mapping[str, Any]) -> None:
        a = {**_defaults(cls), **dict(args)}
        _check_clip(a["clip"])
        if not 0 <= a["cond_drop_prob"] < 1:
            raise MakeAVideoConfigError(f"prior cond_drop_prob must be in [0, 1), got {a['cond_drop_prob']}")
        if a["cfg_scale"] != 1.0 and a["cond_drop_prob"] <= 0:
            raise MakeAVideoConfigError("prior cfg_scale != 1 needs the null condition: set cond_drop_prob > 0 (0.1)")
        if a["image_frame"] not in ("random", "first", "middle", "last"):
            raise MakeAVideoConfigError(f"prior image_frame must be random|first|middle|last, got {a['image_frame']!r}")
        try:
            DiffusionConfig(schedule=a["schedule"], steps=a["steps"], predict="x0", learn_sigma=False, loss="mse",
                            sampler=a["sampler"], sample_steps=a["sample_steps"])
            PriorConfig(dim=a["dim"], depth=a["depth"], heads=a["heads"], max_text_len=a["max_text_len"])
        except ValueError as e:
            raise MakeAVideoConfigError(f"prior: {e}") from None

    # -- data --------------------------------------------------------------------------------------------------------
    def text_conditions(self, texts: list[str]) -> dict[str, Tensor]:
        """x̂ (token encodings + mask) and x_e (text embedding) from the frozen CLIP text tower."""
        enc = self._clip_on_device()(texts)
        return {"text_embed": enc.pooled, "text_tokens": enc.tokens, "text_mask": enc.mask}

    def model_inputs(self, batch: Mapping[str, Any], train: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """(x0 = sqrt(D) y_e ``[B, D]``, network kwargs). Precomputed ``image_embed`` / ``text_embed`` /
        ``text_tokens`` / ``text_mask`` in the batch are used as they are (cached CLIP features)."""
        if batch.get("image_embed") is not None:
            y = batch["image_embed"].to(self.device).float()
        else:
            y = self._clip_on_device().encode_image(pick_frames(batch["video"].to(self.device), self.hparams.image_frame))
        if batch.get("text_embed") is not None:
            kw = {k: batch[k].to(self.device) for k in ("text_embed", "text_tokens", "text_mask")}
        else:
            texts = list(batch.get("text") or [])
            if len(texts) != y.shape[0] or any(not s for s in texts):
                raise ValueError("the prior trains on captioned images: every sample needs batch['text'] "
                                 "(set data.require_text: true)")
            kw = self.text_conditions(texts)
        p = self.hparams.cond_drop_prob if train else 0.0
        kw["cond_drop"] = torch.rand(y.shape[0], device=self.device) < p
        return y * self.embed_scale, kw

    # -- training ----------------------------------------------------------------------------------------------------
    def forward(self, x_t: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return self.network(x_t, t, **kwargs)

    def configure_optimizers(self):
        hp = self.hparams
        return cpu_multi_tensor(torch.optim.AdamW(self.network.parameters(), lr=hp.lr, weight_decay=hp.weight_decay))

    # -- sampling ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, texts: list[str] | None = None, conditions: Mapping[str, Tensor] | None = None,
               generator: torch.Generator | None = None, cfg_scale: float | None = None,
               steps: int | str | None = None) -> Tensor:
        """y_e ``[B, D]`` (unit norm) for captions (or precomputed text conditions), with CFG against the null text."""
        kw = dict(conditions) if conditions is not None else self.text_conditions(list(texts or []))
        kw = {k: v.to(self.device) for k, v in kw.items() if k != "cond_drop"}
        b = kw["text_embed"].shape[0]
        scale = self.hparams.cfg_scale if cfg_scale is None else cfg_scale
        cond = {**kw, "cond_drop": torch.zeros(b, dtype=torch.bool, device=self.device)}
        uncond = {**kw, "cond_drop": torch.ones(b, dtype=torch.bool, device=self.device)}
        was = self.network.training
        self.network.eval()
        try:
            x0 = self.diffusion.sample(self.network, (b, self.config.embed_dim), cfg_scale=scale, generator=generator,
                                       steps=steps,
                                       model_kwargs=cond, uncond_kwargs=uncond if scale != 1.0 else None,
                                       device=self.device)
        finally:
            self.network.train(was)
        return nn.functional.normalize(x0.float(), dim=-1)

    @classmethod
    def from_checkpoint(cls, path: str, clip: dict | None = None) -> DiffusionPrior:
        """A trained prior from its Lightning checkpoint (EMA weights when present), on the CPU, in eval mode."""
        from vidgen.lightning_modules.nn.checkpoint import safe_load

        ckpt = safe_load(path)
        hp = dict(ckpt.get("hyper_parameters") or {})
        if clip is not None:
            hp["clip"] = clip
        prior = cls(**{k: v for k, v in hp.items() if k in _defaults(cls)})
        sd = read_state_dict(ckpt)
        prior.load_state_dict(sd, strict=True)
        return prior.eval()


# ----------------------------------------------------------------------------------------------------------------------
# The decoder D / D^t (§1.2-§1.5)
# ----------------------------------------------------------------------------------------------------------------------
class MakeAVideoDecoder(CLIPConditionedDiffusion):
    """D (``stage='image'``) and D^t (``stage='video'``): a pseudo-3D U-Net diffusion model conditioned on y_e and fps.

    Args:
        stage: 'image' (D: frames of clips and stills as images; y_e of the image itself) or 'video' (D^t: the
            pseudo-3D layers on, clips of ``num_frames``, y_e of one frame, fps conditioning; no text anywhere).
        unet: ``UNetConfig`` fields (``size`` picks a row of ``UNET_SIZES``); temporal / fps_cond / cond_dim are set
            from the stage and CLIP.
        clip: the frozen CLIP with both towers (``TextEncoderConfig`` fields; ``checkpoint`` required).
        cond_frame: the frame whose CLIP embedding conditions a training clip: first (default, spec §1.3) | middle |
            last | random.
        cond_drop_prob: y_e replaced by the learned null embedding for CFG (DALL-E 2 decoder: 10%).
        init_from: an image-stage (D) checkpoint loaded into D^t with no conversion (temporal layers stay identity).
        spatial_lr_scale: video stage: learning-rate multiplier of the pretrained spatial layers; 0 freezes them
            (§3.4 "only the new temporal layers are fine-tuned"), 1 trains everything jointly (§2, §3.2.2).
        diffusion: extra ``DiffusionConfig`` fields (default: 1000 cosine steps, eps-prediction, MSE: the "hybrid"
            loss with the VLB omitted, spec §1.3). sampler/sample_steps/cfg_scale: DDIM 64, CFG 3 [unverified; §1.6
            "64-250 steps, CFG 3-5"].
        prior: a ``DiffusionPrior`` checkpoint for text -> video (``generate`` with ``batch['text']``);
            prior_cfg_scale: its guidance. sample_fps: the fps D^t is asked for when a batch gives none.
        num_frames, resolution: the clip (linked from the data config).
    """

    fsdp_block_classes = (ResBlock, PseudoAttention3d)
    denoiser_name = "unet"

    def __init__(
        self,
        stage: Literal["image", "video"] = "image",
        unet: dict | None = None,
        clip: dict | None = None,
        num_frames: int = 16,
        resolution: int = 64,
        cond_frame: Literal["first", "middle", "last", "random"] = "first",
        cond_drop_prob: float = 0.1,
        init_from: str | None = None,
        spatial_lr_scale: float = 1.0,
        diffusion: dict | None = None,
        sampler: Literal["ddpm", "ddim"] = "ddim",
        sample_steps: int | str = 64,
        cfg_scale: float = 3.0,
        prior: str | None = None,
        prior_cfg_scale: float = 1.0,
        sample_fps: float = 8.0,
        num_samples: int = 4,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.validate_config(dict(self.hparams))
        clip_model = _clip(clip)
        _frozen(self, "clip", clip_model)
        video = stage == "video"
        ucfg = dict(unet or {})
        size = ucfg.pop("size", None)
        self.unet_config = unet_config(size, **{**ucfg, "temporal": ucfg.get("temporal", video) or video,
                                                "fps_cond": ucfg.get("fps_cond", video) or video,
                                                "cond_dim": clip_model.embed_dim})
        self.unet = UNet(self.unet_config)
        self.diffusion = create_diffusion(DiffusionConfig(**_diffusion_args(self.hparams)))
        _frozen(self, "prior", DiffusionPrior.from_checkpoint(prior, clip=clip) if prior else None)
        self.load_report: KeyReport | None = None
        if init_from:
            self.load_report = r = self.load_image_stage(init_from)
            print(f"[make_a_video] D -> D^t: loaded {len(r.loaded)} image-U-Net tensors from {init_from}; "
                  f"{len(r.missing)} new temporal/fps tensors start at identity/zero", flush=True)
        if video and spatial_lr_scale == 0:
            for name, p in self.unet.named_parameters():
                p.requires_grad_(UNet.is_new_video_parameter(name))

    @classmethod
    def validate_config(cls, args: Mapping[str, Any]) -> None:
        a = {**_defaults(cls), **dict(args)}
        if a["stage"] not in ("image", "video"):
            raise MakeAVideoConfigError(f"decoder stage must be 'image' or 'video', got {a['stage']!r}")
        if a["cond_frame"] not in ("first", "middle", "last", "random"):
            raise MakeAVideoConfigError(f"cond_frame must be first|middle|last|random, got {a['cond_frame']!r}")
        if not 0 <= a["cond_drop_prob"] < 1:
            raise MakeAVideoConfigError(f"cond_drop_prob must be in [0, 1), got {a['cond_drop_prob']}")
        if a["cfg_scale"] != 1.0 and a["cond_drop_prob"] <= 0:
            raise MakeAVideoConfigError("cfg_scale != 1 needs the null embedding: set cond_drop_prob > 0 (0.1)")
        if not a["spatial_lr_scale"] >= 0:
            raise MakeAVideoConfigError(f"spatial_lr_scale must be >= 0 (0 freezes the spatial layers), got {a['spatial_lr_scale']}")
        if a["stage"] == "image" and a["spatial_lr_scale"] != 1.0:
            raise MakeAVideoConfigError("spatial_lr_scale applies to the video stage; the image stage trains D fully")
        if a["stage"] == "video" and a["num_frames"] < 2:
            raise MakeAVideoConfigError(f"the video stage trains on clips: data.num_frames must be >= 2, got {a['num_frames']}")
        for key in ("init_from", "prior"):
            if a[key] and not os.path.isfile(a[key]):
                raise MakeAVideoConfigError(f"{key} {a[key]!r} does not exist (a local checkpoint path)")
        _check_clip(a["clip"])
        ucfg = dict(a["unet"] or {})
        size = ucfg.pop("size", None)
        try:
            from vidgen.lightning_modules.nn.unet import UNET_SIZES

            if size is not None and size not in UNET_SIZES:
                raise UNetConfigError(f"unet.size must be one of {sorted(UNET_SIZES)}, got {size!r}")
            u = unet_config(size, **{**ucfg, "temporal": a["stage"] == "video" or ucfg.get("temporal", False)})
            DiffusionConfig(**_diffusion_args(a))
        except (UNetConfigError, ValueError, TypeError) as e:
            raise MakeAVideoConfigError(f"decoder: {e}") from None
        res = a["resolution"]
        if isinstance(res, (list, tuple)):
            res = res[0] if len(res) == 2 and res[0] == res[1] else None
        if res is None or res % u.downsample_factor:
            raise MakeAVideoConfigError(f"resolution {a['resolution']!r} must be square and divisible by "
                                        f"{u.downsample_factor} (the U-Net's down-sampling)")

    def load_image_stage(self, path: str) -> KeyReport:
        """Load D (an image-stage checkpoint, EMA weights when present) into this U-Net with no conversion."""
        return self.unet.load_image_weights(unet_state_dict(path), source=path)

    # -- data --------------------------------------------------------------------------------------------------------
    def model_inputs(self, batch: Mapping[str, Any], train: bool) -> tuple[Tensor, dict[str, Any]]:
        """(x0, U-Net kwargs). Image stage: one frame per clip (a random one in training) as an image; video stage:
        the clip, y_e of ``cond_frame``, ``batch['fps']``. A cached ``batch['image_embed']`` is used as y_e."""
        video = batch["video"].to(self.device)
        if self.hparams.stage == "image":
            x0 = pick_frames(video, "random" if train else "middle") if video.ndim == 5 else video
            cond_img, fps = x0, None
        else:
            if video.ndim != 5 or video.shape[2] < 2:
                raise ValueError(f"the video stage trains on clips [B, C, T>1, H, W], got {tuple(video.shape)} "
                                 "(an image source? set data.image_frames or train images in the image stage)")
            x0 = video
            cond_img = pick_frames(video, self.hparams.cond_frame)
            fps = batch.get("fps")
            fps = (fps.to(self.device).float() if fps is not None
                   else torch.full((video.shape[0],), self.hparams.sample_fps, device=self.device))
        y_e = batch.get("image_embed")
        y_e = y_e.to(self.device).float() if y_e is not None else self._clip_on_device().encode_image(cond_img)
        p = self.hparams.cond_drop_prob if train else 0.0
        kw: dict[str, Any] = {"cond": y_e, "cond_drop": torch.rand(x0.shape[0], device=self.device) < p}
        if fps is not None:
            kw["fps"] = fps
        return x0, kw

    # -- training ----------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return self.unet(x, t, **kwargs)

    def configure_optimizers(self):
        hp = self.hparams
        return video_stage_adamw(self.unet, hp.stage == "video", hp.lr, hp.spatial_lr_scale, hp.weight_decay)

    # -- sampling ----------------------------------------------------------------------------------------------------
    def image_embeddings(self, batch: Mapping[str, Any] | None, n: int | None,
                         generator: torch.Generator | None) -> Tensor:
        """y_e for generation: given ``image_embed``; else captions through P (text -> x_e, x̂ -> y_e); else a frame
        of ``batch['video']`` through C_y (image animation)."""
        batch = batch or {}
        if batch.get("image_embed") is not None:
            return batch["image_embed"].to(self.device).float()[:n]
        texts = [s for s in list(batch.get("text") or [])[:n]]
        if texts and all(texts):
            if self.prior is None:
                raise ValueError("text -> video needs the prior P: set model.prior to a DiffusionPrior checkpoint")
            self.prior.to(self.device)
            return self.prior.sample(texts, generator=generator, cfg_scale=self.hparams.prior_cfg_scale)
        if batch.get("video") is not None:
            return self._clip_on_device().encode_image(pick_frames(batch["video"][:n].to(self.device),
                                                                   self.hparams.cond_frame))
        raise ValueError("generate() needs batch['text'] (with a prior), batch['image_embed'] or batch['video']")

    @torch.no_grad()
    def generate(self, batch: dict | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Videos ``[B, 3, T, H, W]`` in [-1, 1] (T = 1 for the image stage): y_e (P or given) -> D^t with CFG."""
        y_e = self.image_embeddings(batch, num_samples, generator)
        b = y_e.shape[0]
        fps = (batch or {}).get("fps")
        fps = (torch.as_tensor(fps, dtype=torch.float32, device=self.device)[:b] if fps is not None
               else torch.full((b,), float(self.hparams.sample_fps), device=self.device))
        return self.sample_videos(y_e, fps, generator)

    @torch.no_grad()
    def sample_videos(self, y_e: Tensor, fps: Tensor, generator: torch.Generator | None = None,
                      steps: int | str | None = None, cfg_scale: float | None = None) -> Tensor:
        """D (images ``[B, 3, 1, H, W]``) or D^t (``[B, 3, T, H, W]`` at ``fps`` ``[B]``) for given y_e ``[B, D]``,
        with classifier-free guidance against the null embedding (``steps`` / ``cfg_scale``: override the config)."""
        hp = self.hparams
        b = y_e.shape[0]
        scale = hp.cfg_scale if cfg_scale is None else cfg_scale
        res = hp.resolution if isinstance(hp.resolution, int) else hp.resolution[0]
        video = hp.stage == "video"
        shape = (b, 3, hp.num_frames, res, res) if video else (b, 3, res, res)
        cond = {"cond": y_e, "cond_drop": torch.zeros(b, dtype=torch.bool, device=self.device)}
        uncond = {"cond": y_e, "cond_drop": torch.ones(b, dtype=torch.bool, device=self.device)}
        if video:
            cond["fps"] = uncond["fps"] = fps.to(self.device).float()
        was = self.unet.training
        self.unet.eval()
        try:
            x = self.diffusion.sample(self.unet, shape, sampler=hp.sampler,
                                      steps=hp.sample_steps if steps is None else steps, cfg_scale=scale,
                                      generator=generator, model_kwargs=cond,
                                      uncond_kwargs=uncond if scale != 1.0 else None, device=self.device)
        finally:
            self.unet.train(was)
        x = x.clamp(-1, 1)
        return x if video else rearrange(x, "b c h w -> b c 1 h w")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        g = torch.Generator().manual_seed(batch_idx * 100003 + self.global_rank)
        videos = self.generate(batch, generator=g)
        keys = list(batch.get("key") or [f"{batch_idx:05d}_{i:03d}" for i in range(len(videos))])
        out = {"videos": videos, "keys": keys[: len(videos)]}
        if batch.get("text") is not None:
            out["captions"] = list(batch["text"])[: len(videos)]
        return out


def unet_state_dict(path: str) -> dict[str, Tensor]:
    """The U-Net weights of a Make-A-Video stage checkpoint (EMA weights when present), without the ``unet.`` prefix."""
    sd = read_state_dict(path)
    if any(k.startswith("unet.") for k in sd):
        sd = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
    return sd


def load_stage(cls, path: str, **overrides: Any):
    """A trained Make-A-Video stage (``cls``: ``MakeAVideoDecoder``, ``MaskedFrameInterpolation``,
    ``MakeAVideoSR``) from its Lightning checkpoint: its own hyper-parameters (``init_from`` dropped: the weights are
    the checkpoint's) plus ``overrides``, EMA weights when present, on the CPU, in eval mode."""
    from vidgen.lightning_modules.nn.checkpoint import safe_load

    ckpt = safe_load(path)
    hp = {k: v for k, v in dict(ckpt.get("hyper_parameters") or {}).items() if k in _defaults(cls)}
    hp.update({"init_from": None} if "init_from" in _defaults(cls) else {})
    hp.update(overrides)
    try:  # built inside another module's __init__ under LightningCLI, save_hyperparameters() would record the CLI's
        # hyper-parameters of the OUTER module (Lightning's instantiation context): build this one outside it
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # older Lightning: no such context
        module = cls(**hp)
    else:
        token = _given_hyperparameters.set(None)
        try:
            module = cls(**hp)
        finally:
            _given_hyperparameters.reset(token)
    sd = read_state_dict(ckpt)
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if [k for k in missing if not k.startswith("diffusion")] or unexpected:
        raise ValueError(f"{path}: not a {cls.__name__} checkpoint of this shape (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    return module.eval()


def _defaults(cls) -> dict[str, Any]:
    return {n: p.default for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


# ----------------------------------------------------------------------------------------------------------------------
# Sizes. Make-A-Video publishes none (§1.6); DALL-E 2 / DALLE2-pytorch defaults, [unverified] for Make-A-Video.
# ----------------------------------------------------------------------------------------------------------------------
PRIOR_SIZES: dict[str, dict[str, int]] = {
    #            width  depth  heads  (DALL-E 2's prior is a 1B decoder-only transformer; DALLE2-pytorch trains
    "dalle2-L": {"dim": 768, "depth": 12, "heads": 12},  # ViT-L/14-CLIP priors at this size)
    "dalle2-H": {"dim": 1024, "depth": 24, "heads": 16},
    "tiny": {"dim": 64, "depth": 2, "heads": 4},
}
