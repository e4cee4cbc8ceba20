"""pretrain_solo.py end to end under real torchrun + gloo on the bundled demo data (CPU).

Nine launches share one module fixture (each costs ~15-25 s on 2 cores), all with GBS 4, MBS 1, the debug model,
seq 256, Adam + warm-up + cosine, clip 1.0, wd 0.1, 8 iterations:

- ``ref``: 1 process (TP=1, DP=1, 4 micro-batches of grad accumulation), saves at exit;
- ``a``:  TP=2 x DP=2, distributed optimizer (2 micro-batches per DP rank), saves at iterations 4 and 8;
- ``b``:  as ``a`` but saves every 3 iterations and rank 0 is SIGKILLed after iteration 5;
- ``b2``: resumes ``b`` (from iteration 3) and is SIGKILLed in the middle of its exit save (iteration 8);
- ``c``:  TP=1 x DP=4 resumes ``a``'s iteration-4 checkpoint, runs to 6 (``--exit-interval``), saves;
- ``d``:  TP=2 x DP=2 resumes ``c``'s checkpoint with sequence parallelism and full recompute, runs 7..8;
- ``e``:  1 process starts a new stage from ``a``'s final weights (``--pretrained-checkpoint``: fresh optimizer and
  schedule, iteration 0), logging to W&B in offline mode;
- ``f``:  as ``a`` with ``--exit-signal-handler``; rank 1 alone gets SIGTERM after iteration 2 (a preemption);
- ``f2``: resumes ``f`` to iteration 8.

Tolerances: same layout -> bit-identical losses; another layout (other reduction orders) -> rtol 1e-4 on losses
and atol 2e-5 on weights after 8 Adam steps at lr 3e-3 (fp32).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.dist import REPO, torchrun_cmd, torchrun_env

ITERS = 8
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 2e-5


def _torchrun(
    nproc: int,
    flags: list[str],
    metrics: Path,
    env: dict | None = None,
    timeout: int = 300,
    sigterm_at: tuple[int, int] | None = None,
) -> dict:
    """One pretrain_solo.py launch. ``sigterm_at=(rank, iteration)``: once the metrics log reaches that iteration,
    SIGTERM that worker process only (as SLURM signals a job's processes before a preemption)."""
    full_env = torchrun_env(env)
    cmd = torchrun_cmd("pretrain_solo.py", nproc, [*flags, "--metrics-log", str(metrics)])
    full_env["SOLO_TEST_RUN_ID"] = str(metrics)  # finds every process of this run afterwards (see _survivors)
    log = metrics.with_suffix(".log")
    # Own session + output to a file; afterwards torchrun's whole group is killed as a safety net, but first
    # `_survivors` records any process of the run still alive (none may be: see test_kill9_...).
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            if sigterm_at is not None:
                _sigterm_when(proc, str(metrics), metrics, *sigterm_at, deadline=time.monotonic() + timeout)
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = -9
        survivors = _survivors(str(metrics)) if rc != -9 else ["launch timed out"]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    out = log.read_text()
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    losses = {r["iteration"]: r["loss"] for r in records if r["kind"] == "train"}
    valid = {r["iteration"]: r["valid_overall"] for r in records if r["kind"] == "valid"}
    return {"rc": rc, "out": out, "losses": losses, "valid": valid, "survivors": survivors}


def _run_pids(run_id: str, rank: int | None = None) -> list[int]:
    """Processes whose environment carries this run's id (and, if given, RANK=rank: a torchrun worker)."""
    needle = f"SOLO_TEST_RUN_ID={run_id}".encode()
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env and (rank is None or f"RANK={rank}".encode() in env):
            out.append(int(proc.name))
    return out


def _sigterm_when(proc, run_id: str, metrics: Path, rank: int, iteration: int, deadline: float) -> None:
    while proc.poll() is None and time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(x).get("iteration", 0) >= iteration for x in lines if x.strip()):
            for pid in _run_pids(run_id, rank):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                if pid != proc.pid and "pretrain_solo.py" in cmdline:  # a worker, not torchrun's agent
                    os.kill(pid, signal.SIGTERM)
            return
        time.sleep(0.02)


def _survivors(run_id: str, grace_s: float = 15.0) -> list[str]:
    """Processes of a finished run still alive after a grace period (Linux /proc; a rank's helper processes, e.g.
    dist_checkpointing's writer Manager, must die with it even when the rank was SIGKILLed)."""
    needle = f"SOLO_TEST_RUN_ID={run_id}".encode()
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:200]
                    alive.append(f"{proc.name}: {cmdline!r}")
            except OSError:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _checkpoint_weights(it_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors of a torch_dist checkpoint, read by torch.distributed.checkpoint itself."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{it_dir.parent.name}_{it_dir.name}.pt"
    dcp_to_torch_save(str(it_dir), str(out))
    flat = torch.load(out, weights_only=False)
    return {k: v for k, v in flat.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_solo.preprocess.demo import build_demo_shards

    tmp = tmp_path_factory.mktemp("train")
    data = build_demo_shards(tmp / "demo", seq_length=256)
    common = [
        "--model", "debug", "--data-path", data["train"], "--valid-data-path", data["valid"],
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--eval-interval", "4", "--eval-iters", "1", "--seed", "7", "--log-throughput",
    ]  # fmt: skip
    tp2 = ["--tensor-model-parallel-size", "2", "--use-distributed-optimizer"]
    tp1 = ["--tensor-model-parallel-size", "1", "--use-distributed-optimizer"]
    r = {"tmp": tmp}
    r["ref"] = _torchrun(1, [*common, *tp1, "--save", str(tmp / "ref")], tmp / "ref.jsonl")
    r["a"] = _torchrun(4, [*common, *tp2, "--save", str(tmp / "a"), "--save-interval", "4"], tmp / "a.jsonl")
    b_flags = [*common, *tp2, "--save", str(tmp / "b"), "--save-interval", "3", "--load", str(tmp / "b")]
    r["b"] = _torchrun(4, b_flags, tmp / "b.jsonl", env={"SOLO_TEST_KILL_AFTER_ITER": "5"})
    r["b_tracker_after_kill"] = (tmp / "b" / "latest_checkpointed_iteration.txt").read_text().strip()
    r["b2"] = _torchrun(4, b_flags, tmp / "b2.jsonl", env={"SOLO_TEST_KILL_IN_SAVE_ITER": str(ITERS)})
    c_flags = [*common, *tp1, "--load", str(tmp / "a" / "iter_0000004"), "--save", str(tmp / "c")]
    r["c"] = _torchrun(4, [*c_flags, "--exit-interval", "6"], tmp / "c.jsonl")
    sp_recompute = ["--sequence-parallel", "--recompute-granularity", "full", "--recompute-num-layers", "1"]
    r["d"] = _torchrun(4, [*common, *tp2, *sp_recompute, "--load", str(tmp / "c")], tmp / "d.jsonl")
    e_flags = [
        *common,
        *tp1,
        "--pretrained-checkpoint",
        str(tmp / "a"),
        "--train-iters",
        "2",
        "--eval-interval",
        "0",
        "--lr-warmup-iters",
        "1",
    ]
    e_env = None
    if importlib.util.find_spec("wandb") is not None:  # the optional extra (in .[test]): offline run dir
        e_flags += ["--wandb-project", "solo-test", "--wandb-exp-name", "stage-e", "--wandb-save-dir", str(tmp / "wb")]
        e_env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r["e"] = _torchrun(1, e_flags, tmp / "e.jsonl", env=e_env)
    # preemption: SIGTERM reaches rank 1 only, after iteration 2; every rank stops at the same step and saves
    f_flags = [*common, *tp2, "--save", str(tmp / "f"), "--load", str(tmp / "f"), "--exit-signal-handler"]
    r["f"] = _torchrun(4, f_flags, tmp / "f.jsonl", sigterm_at=(1, 2))
    r["f_tracker"] = (tmp / "f" / "latest_checkpointed_iteration.txt").read_text().strip()
    r["f2"] = _torchrun(4, f_flags, tmp / "f2.jsonl")
    return r


def _ok(run: dict) -> None:
    assert run["rc"] == 0, run["out"][-6000:]
    assert run["survivors"] == [], f"processes outlived the run: {run['survivors']}"


def _close(got: dict[int, float], want: dict[int, float], iters, rtol: float = LOSS_RTOL) -> None:
    for i in iters:
        assert i in got, f"iteration {i} missing: got {sorted(got)}"
        assert got[i] == pytest.approx(want[i], rel=rtol), f"iteration {i}: {got[i]} vs {want[i]}"


@pytest.mark.dist
def test_tp2_dp2_distributed_optimizer_matches_single_process(runs):
    _ok(runs["ref"])
    _ok(runs["a"])
    ref, a = runs["ref"]["losses"], runs["a"]["losses"]
    assert sorted(ref) == sorted(a) == list(range(1, ITERS + 1))
    _close(a, ref, range(1, ITERS + 1))
    _close(runs["a"]["valid"], runs["ref"]["valid"], (4, 8))
    w_ref = _checkpoint_weights(runs["tmp"] / "ref" / "iter_0000008", runs["tmp"])
    w_a = _checkpoint_weights(runs["tmp"] / "a" / "iter_0000008", runs["tmp"])
    assert w_ref.keys() == w_a.keys() and any("vision_projector" in k for k in w_a)
    assert len(w_ref) > 5
    for k in w_ref:
        torch.testing.assert_close(w_a[k], w_ref[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


@pytest.mark.dist
def test_loss_falls_and_metrics_are_logged(runs):
    _ok(runs["a"])
    losses = runs["a"]["losses"]
    assert losses[ITERS] < losses[1] - 0.5, losses  # ln(1005) = 6.9 at the start
    out = runs["a"]["out"]
    for field in ("| loss ", "| vision-lm ", "| text-lm ", "| lr ", "| grad-norm ", "| tokens/s ", "| TFLOP/s/GPU "):
        assert field in out
    assert "validation at iter 4" in out and "first loss" in out


@pytest.mark.dist
def test_kill9_then_resume_continues_bit_identically(runs):
    b, b2, a = runs["b"], runs["b2"], runs["a"]["losses"]
    assert b["rc"] != 0 and max(b["losses"]) == 5, b["out"][-3000:]  # SIGKILLed after iteration 5
    assert runs["b_tracker_after_kill"] == "3"
    assert {i: b["losses"][i] for i in range(1, 6)} == {i: a[i] for i in range(1, 6)}  # same run as `a` so far
    assert "resumed from" in b2["out"] and "at iteration 3" in b2["out"], b2["out"][-3000:]
    assert sorted(b2["losses"]) == list(range(4, ITERS + 1))
    assert {i: b2["losses"][i] for i in range(4, ITERS + 1)} == {i: a[i] for i in range(4, ITERS + 1)}  # exact
    assert b["survivors"] == [] and b2["survivors"] == [], "processes outlived the killed run"


@pytest.mark.dist
def test_kill_during_save_leaves_last_checkpoint_loadable(runs):
    b2 = runs["b2"]
    assert b2["rc"] != 0  # killed inside the exit save of iteration 8
    root = runs["tmp"] / "b"
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (root / "iter_0000008.tmp").is_dir() and not (root / "iter_0000008").exists()
    assert (root / "iter_0000006" / "metadata.json").exists()


@pytest.mark.dist
def test_reshard_tp2dp2_to_tp1dp4_and_back(runs):
    c, d, a = runs["c"], runs["d"], runs["a"]["losses"]
    _ok(c)
    _ok(d)
    assert "resumed from" in c["out"] and sorted(c["losses"]) == [5, 6]
    _close(c["losses"], a, (5, 6))
    assert "at iteration 6" in d["out"] and sorted(d["losses"]) == [7, 8]
    _close(d["losses"], a, (7, 8))


@pytest.mark.dist
def test_stage_chaining_starts_from_weights_with_fresh_schedule(runs):
    e, a, ref = runs["e"], runs["a"]["losses"], runs["ref"]["losses"]
    _ok(e)
    assert "loaded weights from" in e["out"] and "starting at iteration 0" in e["out"]
    assert sorted(e["losses"]) == [1, 2]
    # same samples as the first step of a fresh run, but from trained weights: far below a fresh start
    assert e["losses"][1] < ref[1] - 0.5 and e["losses"][1] == pytest.approx(a[ITERS], abs=0.5)
    lrs = [json.loads(x)["lr"] for x in (runs["tmp"] / "e.jsonl").read_text().splitlines()]
    assert lrs[0] == pytest.approx(3e-3)  # a fresh 1-step warm-up to the peak; `a` ended near --min-lr 3e-4


@pytest.mark.dist
def test_sigterm_saves_at_the_agreed_step_exits_0_and_resumes_identically(runs):
    f, f2, a = runs["f"], runs["f2"], runs["a"]["losses"]
    _ok(f)  # exit code 0: a preempted job that saved is a success
    stopped = max(f["losses"])
    assert 2 <= stopped < ITERS, f["out"][-3000:]
    assert f"exiting after iteration {stopped}: SIGTERM received" in f["out"]
    assert f["out"].count("SIGTERM received") == 1  # one line, from rank 0
    assert runs["f_tracker"] == str(stopped) and (runs["tmp"] / "f" / f"iter_{stopped:07d}" / "metadata.json").exists()
    assert {i: f["losses"][i] for i in range(1, stopped + 1)} == {i: a[i] for i in range(1, stopped + 1)}
    _ok(f2)
    assert f"resumed from {runs['tmp'] / 'f'}" in f2["out"] and sorted(f2["losses"]) == list(range(stopped + 1, 9))
    assert {i: f2["losses"][i] for i in f2["losses"]} == {i: a[i] for i in f2["losses"]}  # bit-identical


def _wandb_history(run_dir: Path) -> list[dict]:
    """History rows of wandb's own offline run file (``run-*.wandb``: wandb's LevelDB-style record log of
    protobuf ``Record``s), decoded with wandb's protobuf classes; an independent reader of what wandb wrote."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, pos, block, pending, rows = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B", data[:7]
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: zero padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += block - pos % block if pos % block else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item  # a key with "/" is stored as nested_key parts
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


@pytest.mark.dist
def test_wandb_offline_run_dir_holds_our_metrics(runs):
    pytest.importorskip("wandb")
    e = runs["e"]
    _ok(e)
    (run_dir,) = (runs["tmp"] / "wb" / "wandb").glob("offline-run-*")
    rows = [r for r in _wandb_history(run_dir) if "train/loss" in r]
    assert [r["_step"] for r in rows] == [1, 2]
    assert [r["train/loss"] for r in rows] == pytest.approx([e["losses"][1], e["losses"][2]], rel=1e-6)
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s", "train/vision_lm"} <= set(rows[0])
