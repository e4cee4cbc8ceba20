"""SFT with pretrain_solo.py end to end (real torchrun + gloo, real SentencePiece, real HF transformers, CPU).

From the tiny random SOLO model (tests/tiny_solo.py) as ``--pretrained-checkpoint``, on LLaVA-format conversations
about generated pictures (megatron_solo/preprocess/demo_sft.py) built by the real builder CLI with
``template=mistral,loss-on=assistant``:

- ``u``:  TP=2 x DP=1 with sequence parallelism (switched off while decoding), 6 iterations, ``--eval-tasks``
  every 2: the uninterrupted run;
- ``i1``/``i2``: the same with ``--load``/``--save`` of one dir, stopped by ``--exit-interval 4`` and resumed
  (``--load`` wins over ``--pretrained-checkpoint``): the task scores must be the same at the same iterations;
- ``one``: 1 process, ``--pretrained-checkpoint u``, a shard set holding ONE conversation, GBS 1, lr 0: the
  trainer's SFT loss of that conversation, compared with HF transformers on ``u`` exported.

In process: the SFT batch's loss touches only the assistant targets (labels elsewhere can be anything, loss and
gradients stay bit-identical), the in-process eval generator (eval/inprocess.py) feeds the processor's ids and
answers what HF ``generate`` answers, and setup errors (bad task file, PP > 1, two chat templates) come once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist import REPO, torchrun_cmd, torchrun_env
from tests.tiny_solo import single_process_env

SEQ = 256


def _build(source: str, tokenizer: Path, out: Path) -> Path:
    cmd = [sys.executable, "-m", "tools.preprocess", "build", "--source", source, "--tokenizer", str(tokenizer),
           "--out", str(out), "--seq-length", str(SEQ), "--workers", "1", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=single_process_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _launch(nproc: int, flags: list[str], metrics: Path) -> dict:
    cmd = torchrun_cmd("pretrain_solo.py", nproc, [*flags, "--metrics-log", str(metrics)])
    proc = subprocess.run(cmd, cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=600)
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    return {"rc": proc.returncode, "out": proc.stdout + proc.stderr, "records": records}


def _scores(run: dict) -> dict[int, dict]:
    return {r["iteration"]: {k: v for k, v in r.items() if "/" in k} for r in run["records"] if r["kind"] == "eval_tasks"}  # fmt: skip  # noqa: E501


@pytest.fixture(scope="module")
def sft(tiny_solo, tmp_path_factory):
    from megatron_solo.checkpoint import open_checkpoint
    from megatron_solo.preprocess import demo_sft

    tmp = tmp_path_factory.mktemp("sft")
    tok = open_checkpoint(tiny_solo.solo).tokenizer_path
    llava = demo_sft.write_train(tmp / "train", 48)
    tasks = demo_sft.write_eval(tmp / "eval", 8)
    src = f"llava:{llava},image-root={llava.parent},template=mistral,loss-on=assistant"
    shards = _build(src, tok, tmp / "shards")
    first = json.loads(llava.read_text())[0]
    (tmp / "one").mkdir()
    (tmp / "one" / "llava.json").write_text(json.dumps([first]))
    one_src = f"llava:{tmp / 'one' / 'llava.json'},image-root={llava.parent},template=mistral,loss-on=assistant"
    one = _build(one_src, tok, tmp / "one_shards")
    common = [
        "--pretrained-checkpoint", str(tiny_solo.solo), "--data-path", str(shards),
        "--tensor-model-parallel-size", "2", "--sequence-parallel", "--micro-batch-size", "1",
        "--global-batch-size", "4",
        "--train-iters", "6", "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--weight-decay", "0.1",
        "--seed", "5", "--eval-tasks", f"size=vqa:{tasks['size']}", f"colour=vqa:{tasks['colour']}",
        "--eval-tasks-interval", "2", "--eval-tasks-samples", "8", "--eval-tasks-max-new-tokens", "4",
    ]  # fmt: skip
    r = {"tmp": tmp, "tok": tok, "shards": shards, "one_shards": one, "first": first, "image_root": llava.parent}
    r["u"] = _launch(2, [*common, "--save", str(tmp / "u"), "--tensorboard-dir", str(tmp / "tb")], tmp / "u.jsonl")
    resumable = [*common, "--save", str(tmp / "i"), "--load", str(tmp / "i")]
    r["i1"] = _launch(2, [*resumable, "--exit-interval", "4"], tmp / "i1.jsonl")
    r["i2"] = _launch(2, resumable, tmp / "i2.jsonl")
    one_flags = ["--pretrained-checkpoint", str(tmp / "u"), "--data-path", str(one), "--global-batch-size", "1",
                 "--train-iters", "1", "--lr", "0", "--no-save-at-exit"]  # fmt: skip
    r["one"] = _launch(1, one_flags, tmp / "one.jsonl")
    return r


def _ok(run: dict) -> None:
    assert run["rc"] == 0, run["out"][-6000:]


@pytest.mark.dist
def test_sft_starts_from_weights_records_the_template_and_learns(sft):
    from megatron_solo.checkpoint import open_checkpoint

    _ok(sft["u"])
    assert "weights from" in sft["u"]["out"] and "fresh optimizer and schedule" in sft["u"]["out"]
    losses = {r["iteration"]: r["loss"] for r in sft["u"]["records"] if r["kind"] == "train"}
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1]
    ckpt = open_checkpoint(sft["tmp"] / "u")
    assert ckpt.iteration == 6 and ckpt.chat_template == "mistral"  # from the shards' manifest


@pytest.mark.dist
def test_eval_task_scores_in_metrics_and_tensorboard_continue_identically_after_resume(sft):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("u", "i1", "i2"):
        _ok(sft[name])
    assert "resumed from" in sft["i2"]["out"]  # --load's checkpoint wins over --pretrained-checkpoint
    u, i1, i2 = (_scores(sft[k]) for k in ("u", "i1", "i2"))
    assert sorted(u) == [0, 2, 4, 6] and sorted(i1) == [0, 2, 4] and sorted(i2) == [6]
    assert {**i1, **i2} == u  # same scores at the same steps, interrupted or not
    assert u[0]["size/n"] == 8 and u[0]["colour/n"] == 8
    # the comparison is not one of constants: the answers change as the model trains
    assert len({(s["size/answer_tokens"], s["colour/answer_tokens"], s["size/normalized_match"]) for s in u.values()}) > 1, u  # fmt: skip  # noqa: E501
    acc = EventAccumulator(str(sft["tmp"] / "tb"))
    acc.Reload()
    events = acc.Scalars("eval_tasks/size/normalized_match")
    assert [(e.step, e.value) for e in events] == [(k, pytest.approx(u[k]["size/normalized_match"])) for k in u]
    assert "eval tasks at iter 4 | size normalized_match" in sft["u"]["out"]


@pytest.fixture(scope="module")
def u_hf(sft):
    """The SFT run's checkpoint exported (megatron_solo.convert) and loaded with HF transformers."""
    from megatron_solo.convert.export_hf import export_hf
    from megatron_solo.generate import load

    _ok(sft["u"])
    return load(export_hf(sft["tmp"] / "u", sft["tmp"] / "u_hf"))


def _stored_document(path: Path) -> tuple[list[int], list[int]]:
    """(ids, targets) of the first document of the first pack of a shard set, as the builder stored them."""
    from megatron_solo.data.shards import ShardSet

    pack = ShardSet(path)[0]
    n = int(pack.cu_seqlens[1])
    return pack.tokens[:n].tolist(), pack.targets[:n].tolist()


@pytest.mark.dist
def test_sft_loss_of_one_conversation_equals_hf_on_the_exported_model(sft, u_hf):
    """The trainer's loss (loader, packing, stored targets, SoloModel) == cross-entropy of the exported HF model
    over the processor's ids, masked to the assistant targets; shard ids == processor ids."""
    _ok(sft["one"])
    trainer_loss = next(r["loss"] for r in sft["one"]["records"] if r["kind"] == "train")
    model, processor = u_hf
    image = str(sft["image_root"] / sft["first"]["image"])
    got = processor.apply_chat_template(sft["first"]["conversations"], images=[image], template="mistral",
                                        return_targets=True)  # fmt: skip
    ids, targets = got["input_ids"], got["targets"]
    assert _stored_document(sft["one_shards"]) == (ids[0].tolist(), targets[0].tolist())
    with torch.no_grad():
        logits = model(input_ids=ids, patches=got["patches"]).logits.float()
    per_token = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    mask = targets[0, 1:].bool()
    assert 0 < mask.sum() < len(mask)
    reference = float(per_token[mask].mean())
    assert trainer_loss == pytest.approx(reference, rel=2e-5, abs=1e-6)


# ---- in process (TP=1): the loss mask, the in-process generator --------------------------------------------------
@pytest.fixture(scope="module")
def megatron_u(sft):
    from megatron_solo import checkpoint, parallel
    from megatron_solo.model import build_solo_model, config_from_dict

    _ok(sft["u"])
    parallel.initialize(tensor_model_parallel_size=1)
    ckpt = checkpoint.open_checkpoint(sft["tmp"] / "u")
    model = build_solo_model(config_from_dict(ckpt.architecture, tensor_model_parallel_size=1, seq_length=SEQ))
    checkpoint.load_model_weights(model, ckpt)
    return model


def _loss_and_grads(model, batch, labels):
    from megatron_solo.model import build_packed_seq_params, solo_losses

    model.zero_grad()
    psp = build_packed_seq_params(batch.cu_seqlens, batch.max_seqlen)
    per_token = model(batch.tokens, batch.position_ids, batch.patches, labels=labels, packed_seq_params=psp)
    total, count = solo_losses(per_token, batch.loss_mask, batch.vision_doc_mask)["overall"]
    loss = total / count
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _batch(path: Path):
    from megatron_solo.data.batch import collate, to_solo_batch
    from megatron_solo.data.shards import ShardSet

    return to_solo_batch(collate([ShardSet(path)[0]]))


def test_only_assistant_tokens_enter_the_sft_loss_and_its_gradient(sft, megatron_u):
    """Replace every label that is not an assistant target (system/user text, BOS, image-layout tokens, padding)
    with random ids: loss and gradients stay bit-identical; change one assistant label: the loss changes. (The
    inputs themselves are the context the answers are predicted from, so changing them may change the loss.)"""
    batch = _batch(sft["shards"])  # a pack of several conversations
    assert len(batch.cu_seqlens) > 2
    mask = batch.loss_mask.bool()
    assert 0 < mask.sum() < mask.numel() / 2
    loss, grads = _loss_and_grads(megatron_u, batch, batch.labels)
    assert grads and any(g.abs().sum() > 0 for g in grads.values())
    noise = torch.randint(0, 1000, batch.labels.shape, generator=torch.Generator().manual_seed(0))
    other = torch.where(mask, batch.labels, noise)
    assert not torch.equal(other, batch.labels)
    loss2, grads2 = _loss_and_grads(megatron_u, batch, other)
    assert torch.equal(loss, loss2) and grads.keys() == grads2.keys()
    assert all(torch.equal(grads[k], grads2[k]) for k in grads)
    flipped = batch.labels.clone()
    k = int(mask.flatten().nonzero()[0])
    flipped.view(-1)[k] = (flipped.view(-1)[k] + 7) % 1000
    assert not torch.equal(_loss_and_grads(megatron_u, batch, flipped)[0], loss)


def test_the_loss_targets_are_the_answers_of_the_source_json_and_their_eos(sft):
    from megatron_solo.format.tokens import SoloTokenizer

    tok = SoloTokenizer(str(sft["tok"]))
    batch = _batch(sft["one_shards"])
    labels = batch.labels.view(-1)[batch.loss_mask.view(-1).bool()].tolist()
    answers = [t["value"] for t in sft["first"]["conversations"] if t["from"] == "gpt"]
    assert labels.count(tok.eos_id) == len(answers)  # mistral: every answer closes with its EOS
    pieces, run = [], []
    for t in labels:
        if t == tok.eos_id:
            pieces.append(tok.decode(run).strip())
            run = []
        else:
            run.append(t)
    assert pieces == answers


def test_in_process_generator_feeds_the_processor_ids_and_answers_as_hf_generate(sft, megatron_u, u_hf):
    """eval/inprocess.py (what --eval-tasks runs): its first forward sees exactly the processor's generation
    prompt (the stored document's prefix), and its greedy answers equal HF generate's on the exported model."""
    from megatron_solo.eval.inprocess import MegatronModelFn
    from megatron_solo.format.messages import to_turns
    from megatron_solo.generate import Sampling, chat

    hf_model, processor = u_hf
    image = str(sft["image_root"] / sft["first"]["image"])
    prompts = [sft["first"]["conversations"][:1], [{"from": "human", "value": "What shape is this?<image>"}]]
    fn = MegatronModelFn(megatron_u, sft["tok"], "mistral", max_new_tokens=4)
    seen = []
    handle = megatron_u.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()) if not seen else None)
    try:
        fn([to_turns(prompts[0], [image])])
    finally:
        handle.remove()
    want = processor.apply_chat_template(prompts[0], images=[image], template="mistral", add_generation_prompt=True)
    want_ids = want["input_ids"][0].tolist()
    assert seen[0][0].tolist() == want_ids
    assert _stored_document(sft["one_shards"])[0][: len(want_ids)] == want_ids
    answers = fn([to_turns(p, [image]) for p in prompts])  # one batch, prompts of different lengths
    for p, answer in zip(prompts, answers):
        hf = chat(hf_model, processor, [p], "mistral", Sampling(max_new_tokens=4), images=[[image]])
        assert answer == hf.texts[0].strip()


# ---- setup errors: once, naming the file -------------------------------------------------------------------------
def _plan(flags: list[str]):
    from megatron_solo.training.arguments import parse_args
    from megatron_solo.training.plan import plan_run

    return plan_run(parse_args(flags))


def test_eval_task_and_template_setup_errors(sft, tmp_path):
    from megatron_solo.training.errors import SetupError

    base = ["--data-path", str(sft["shards"]), "--train-iters", "2", "--lr", "1e-3", "--global-batch-size", "1"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "image": "nowhere.png", "question": "q?", "answer": "a"}\n{not json\n')
    with pytest.raises(SetupError, match="bad.jsonl"):
        _plan([*base, "--eval-tasks", f"vqa:{bad}", "--eval-tasks-interval", "1"])
    with pytest.raises(SetupError, match="--eval-tasks-interval"):
        _plan([*base, "--eval-tasks", f"vqa:{bad}"])
    manifest = json.loads((sft["shards"] / "manifest.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for f in sft["shards"].iterdir():
        (other / f.name).symlink_to(f)
    (other / "manifest.json").unlink()
    manifest["sources"][0]["options"]["template"] = "chatml"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SetupError, match="different chat templates.*mistral.*chatml|different chat templates"):
        _plan([*base[:1], str(sft["shards"]), str(other), *base[2:]])
    plan = _plan(base)
    assert plan.chat_template == "mistral" and plan.eval_tasks == []


def test_eval_tasks_refused_with_pipeline_parallelism(sft, monkeypatch):
    from megatron_solo.training.errors import SetupError

    monkeypatch.setenv("WORLD_SIZE", "2")
    task = sft["tmp"] / "eval" / "size.jsonl"
    flags = ["--data-path", str(sft["shards"]), "--train-iters", "2", "--lr", "1e-3", "--global-batch-size", "2",
             "--pipeline-model-parallel-size", "2", "--num-layers", "2", "--eval-tasks", f"vqa:{task}",
             "--eval-tasks-interval", "1"]  # fmt: skip
    with pytest.raises(SetupError, match="pipeline-model-parallel-size"):
        _plan(flags)


def test_tasks_due_is_a_function_of_the_iteration():
    from megatron_solo.training.eval_tasks import tasks_due

    assert [i for i in range(0, 12) if tasks_due(i, 4, 10)] == [0, 4, 8, 10]
    assert not any(tasks_due(i, 0, 10) for i in range(12))
    assert np.all([tasks_due(i, 1, 3) for i in range(4)])


@pytest.mark.dist
def test_sft_8gpu_script_runs_one_epoch_in_a_tiny_configuration(sft, tiny_solo):
    """examples/sft_8gpu.sh itself (the recipe's flags: dist-opt with overlapped grad reduce / param gather,
    warm-up fraction, cosine, wd, --eval-tasks), at 2 processes, fp32, GBS 4: the epoch it computes from the shard
    files is the one the trainer trains."""
    import re

    save = sft["tmp"] / "recipe"
    sizes = {"GPUS_PER_NODE": "2", "TP": "1", "GBS": "4", "SEQ": str(SEQ), "PRECISION": "--fp32"}
    # DP=2 with --overlap-param-gather: the replicas decode their shares (4 and 3 items) without its forward hooks
    tasks = {"EVAL_TASKS": f"size=vqa:{sft['tmp'] / 'eval' / 'size.jsonl'}", "EVAL_SAMPLES": "7"}
    env = torchrun_env({"INIT": str(tiny_solo.solo), "DATA": str(sft["shards"]), "SAVE": str(save), **sizes, **tasks})
    proc = subprocess.run(["bash", "examples/sft_8gpu.sh", "--log-interval", "1"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    m = re.search(r"one epoch of the mixture = (\d+) packs .*--train-samples (\d+) = 1 epoch\(s\) at GBS 4: (\d+) steps", out)  # fmt: skip  # noqa: E501
    assert m, out[-3000:]
    packs, samples, steps = map(int, m.groups())
    assert packs == samples and steps == samples // 4 > 0
    assert f"one epoch is --train-samples {packs})" in out  # the trainer's own count of the blend
    assert f"iter {steps:>6}/{steps}" in out
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in metrics if r["kind"] == "train"] == list(range(1, steps + 1))
    from megatron_solo.checkpoint import open_checkpoint

    assert open_checkpoint(save).chat_template == "mistral" and open_checkpoint(save).iteration == steps
    scored = [r for r in metrics if r["kind"] == "eval_tasks"]
    assert [r["iteration"] for r in scored] == [0, steps] and all(r["size/n"] == 7 for r in scored)


def test_demo_report_table_and_held_out_phrasings(tmp_path):
    """The SFT demo's data: evaluation phrasings never occur in training; the report prints the scores given."""
    from megatron_solo.preprocess import demo_sft

    records = json.loads(demo_sft.write_train(tmp_path / "train", 30).read_text())
    asked = {t["value"].replace("<image>", "").strip() for r in records for t in r["conversations"] if t["from"] == "human"}  # fmt: skip  # noqa: E501
    held_out = {q for _, (_, unseen) in demo_sft.QUESTIONS.items() for q in unseen}
    assert asked and not asked & held_out
    before = {"colour": {"normalized_match": 0.0, "n": 10}, "shape": {"normalized_match": 0.25, "n": 10}}
    after = {"colour": {"normalized_match": 1.0, "n": 10}, "shape": {"normalized_match": 0.9, "n": 10}}
    for name, scores in (("b", before), ("a", after)):
        (tmp_path / f"{name}.json").write_text(json.dumps(scores))
    rows = demo_sft.report(tmp_path / "b.json", tmp_path / "a.json").splitlines()
    assert rows[1].split() == ["colour", "0.000", "1.000", "0.125", "10"]
    assert rows[2].split() == ["shape", "0.250", "0.900", "0.333", "10"] and len(rows) == 3
