"""lmms-eval itself (``python -m lmms_eval --model solo``) on local tasks over a ``datasets`` dataset saved to disk,
with the tiny exported SOLO model: a generation task and a multiple-choice (loglikelihood) task.

Skipped when lmms-eval is not installed (it is the ``eval`` extra, installed by scripts/install_lmms_eval.sh; see
docs/evaluation.md for why it is not in ``test``). The answers lmms-eval records must be ours (``generate.chat`` on
the same conversation) and the choice scores HF's own ``loss`` on the same ids.
"""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest
import torch

from tests.tiny_solo import single_process_env

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e .[eval]; docs/evaluation.md)")

QUESTIONS = ["Who is this?", "What colour is the box?", "Is this noise?"]
ANSWERS = ["grace", "blue", "yes"]
CHOICES = [["grace", "ada"], ["blue", "red"], ["yes", "no"]]

UTILS = """
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]


def doc_to_target_index(doc):
    return doc["choices"].index(doc["answer"])
"""

TASK = """task: {name}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
{extra}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


def _make_tasks(root, images):
    import datasets

    rows = {"image": [str(p) for p in images], "question": QUESTIONS, "answer": ANSWERS, "choices": CHOICES}
    ds = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(root / "data"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS)
    gen = 'doc_to_target: "answer"\ngeneration_kwargs:\n  max_new_tokens: 4\n  do_sample: false'
    mc = "doc_to_choice: !function utils.doc_to_choice\ndoc_to_target: !function utils.doc_to_target_index"
    for name, output_type, extra, metric in (
        ("solo_local_vqa", "generate_until", gen, "exact_match"),
        ("solo_local_mc", "multiple_choice", mc, "acc"),
    ):
        text = TASK.format(name=name, data=root / "data", output_type=output_type, extra=extra, metric=metric)
        (tasks / f"{name}.yaml").write_text(text)
    return tasks


def _samples(out, task):
    (path,) = glob.glob(str(out / "**" / f"*_samples_{task}.jsonl"), recursive=True)
    return sorted((json.loads(line) for line in open(path)), key=lambda r: r["doc_id"])


def test_lmms_eval_runs_local_tasks_with_the_solo_adapter(tiny_solo, tmp_path):
    from megatron_solo.format.chat_template import Image, Turn
    from megatron_solo.generate import Sampling, chat, load

    tasks = _make_tasks(tmp_path, tiny_solo.images)
    out = tmp_path / "out"
    env = single_process_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "solo", "--model_args",
           f"pretrained={tiny_solo.hf},template=mistral", "--tasks", "solo_local_vqa,solo_local_mc",
           "--include_path", str(tasks), "--batch_size", "2", "--device", "cpu", "--output_path", str(out),
           "--log_samples"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (results_file,) = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    results = json.load(open(results_file))["results"]

    model, processor = load(tiny_solo.hf)
    vqa = _samples(out, "solo_local_vqa")
    ours = []
    for image, question in zip(tiny_solo.images, QUESTIONS):
        conv = [Turn.of("user", Image(image.as_posix()), question)]
        ours.append(chat(model, processor, [conv], "mistral", Sampling(max_new_tokens=4)).texts[0].strip())
    assert [s["filtered_resps"] for s in vqa] == ours
    assert results["solo_local_vqa"]["exact_match,none"] == sum(a == b for a, b in zip(ours, ANSWERS)) / 3

    # multiple choice: lmms-eval ranks choices by the value loglikelihood returns (argmin: HF's mean token loss).
    mc = _samples(out, "solo_local_mc")
    correct = 0
    for image, question, choices, answer, sample in zip(tiny_solo.images, QUESTIONS, CHOICES, ANSWERS, mc):
        losses = []
        for choice in choices:
            conv = [{"role": "user", "content": question}, {"role": "assistant", "content": choice}]
            batch = processor.apply_chat_template(conv, images=[image.as_posix()], template="mistral",
                                                  return_targets=True, loss_on="last")  # fmt: skip
            labels = torch.where(batch["targets"] == 1, batch["input_ids"], -100)
            labels[0, -1] = -100  # the closing EOS is not part of the choice
            with torch.no_grad():
                losses.append(float(model(input_ids=batch["input_ids"], patches=batch["patches"], labels=labels).loss))
        got = [float(nll) for nll, _ in sample["filtered_resps"]]
        assert got == pytest.approx(losses, rel=1e-5, abs=1e-5)
        correct += choices[min(range(len(losses)), key=losses.__getitem__)] == answer
    assert results["solo_local_mc"]["acc,none"] == pytest.approx(correct / 3)
