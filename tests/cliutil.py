import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def probe_config(path, shards, *, steps, workers=0, batch=2, devices=1, keys_log=None, extra_trainer=None, callbacks=None,
                 seed=0, strategy=None, val_shards=None, num_frames=4):
    cfg = {
        "model": {"class_path": "vidgen.lightning_modules.stream_probe.StreamProbe",
                  "init_args": {"channels": 4, "keys_log": keys_log}},
        "data": {"class_path": "vidgen.datamodules.VideoDataModule",
                 "init_args": {"train_shards": shards, "seed": seed, "num_frames": num_frames, "resolution": 16,
                               "batch_size": batch, "num_workers": workers, "val_shards": val_shards}},
        "trainer": {"accelerator": "cpu", "devices": devices, "max_steps": steps, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "callbacks": callbacks or []},
    }
    if strategy:
        cfg["trainer"]["strategy"] = strategy
    cfg["trainer"].update(extra_trainer or {})
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def run_cli(args, cwd, script="vidgen", timeout=300, check=True, new_session=False):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests") + os.pathsep + ROOT, OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    p = subprocess.run([os.path.join(BIN, script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout, start_new_session=new_session)  # own process group: killpg hits only it
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def cli_in_process(capsys, *argv):
    """``vidgen *argv`` in this process (no subprocess start-up): ``(exit code, stdout, stderr)``."""
    from vidgen import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
