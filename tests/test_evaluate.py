"""``python -m megatron_solo.evaluate`` end to end on the tiny exported model and its SOLO checkpoint, and the task
API the trainer calls (``task.run(model_fn)``) with a model function of its own."""

from __future__ import annotations

import json
import shutil

import pytest

from megatron_solo.eval.tasks import CaptionTask, VQATask, load_task
from megatron_solo.format.chat_template import Image, Turn


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task_files(tiny_solo, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tasks")
    (root / "img").mkdir()
    for p in tiny_solo.images:
        shutil.copy(p, root / "img" / p.name)
    photo, box, noise = (f"img/{p.name}" for p in tiny_solo.images)
    vqa = _write_jsonl(root / "vqa.jsonl", [
        {"id": "q1", "image": photo, "question": "Who is this?", "answers": ["grace hopper"] * 10},
        {"id": "q2", "image": box, "question": "What colour is the box?", "answers": ["blue"] * 7 + ["navy"] * 3},
        {"id": "q3", "images": [photo, noise], "question": "<image> or <image>: which is a photo?", "answer": "1"},
        {"id": "q4", "question": "Is this text only?", "answers": ["yes"]},
    ])  # fmt: skip
    caps = _write_jsonl(root / "caps.jsonl", [
        {"id": "c1", "image": photo, "captions": ["a woman in a navy uniform", "portrait of an officer"]},
        {"id": "c2", "image": box, "caption": "a blue box on a white background"},
        {"id": "c3", "image": noise, "captions": ["random coloured noise", "static"], "prompt": "Describe:"},
    ])  # fmt: skip
    return vqa, caps


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluate_cli_writes_predictions_and_scores_for_both_checkpoint_formats(tiny_solo, task_files, tmp_path,
                                                                               capsys):  # fmt: skip
    from megatron_solo.evaluate import main
    from megatron_solo.generate import Sampling, chat, load

    vqa, caps = task_files
    common = ["--task", f"vqa:{vqa}", "--task", f"caption:{caps}", "--batch-size", "3", "--max-new-tokens", "4",
              "--template", "mistral"]  # fmt: skip
    assert main(["--checkpoint", str(tiny_solo.hf), "--out-dir", str(tmp_path / "hf"), *common]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "vqa: 100%" in err, err[-2000:]  # the throughput line and the progress bar
    scores = json.loads((tmp_path / "hf" / "scores.json").read_text())
    assert set(scores) == {"vqa", "caps"}
    assert scores["vqa"]["n"] == 4 and scores["vqa"]["primary"] == "normalized_match"
    assert {"exact_match", "normalized_match", "vqa_accuracy"} <= set(scores["vqa"])
    assert scores["caps"]["n"] == 3 and scores["caps"]["primary"] == "cider" and scores["caps"]["cider"] >= 0
    preds = _rows(tmp_path / "hf" / "vqa.predictions.jsonl")
    assert [p["id"] for p in preds] == ["q1", "q2", "q3", "q4"] and preds[1]["references"][0] == "blue"

    # The scores are those of the written predictions (re-scored from the file) ...
    for name, path in (("vqa", vqa), ("caps", caps)):
        task = load_task(str(path))
        again = task.score_file(tmp_path / "hf" / f"{name}.predictions.jsonl").scores
        assert {k: again[k] for k in again} == {k: v for k, v in scores[name].items() if k != "primary"}
    # ... the predictions are generate's answers for the same conversations ...
    model, processor = load(tiny_solo.hf)
    task = VQATask.load(vqa)
    g = chat(model, processor, [it.turns for it in task.items], "mistral", Sampling(max_new_tokens=4))
    assert [p["prediction"] for p in preds] == [t.strip() for t in g.texts]
    # ... and the SOLO checkpoint gives the same predictions as its export (the VQA task: the same code path).
    vqa_only = [*common[:2], *common[4:]]
    assert main(["--checkpoint", str(tiny_solo.solo), "--out-dir", str(tmp_path / "solo"), *vqa_only]) == 0
    a, b = _rows(tmp_path / "hf" / "vqa.predictions.jsonl"), _rows(tmp_path / "solo" / "vqa.predictions.jsonl")
    assert [r["prediction"] for r in a] == [r["prediction"] for r in b]


def test_task_api_with_the_callers_own_model_fn(task_files):
    """What the trainer does every N steps: load once, run with its own model function, read the scores."""
    vqa, caps = task_files
    task = load_task(f"heldout=vqa:{vqa}")
    assert isinstance(task, VQATask) and task.name == "heldout"
    seen = []

    def model_fn(conversations):
        seen.extend(conversations)
        return ["Blue." if "colour" in str(c[-1].content) else "no" for c in conversations]

    result = task.run(model_fn, batch_size=3, progress=False)
    assert len(seen) == 4 and all(isinstance(c[-1], Turn) and c[-1].role == "user" for c in seen)
    images = [p.ref for p in seen[2][0].content if isinstance(p, Image)]
    assert len(images) == 2 and all(str(i).startswith(str(vqa.parent)) for i in images)  # resolved, in order
    assert result.scores["normalized_match"] == pytest.approx(1 / 4) and result.scores["exact_match"] == 0.0
    assert result.scores["vqa_accuracy"] == pytest.approx(1 / 4 * 1.0)  # q2: 7 of 10 said blue -> 1.0
    cap_task = CaptionTask.load(caps)
    assert cap_task.items[2].turns[0].content[-1] == "Describe:"
    with pytest.raises(RuntimeError, match="returned 1 answers for 3 prompts"):
        cap_task.run(lambda convs: ["x"], progress=False)

    def broken(convs):
        raise ValueError("cannot decode image")

    with pytest.raises(ValueError, match=r"caps.jsonl: items c1 .. c3: cannot decode image"):
        cap_task.run(broken, batch_size=4, progress=False)
