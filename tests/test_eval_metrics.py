"""Evaluation metrics and task scoring without a model: the VQA normalisation rules case by case, VQA accuracy's
leave-one-out average, a hand-made predictions file scored to its known accuracy (library and CLI), and CIDEr
equal to pycocoevalcap's own number computed here independently."""

from __future__ import annotations

import json

import pytest

from megatron_solo.eval import metrics
from megatron_solo.eval.records import RecordError
from megatron_solo.eval.tasks import CaptionTask, VQATask, load_task


@pytest.mark.parametrize(
    "raw, want",
    [
        ("Two dogs!", "2 dogs"),  # number word, '!' next to nothing -> space, stripped
        ("The cat.", "cat"),  # article, final period
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit,digit comma: punctuation deleted, not spaced
        ("yes, it is", "yes it is"),  # ', ' touches a space: deleted
        ("red-ish", "red ish"),  # '-' inside a word: a space
        ("t-shirt", "t shirt"),
        ("(left)", "left"),
        ("x , y", "x y"),
        ("dont", "don't"),  # contractions restored
        ("couldnt've", "couldn't've"),  # one apostrophe missing: restored
        ("couldntve", "couldntve"),  # both missing: not in the table
        ("a man's hat", "man's hat"),  # apostrophes are not punctuation here
        ("None", "0"),
        ("  Yes\n", "yes"),
        ("an apple\tpie", "apple pie"),
        ("10:30", "10:30"),  # colons stay
    ],
)
def test_vqa_normalisation(raw, want):
    assert metrics.normalize_answer(raw) == want


def test_normalisation_is_idempotent_on_its_output():
    """Why normalising the reference answers too is safe on already-normalised annotations."""
    for raw in ("Two dogs!", "1,000", "red-ish", "dont know", "a man's hat", "(left)", "3.5 m."):
        once = metrics.normalize_answer(raw)
        assert metrics.normalize_answer(once) == once


def test_vqa_accuracy_leave_one_out_values():
    """10 answers, k of them equal to the prediction: (k*min((k-1)/3,1) + (10-k)*min(k/3,1)) / 10."""
    for k, want in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
        answers = ["cat"] * k + ["dog"] * (10 - k)
        assert metrics.vqa_accuracy("Cat.", answers) == pytest.approx(want, abs=1e-12), k
    assert metrics.vqa_accuracy("cat", ["cat"]) == pytest.approx(1 / 3)  # not 10 answers: min(#/3, 1)
    assert metrics.vqa_accuracy("cat", ["cat", "the cat", "Cat", "dog"]) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        metrics.vqa_accuracy("cat", [])


def test_exact_and_normalised_match():
    assert metrics.exact_match(" yes ", ["no", "yes"]) == 1.0
    assert metrics.exact_match("Yes", ["yes"]) == 0.0
    assert metrics.normalized_match("Yes.", ["yes"]) == 1.0
    assert metrics.normalized_match("two", ["2", "3"]) == 1.0
    assert metrics.normalized_match("a dog", ["cat"]) == 0.0


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


VQA_ROWS = [
    # prediction, answers -> exact, normalised, VQA accuracy (worked out by hand below)
    {"id": "a", "question": "How many?", "answers": ["2"] * 3 + ["two"] + ["3"] * 6},  # "Two." -> 0, 1, 1.0
    {"id": "b", "question": "Is it?", "answers": [{"answer": "yes"}] * 2 + [{"answer": "no"}] * 8},  # "Yes" 0,1,.6
    {"id": "c", "question": "Colour?", "answers": ["red"] + ["blue"] * 9},  # "red" -> 1, 1, 0.3
    {"id": "d", "question": "Wearing?", "answers": ["t-shirt"] * 3 + ["shirt"] * 7},  # "a T shirt" -> 0, 1, 0.9
    {"id": "e", "question": "Animal?", "answers": ["cat"] * 10},  # "dog" -> 0, 0, 0
    {"id": "f", "image": "missing.png", "question": "Where?", "answers": ["here"] * 10},  # image missing: skipped
]
PREDICTIONS = {"a": "Two.", "b": "Yes", "c": "red", "d": "a T shirt", "e": "dog"}


def test_hand_made_predictions_file_scores_exactly(tmp_path, capsys):
    task_file = _write_jsonl(tmp_path / "vqa.jsonl", VQA_ROWS)
    preds = _write_jsonl(tmp_path / "preds.jsonl", [{"id": k, "prediction": v} for k, v in PREDICTIONS.items()])
    task = VQATask.load(task_file)
    assert task.skipped == 1 and [it.id for it in task.items] == list("abcde")
    assert "skipped 1 record(s) whose image is missing" in capsys.readouterr().err
    result = task.score_file(preds)
    assert result.scores["vqa_accuracy"] == pytest.approx((1.0 + 0.6 + 0.3 + 0.9 + 0.0) / 5, abs=1e-12)
    assert result.scores["exact_match"] == pytest.approx(1 / 5, abs=1e-12)
    assert result.scores["normalized_match"] == pytest.approx(4 / 5, abs=1e-12)
    assert result.scores["n"] == 5 and result.scores["skipped"] == 1 and task.primary == "vqa_accuracy"
    per_item = {r["id"]: r["vqa_accuracy"] for r in result.predictions}
    assert per_item == pytest.approx({"a": 1.0, "b": 0.6, "c": 0.3, "d": 0.9, "e": 0.0}, abs=1e-12)

    from megatron_solo.evaluate import main

    assert (
        main(["--task", f"myvqa=vqa:{task_file}", "--predictions", str(preds), "--out-dir", str(tmp_path / "o")]) == 0
    )
    scores = json.loads((tmp_path / "o" / "scores.json").read_text())["myvqa"]
    assert scores["vqa_accuracy"] == pytest.approx(0.56, abs=1e-12) and scores["primary"] == "vqa_accuracy"
    rows = [json.loads(line) for line in (tmp_path / "o" / "myvqa.predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == list(PREDICTIONS.values())


def test_single_answer_items_use_normalised_match_as_primary(tmp_path):
    task = VQATask.load(
        _write_jsonl(tmp_path / "v.jsonl", [{"question": "q", "answer": "Red"}, {"question": "r", "answer": "2"}])
    )
    result = task.score(["red.", "three"])
    assert task.primary == "normalized_match" and result.scores["normalized_match"] == 0.5


def test_bad_records_and_prediction_files_name_the_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": ["a"]}\n{"question": "no answers"}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: a VQA record needs 'answers'"):
        VQATask.load(bad)
    bad.write_text('{"question": "q", "answers": ["a"]}\nnot json\n')
    with pytest.raises(RecordError, match=r"bad.jsonl:2: not valid JSON"):
        VQATask.load(bad)
    dup = _write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "question": "q", "answer": "a"}] * 2)
    with pytest.raises(RecordError, match=r"duplicate item ids \['1'\]"):
        VQATask.load(dup)
    task = VQATask.load(_write_jsonl(tmp_path / "ok.jsonl", VQA_ROWS[:2]))
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prediction": "2"}, {"id": "zz", "prediction": "x"}])
    with pytest.raises(RecordError, match=r"missing ids \['b'\], unknown ids \['zz'\]"):
        task.score_file(preds)
    with pytest.raises(RecordError, match="cannot tell the task"):
        load_task(str(_write_jsonl(tmp_path / "what.jsonl", [{"foo": 1}])))


CAPTIONS = [
    {
        "id": "1",
        "image": "img.png",
        "captions": ["a man riding a horse on a beach", "a person rides a horse", "horse and rider near the sea"],
    },
    {"id": "2", "image": "img.png", "captions": ["two cats sleeping on a red sofa", "cats asleep on a couch"]},
    {"id": "3", "image": "img.png", "caption": "a plate of pasta with tomato sauce"},
]
CAPTION_PREDICTIONS = {"1": "a man rides a horse on the beach", "2": "two cats on a sofa", "3": "a bowl of soup"}


def test_cider_equals_pycocoevalcap_computed_independently(tmp_path):
    from PIL import Image
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    Image.new("RGB", (32, 32)).save(tmp_path / "img.png")
    task = CaptionTask.load(_write_jsonl(tmp_path / "caps.jsonl", CAPTIONS))
    preds = _write_jsonl(tmp_path / "p.jsonl", [{"id": k, "prediction": v} for k, v in CAPTION_PREDICTIONS.items()])
    result = task.score_file(preds)

    refs = {r["id"]: r.get("captions", [r.get("caption")]) for r in CAPTIONS}
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in CAPTION_PREDICTIONS.items()})
    want, per_image = Cider().compute_score(gts, res)
    assert result.scores["cider"] == pytest.approx(float(want), abs=1e-12) and task.primary == "cider"
    got = {r["id"]: r["cider"] for r in result.predictions}
    assert got == pytest.approx(dict(zip(gts, map(float, per_image))), abs=1e-12)
    assert got["1"] > got["3"] > -1e-9  # a near-paraphrase beats an unrelated caption
