"""Answer and caption metrics as pure functions (no model, no files): the evaluate CLI, the trainer's in-training
evaluation and the tests score through these.

VQA accuracy follows the VQA challenge's evaluation code (the EvalAI server's ``vqaEval.py``, which lmms-eval's
VQA tasks also follow); the rules are reimplemented here, see :func:`normalize_answer`:

- an answer is normalised: newlines/tabs -> spaces, stripped; punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ?
  !`` deleted where it touches a space (or anywhere when the text holds a digit,digit comma as in ``1,000``),
  otherwise replaced by a space; a period not followed by a digit deleted (``3.5`` keeps its point); lower-cased;
  number words ``none``/``zero``..``ten`` -> digits; articles ``a an the`` dropped; apostrophe-less contractions
  (``dont``) restored (``don't``); words re-joined by single spaces.
- accuracy of a prediction against the human answers: ``min(#humans who gave it / 3, 1)``, averaged over the 10
  leave-one-out subsets of 9 when there are 10 answers (VQA v2, VizWiz, TextVQA, OK-VQA); with another number of
  answers, ``min(#matching / 3, 1)`` over all of them.

Deviations from the reference code, on purpose: the reference normalises only the prediction (the annotation's
answers were normalised when the dataset was made) and punctuation-processes the answers only when they disagree;
here every answer gets the same normalisation as the prediction, which is a no-op on already-normalised answers
and makes hand-written answer lists ("Two", "the cat") score as intended. The reference's period regex passes
``re.UNICODE`` as the substitution *count* (at most 32 periods removed); here every such period goes.

CIDEr is pycocoevalcap's (CIDEr-D, the COCO caption server's metric) on PTB-tokenized text (pycocoevalcap's
tokenizer, which runs Stanford's PTBTokenizer on java).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# Punctuation the VQA evaluation removes or turns into a space (apostrophes and colons stay: "don't", "3:30").
_PUNCT = ';/[]"{}()=+\\_-><@`,?!'
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {w: str(k) for k, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))

# The contractions the VQA evaluation restores, written with their apostrophes. The evaluation's table maps each
# spelling that lacks exactly ONE of the apostrophes to this form ("couldnt've" and "couldn'tve" -> "couldn't've";
# "couldntve" stays as it is): _CONTRACTIONS is built by that rule.
_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll that's
there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()


def _one_apostrophe_dropped(word: str) -> list[str]:
    marks = [k for k, c in enumerate(word) if c == "'"]
    return [word[:k] + word[k + 1 :] for k in marks]


_CONTRACTIONS = {variant: word for word in _CONTRACTED for variant in _one_apostrophe_dropped(word)}


def _strip_punctuation(text: str) -> str:
    out = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:  # the decision looks at the ORIGINAL text, for every mark (as the reference does)
        if digit_comma or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_articles_contractions(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The VQA evaluation's answer normalisation (module docstring): ``"Two dogs!"`` -> ``"2 dogs"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles_contractions(_strip_punctuation(text))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the prediction, stripped of surrounding whitespace, equals one of the answers (also stripped)."""
    pred = prediction.strip()
    return float(any(pred == a.strip() for a in answers))


def normalized_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals one of the normalised answers (any number of answers)."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (module docstring), in [0, 1]."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_answer(prediction)
    same = [normalize_answer(a) == pred for a in answers]
    if len(answers) != 10:
        return min(sum(same) / 3.0, 1.0)
    total = sum(same)
    # Leave answer k out: the other 9 hold total - same[k] matches.
    return sum(min((total - s) / 3.0, 1.0) for s in same) / len(answers)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def cider(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> tuple[float, dict[str, float]]:
    """(corpus CIDEr-D, per-item CIDEr-D) by pycocoevalcap on PTB-tokenized captions.

    CIDEr's document frequencies come from the references of the evaluated set, so a score is a property of the
    whole set (as on the COCO server), not a sum of independent per-item numbers."""
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ImportError(
            f"CIDEr needs pycocoevalcap (pip install pycocoevalcap; its tokenizer needs java): {e}"
        ) from e
    keys = list(predictions)
    missing = [k for k in keys if not references.get(k)]
    if missing:
        raise ValueError(f"CIDEr: no reference captions for item(s) {missing[:5]}")
    if not keys:
        raise ValueError("CIDEr: no predictions to score")
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
    res = tok.tokenize({k: [{"caption": predictions[k]}] for k in keys})
    score, per_item = Cider().compute_score(gts, res)  # per-item scores in the order of gts' keys
    return float(score), {k: float(s) for k, s in zip(list(gts), per_item)}
