"""Where a run starts and how it refuses: the flags users type (Megatron-LM names, help and defaults), samples-based
schedules, and every resume / setup mismatch stopping with ONE message under real torchrun + gloo.

One 1-process run makes a distributed-optimizer checkpoint with ``--train-samples`` (debug model, GBS 4, 2 steps);
the error launches (2 processes each, run a few at a time) resume it with one thing changed (one starts fresh: the
interleaved pipeline schedule's micro-batch rule) and must exit non-zero with the one message printed exactly once
and no traceback from our code; one launch shows what just works (another DP size,
``--override-opt-param-scheduler``, ``--exit-duration-in-mins``).
"""

from __future__ import annotations

import subprocess

import pytest

from megatron_solo.training.errors import SetupError
from tests.dist import REPO, torchrun_cmd, torchrun_env

COMMON = [
    "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4", "--seed", "3",
    "--lr-warmup-fraction", "0.25", "--use-distributed-optimizer",
]  # fmt: skip


def _launch(nproc: int, flags: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        torchrun_cmd("pretrain_solo.py", nproc, flags), cwd=REPO, env=torchrun_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from megatron_solo.preprocess.demo import build_demo_shards

    tmp = tmp_path_factory.mktemp("setup")
    data = build_demo_shards(tmp / "demo", seq_length=256)
    base = ["--model", "debug", "--data-path", data["train"], *COMMON]
    rc, out = _finish(_launch(1, [*base, "--train-samples", "8", "--save", str(tmp / "ck")]))
    assert rc == 0, out[-4000:]
    return {"tmp": tmp, "data": data, "out": out, "resume": [*base, "--load", str(tmp / "ck")]}


_FRESH_VPP = [
    "--train-samples", "9", "--load", "/nonexistent/fresh-run", "--num-layers", "4", "--global-batch-size", "3",
    "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
]  # fmt: skip

# (name, flags changed on resume, the one message that must appear)
CASES = [
    ("model_recipe", ["--train-samples", "8", "--model", "tiny"], "--model tiny does not match"),
    ("arch_flag", ["--train-samples", "8", "--hidden-size", "32"], "hidden_size: flag 32 vs checkpoint 64"),
    ("distopt_off", ["--train-samples", "8", "--use-distributed-optimizer=0"], "saved with the distributed optimizer"),
    ("schedule", ["--train-iters", "3"], "pass --override-opt-param-scheduler"),  # 12 samples, saved: 8
    ("data_path", ["--train-samples", "8", "--data-path", "/nonexistent/set"], "--data-path: /nonexistent/set is not"),
    ("layout", ["--train-samples", "9", "--global-batch-size", "3"], "not divisible by --micro-batch-size 1 x"),
    ("fp16_cpu", ["--train-samples", "8", "--fp16"], "--fp16 needs a GPU"),
    ("pp_world", ["--train-samples", "8", "--pipeline-model-parallel-size", "4"], "world size 2 is not divisible by"),
    (
        "pp_layers",  # the checkpoint's 2 layers over PP 2 x 2 layers per virtual stage
        ["--train-samples", "8", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"],
        "2 layers do not split evenly over PP 2 x --num-layers-per-virtual-pipeline-stage 2",
    ),
    (
        "vpp_microbatches",  # a fresh 4-layer run, 2 virtual stages per rank, 3 micro-batches over PP 2
        _FRESH_VPP,
        "needs the micro-batches per step (3 = GBS 3 / (MBS 1 x DP 1)) to be a multiple of PP 2",
    ),
]


def _flags(resume: list[str], change: list[str]) -> list[str]:
    flags = list(resume)
    if "--use-distributed-optimizer=0" in change:
        flags.remove("--use-distributed-optimizer")
        change = [c for c in change if c != "--use-distributed-optimizer=0"]
    for flag in ("--data-path", "--global-batch-size", "--load"):  # replace the value, not append a second one
        if flag in change:
            i = flags.index(flag)
            del flags[i : i + 2]
    return [*flags, *change]


@pytest.fixture(scope="module")
def error_runs(ckpt):
    results = {}
    for start in range(0, len(CASES), 4):  # a few launches at a time: their start-up overlaps
        batch = [
            (name, _launch(2, _flags(ckpt["resume"], change)), msg) for name, change, msg in CASES[start : start + 4]
        ]
        for name, proc, msg in batch:
            results[name] = (*_finish(proc), msg)
    return results


@pytest.mark.dist
def test_train_samples_runs_the_blend_and_says_how_much_of_an_epoch(ckpt):
    out = ckpt["out"]
    assert "train: 2 iterations x GBS 4 = 8 samples = 0.021 epochs of the blend" in out, out[-3000:]
    assert "one epoch is --train-samples 379" in out  # the demo train set: 379 packs
    assert (ckpt["tmp"] / "ck" / "iter_0000002" / "trainer_state.json").exists()


@pytest.mark.dist
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_setup_error_is_one_message_and_nonzero_exit(error_runs, name):
    rc, out, msg = error_runs[name]
    assert rc != 0, out[-3000:]
    assert out.count(msg) == 1, out[-3000:]
    assert out.count("pretrain_solo.py: error:") == 1, out[-3000:]
    assert "megatron_solo/" not in out and 'pretrain_solo.py", line' not in out, out[-3000:]  # no traceback of ours


@pytest.mark.dist
def test_resume_at_another_dp_with_override_and_exit_duration_just_works(ckpt):
    flags = [*ckpt["resume"], "--train-samples", "16", "--override-opt-param-scheduler", "--exit-duration-in-mins", "0"]
    rc, out = _finish(_launch(2, [*flags, "--save", str(ckpt["tmp"] / "ck2")]))
    assert rc == 0, out[-4000:]
    assert "resumed from" in out and "at iteration 2" in out
    assert "exiting after iteration 3: --exit-duration-in-mins reached" in out
    assert (ckpt["tmp"] / "ck2" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


# ---- in-process: flags -----------------------------------------------------------------------------------------
def test_every_flag_has_help_and_its_default_in_help():
    import argparse

    from megatron_solo.training.arguments import build_parser

    p = build_parser()
    assert isinstance(p.formatter_class, type) and issubclass(p.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    text = p.format_help()
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        assert p._get_formatter()._get_help_string(action).endswith("(default: %(default)s)"), action.option_strings
    for flag in ("--pipeline-model-parallel-size", "--train-samples", "--exit-signal-handler", "--wandb-project"):
        assert flag in text
    assert "(default: 1)" in text and text.count("(default:") >= len(p._actions) - 1


def _parse(extra: str):
    from megatron_solo.training.arguments import parse_args

    return parse_args(f"--data-path /x --lr 1e-3 --global-batch-size 8 {extra}".split())


def test_schedules_count_samples_as_megatron_lm():
    from megatron_solo.training.optimizer import schedule

    it = _parse("--train-iters 100 --lr-warmup-iters 10 --lr-decay-iters 80")
    s = schedule(it.optim, it.sched, it.train)
    assert (s["lr_warmup_steps"], s["lr_decay_steps"], s["wd_incr_steps"]) == (80, 640, 800)
    sa = _parse("--train-samples 803 --lr-warmup-fraction 0.1 --lr-decay-samples 700")
    assert sa.train.train_iters == 100  # 803 // 8, as Megatron-LM's update_train_iters
    s = schedule(sa.optim, sa.sched, sa.train)
    assert (s["lr_warmup_steps"], s["lr_decay_steps"], s["wd_incr_steps"]) == (pytest.approx(70.0), 700, 803)
    sw = schedule(*(lambda a: (a.optim, a.sched, a.train))(_parse("--train-samples 800 --lr-warmup-samples 40")))
    assert (sw["lr_warmup_steps"], sw["lr_decay_steps"]) == (40, 800)


@pytest.mark.parametrize(
    "extra, msg",
    [
        ("", "exactly one of --train-iters and --train-samples"),
        ("--train-iters 10 --train-samples 80", "exactly one of"),
        ("--train-samples 80 --lr-warmup-iters 2", "use --lr-decay-samples / --lr-warmup-samples"),
        ("--train-iters 10 --lr-decay-samples 50", "use --lr-decay-iters / --lr-warmup-iters"),
        ("--train-iters 10 --lr-warmup-fraction 0.1 --lr-warmup-iters 2", "--lr-warmup-fraction replaces"),
        ("--train-iters 10 --micro-batch-size 3", "not a multiple of --micro-batch-size 3"),
        ("--train-iters 10 --num-layers-per-virtual-pipeline-stage 1", "needs --pipeline-model-parallel-size >= 2"),
        ("--train-iters 10 --bf16 --fp32", "exclude each other"),
    ],
)
def test_contradictory_flags_are_refused(extra, msg):
    with pytest.raises(SetupError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        _parse(extra)


def test_pipeline_flags_are_parsed_into_parallel_args():
    a = _parse("--train-iters 10 --pipeline-model-parallel-size 2 --num-layers-per-virtual-pipeline-stage 1")
    assert (a.parallel.pipeline_model_parallel_size, a.parallel.num_layers_per_virtual_pipeline_stage) == (2, 1)
