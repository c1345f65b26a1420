"""``vidgen demo --jobs 2``: stages run side by side in their own processes, each after the stages it reads from;
results (checkpoint paths) reach the stages that depend on them; a failed stage does not stop the others."""

import json
import os
import subprocess
import sys
import textwrap

from cliutil import ROOT

STAGES = textwrap.dedent('''
    import os, time

    def _mark(ctx, name):
        with open(os.path.join(ctx.out_dir, "events"), "a") as f:
            f.write(f"{name} {time.monotonic():.3f} {os.getpid()}\\n")

    def data(ctx):
        os.makedirs(os.path.join(ctx.out_dir, ".clip_cache"), exist_ok=True)  # what load_clips shares between stages
        return {"summary": "data"}

    def _handshake(ctx, mine, theirs):
        """Say this stage is running, then wait until the other one says so: both return only if they ran at the
        same time (one after the other, the first would wait out the deadline and fail)."""
        open(os.path.join(ctx.out_dir, mine), "w").close()
        end = time.monotonic() + 240  # deadlock breaker only
        while not os.path.exists(os.path.join(ctx.out_dir, theirs)):
            if time.monotonic() > end:
                raise RuntimeError(f"{theirs} never appeared: the stages did not run side by side")
            time.sleep(0.05)

    def slow(ctx):
        import torch
        _mark(ctx, "slow-start")
        _handshake(ctx, "slow-running", "quick-running")
        _mark(ctx, "slow-end")
        return {"summary": "slow", "checkpoint": "slow.ckpt", "threads": torch.get_num_threads()}

    def quick(ctx):
        _mark(ctx, "quick-start")
        _handshake(ctx, "quick-running", "slow-running")
        _mark(ctx, "quick-end")
        return {"summary": "quick"}

    def after(ctx):
        _mark(ctx, "after-start")
        return {"summary": "after got " + str(ctx.results["slow"]["checkpoint"])}

    def broken(ctx):
        raise RuntimeError("broken on purpose")
''')

DRIVER = textwrap.dedent('''
    import sys
    import vidgen.demo as demo
    demo.STAGES = [("data", "stages_mod:data", ""), ("slow", "stages_mod:slow", ""), ("quick", "stages_mod:quick", ""),
                   ("broken", "stages_mod:broken", ""), ("after", "stages_mod:after", "")]
    demo.DEPENDS.update({"slow": ("data",), "quick": ("data",), "broken": ("data",), "after": ("slow",)})
    if __name__ == "__main__":
        sys.exit(demo.main(["--data-dir", sys.argv[1], "--out-dir", sys.argv[2], "--jobs", "2"]))
''')


def test_independent_stages_overlap_and_dependents_wait(tmp_path):
    (tmp_path / "stages_mod.py").write_text(STAGES)
    (tmp_path / "drive.py").write_text(DRIVER)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, str(tmp_path / "drive.py"), str(tmp_path / "data"), str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout + p.stderr  # one stage failed: non-zero, but every other one ran
    ev = {}
    for line in (out / "events").read_text().split("\n"):
        if line:
            name, t, pid = line.split()
            ev[name] = (float(t), int(pid))
    summary = json.loads((out / "summary.json").read_text())
    # side by side: each of slow and quick returned only after seeing the other's file while it waited (a handshake,
    # not an ordering by sleeps); run one after the other, the first would fail at its deadline
    assert summary["slow"]["summary"] == "slow" and summary["quick"]["summary"] == "quick", p.stdout + p.stderr
    assert ev["quick-start"][0] < ev["slow-end"][0] and ev["slow-start"][0] < ev["quick-end"][0]
    assert ev["after-start"][0] >= ev["slow-end"][0]  # waited for what it reads
    assert len({pid for _, pid in ev.values()}) == 3  # each stage in its own process
    assert summary["after"]["summary"] == "after got slow.ckpt"
    assert summary["slow"]["result"]["threads"] == max(1, (os.cpu_count() or 1) // 2)
    assert summary["broken"]["summary"].startswith("FAILED: RuntimeError: broken on purpose")
    assert "[broken] RuntimeError: broken on purpose" in p.stdout + p.stderr  # its lines carry its name
    assert summary["slow"]["out_dir"] == str(out)  # where its paths live, for reruns from a copied folder
    assert not (out / ".clip_cache").exists()  # the run's shared decoded clips are removed when it ends


def test_a_copied_demo_folder_hands_its_checkpoints_to_reruns(tmp_path):
    """``--only`` reruns read the earlier stages' results from ``summary.json``: their paths, written under that run's
    ``--out-dir`` (often relative to its working directory), are moved under the folder being rerun."""
    from vidgen.demo import rebase_paths

    res = {"checkpoint": "outputs/demo/tokenizer/checkpoints/last.ckpt", "n": 3,
           "samples": [{"npz": "outputs/demo/magvit/samples.npz"}], "elsewhere": "outputs/demo2/x.ckpt"}
    new = rebase_paths(res, "outputs/demo", tmp_path / "copy")
    assert new["checkpoint"] == str(tmp_path / "copy" / "tokenizer" / "checkpoints" / "last.ckpt")
    assert new["samples"][0]["npz"] == str(tmp_path / "copy" / "magvit" / "samples.npz")
    assert new["elsewhere"] == "outputs/demo2/x.ckpt" and new["n"] == 3  # only paths under the old folder move
    assert rebase_paths(res, None, tmp_path) == res  # a summary from before out_dir was recorded: unchanged
    assert rebase_paths(res, "outputs/demo", "outputs/demo") == res


def test_chain_seconds_count_a_stage_and_its_longest_chain_of_dependents(monkeypatch):
    """``chain_seconds`` (the scheduler's plan and its tie-break): a short stage with a long dependent (the cascade behind
    Make-A-Video) heads a longer chain than a longer stage that nothing waits for."""
    import vidgen.demo as demo

    monkeypatch.setattr(demo, "COST", {"a": 100, "b": 150, "c": 200, "d": 10})
    monkeypatch.setattr(demo, "DEPENDS", {"a": (), "b": (), "c": ("a",), "d": ("b",)})
    order = ["a", "b", "c", "d"]
    assert demo.chain_seconds("a", order) == 300 and demo.chain_seconds("b", order) == 160
    assert demo.chain_seconds("c", order) == 200 and demo.chain_seconds("d", order) == 10
    assert demo.chain_seconds("a", ["a", "b", "d"]) == 100  # c is not part of this run
    monkeypatch.setattr(demo, "COST", {})
    assert demo.chain_seconds("d", order) == demo.DEFAULT_COST


def _scheduled_end(demo, order, cost, jobs=2):
    """Run ``_run_parallel``'s choice (``next_stage``) in simulated time: stages take ``cost`` seconds."""
    t, running, started, done, pending = 0.0, {}, {}, set(), list(order)
    while pending or running:
        while len(running) < jobs:
            ready = [n for n in pending if all(d in done for d in demo.depends_on(n, order))]
            if not ready:
                break
            ends = {n: max(started[n] + demo.COST[n], t + 1.0) for n in running}
            pick = demo.next_stage(ready, ends, done, pending, order, t, jobs)
            pending.remove(pick)
            running[pick], started[pick] = t + cost[pick], t
        n = min(running, key=running.__getitem__)
        t = running.pop(n)
        done.add(n)
    return t


def test_the_scheduler_plans_ahead_where_longest_chain_first_leaves_a_lane_idle(monkeypatch):
    """Two independent 4 s stages, and a 1 s stage with a 1 s dependent, on two lanes: longest chain first runs both
    4 s stages, then the short pair one after the other in one lane while the other idles (6 s); ``next_stage`` starts
    the short head beside a 4 s stage and ends at 5 s, a perfect split. On the demo's own table it ends within 5 s of
    a perfect split of the CPU-seconds, and no later than longest-chain-first."""
    import vidgen.demo as demo

    cost = {"a": 1.0, "b": 4.0, "c": 4.0, "d": 1.0}
    monkeypatch.setattr(demo, "COST", cost)
    monkeypatch.setattr(demo, "DEPENDS", {"a": (), "b": (), "c": (), "d": ("a",)})
    order = list(cost)
    assert demo.planned_finish(0.0, {}, set(), order, order, 2) == 6.0  # longest chain first
    assert _scheduled_end(demo, order, cost) == 5.0
    monkeypatch.undo()

    order = [n for n, *_ in demo.STAGES if n != "data"]
    end = _scheduled_end(demo, order, demo.COST)
    assert end <= sum(demo.COST[n] for n in order) / 2 + 5
    # never later than longest-chain-first throughout (the toy case above is where it must be earlier; on the demo's
    # table since session 14, with MAGVIT's 2000 steps on the tokenizer's chain, the two plans tie)
    assert end <= demo.planned_finish(0.0, {}, {"data"}, order, order, 2)


def test_every_demo_stage_has_a_cost_estimate():
    """The scheduler's table covers every stage (a new stage adds its measured CPU-seconds) and the tokenizer, which
    most stages wait for, heads the longest chain."""
    import vidgen.demo as demo

    order = [n for n, *_ in demo.STAGES]
    assert set(order) - {"data"} <= set(demo.COST)
    rest = [n for n in order if n != "data"]
    assert max(rest, key=lambda n: demo.chain_seconds(n, order)) == "tokenizer"


def _tiny_tokenizer():
    import torch

    from vidgen.lightning_modules.video_tokenizer import VideoTokenizer

    torch.manual_seed(0)
    return VideoTokenizer(arch=dict(kind="magvit", filters=8, channel_multipliers=[1, 2], num_res_blocks=1,
                                    temporal_downsample=[True], norm_groups=4),
                          bottleneck=dict(kind="vq", codebook_size=16, dim=4), discriminator=dict(enabled=False),
                          loss=dict(perceptual_weight=0), num_frames=4, resolution=16).eval()


def test_token_cache_gives_the_codes_encoding_gives(tmp_path):
    """The token-space stages read the tokenizer stage's codes (``clip_tokens``) instead of encoding the clips again.
    That changes no result because a clip's codes do not depend on the batch it is encoded in; a clip the cache lacks
    (or a cache at another clip length or frame stride) is encoded."""
    from types import SimpleNamespace

    import torch

    from vidgen.demos.common import clip_tokens, encode_clips

    tok = _tiny_tokenizer()
    video = torch.rand(9, 3, 4, 16, 16) * 2 - 1
    whole = encode_clips(tok, video, batch_size=32)
    assert torch.equal(whole, encode_clips(tok, video, batch_size=1))
    perm = torch.randperm(9)
    assert torch.equal(whole, encode_clips(tok, video[perm], batch_size=4)[torch.argsort(perm)])

    keys = [f"clip{i}" for i in range(9)]
    cache = {"frames": 4, "resolution": 16, "codes": {k: c + 1 for k, c in zip(keys, whole)}}  # marked: +1
    torch.save(cache, tmp_path / "tokens.pt")
    ctx = SimpleNamespace(results={"tokenizer": {"tokens": str(tmp_path / "tokens.pt")}})
    clips = {"video": video[[5, 2]], "key": [keys[5], keys[2]]}
    assert torch.equal(clip_tokens(ctx, tok, clips), whole[[5, 2]] + 1)  # read, in the clips' order
    clips["key"][1] = "unknown"
    assert torch.equal(clip_tokens(ctx, tok, clips), whole[[5, 2]])  # one clip missing: encoded
    assert torch.equal(clip_tokens(SimpleNamespace(results={}), tok, {"video": video[:2], "key": keys[:2]}), whole[:2])
    # the same clip keys at another frame stride are other frames: encoded, not read (the cache is at stride 1)
    clips = {"video": video[[5, 2]], "key": [keys[5], keys[2]], "frame_stride": 2}
    assert torch.equal(clip_tokens(ctx, tok, clips), whole[[5, 2]])
    clips["frame_stride"] = 1
    assert torch.equal(clip_tokens(ctx, tok, clips), whole[[5, 2]] + 1)
    cache["frames"] = 8
    torch.save(cache, tmp_path / "tokens8.pt")
    ctx.results["tokenizer"]["tokens"] = str(tmp_path / "tokens8.pt")
    assert torch.equal(clip_tokens(ctx, tok, {"video": video[:2], "key": keys[:2]}), whole[:2])


def test_forkserver_starts_without_waiting_for_its_preload(tmp_path):
    """``vidgen demo`` starts the stages' forkserver before the data stage: the call returns at once and the server's
    torch + lightning import overlaps the data stage (``Process.start`` would otherwise block ~12 s on it).

    Proved by order, not by a clock: the preload (here one module, in place of torch + lightning) blocks until the
    caller has returned and created ``go``, then writes ``done`` with the forkserver's pid. Had ``start_forkserver``
    waited for the preload, the gate would open only after its 120 s deadlock breaker and ``done`` would already exist
    when the call returned."""
    from vidgen.demo import FORKSERVER_PRELOAD

    assert {"torch", "lightning"} <= set(FORKSERVER_PRELOAD)  # what the real server imports while the data stage runs
    (tmp_path / "gated_preload.py").write_text(textwrap.dedent('''
        import os, time
        _dir = os.environ["GATE_DIR"]
        _end = time.monotonic() + 120  # deadlock breaker only: a blocking caller makes the test fail, not hang
        while not os.path.exists(os.path.join(_dir, "go")) and time.monotonic() < _end:
            time.sleep(0.05)
        with open(os.path.join(_dir, "done.tmp"), "w") as f:
            f.write(str(os.getpid()))
        os.replace(os.path.join(_dir, "done.tmp"), os.path.join(_dir, "done"))
    '''))
    code = textwrap.dedent('''
        import os, time
        import vidgen.demo as demo
        gate = os.environ["GATE_DIR"]
        demo.FORKSERVER_PRELOAD = ["gated_preload"]  # read by start_forkserver when called
        demo.start_forkserver()
        print("returned-before-preload-done", not os.path.exists(os.path.join(gate, "done")))
        open(os.path.join(gate, "go"), "w").close()
        end = time.monotonic() + 300
        while not os.path.exists(os.path.join(gate, "done")) and time.monotonic() < end:
            time.sleep(0.05)
        with open(os.path.join(gate, "done")) as f:
            print("preloaded-in", f.read(), "caller", os.getpid())
    ''')
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}", GATE_DIR=str(tmp_path))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=420, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines() if " " in line)
    assert lines["returned-before-preload-done"] == "True", p.stdout
    server, caller = lines["preloaded-in"].split(" caller ")
    assert int(server) != int(caller)  # the preload ran in the server process, after the caller let it finish
