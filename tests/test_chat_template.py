"""Chat templates: segments, targets per loss policy, and the token ids of a rendered document."""

from __future__ import annotations

import pytest

from megatron_solo.format.chat_template import (
    Image,
    Segment,
    TemplateError,
    Turn,
    place_images,
    render,
    token_ids,
)

CONV = [
    Turn.of("system", "Be brief."),
    Turn.of("user", Image("img0"), "\nWhat colour?"),
    Turn.of("assistant", "Red."),
    Turn.of("user", "And the shape?"),
    Turn.of("assistant", "A square."),
]


def _kinds(r):
    return [(s.kind, s.text, s.target) for s in r.segments]


def test_plain_is_parts_in_order_without_separators():
    r = render(CONV, "plain", "text")
    assert _kinds(r) == [
        ("text", "Be brief.", True),
        ("image", "", False),
        ("text", "\nWhat colour?", True),
        ("text", "Red.", True),
        ("text", "And the shape?", True),
        ("text", "A square.", True),
    ]
    assert r.eos_target and r.images == ["img0"]


def test_plain_assistant_and_last_policies():
    a = render(CONV, "plain", "assistant")
    assert [s.target for s in a.segments if s.kind == "text"] == [False, False, True, False, True]
    assert a.eos_target
    last = render(CONV, "plain", "last")
    assert [s.target for s in last.segments if s.kind == "text"] == [False, False, False, False, True]
    ends_with_user = render(CONV[:2], "plain", "assistant")
    assert not any(s.target for s in ends_with_user.segments) and not ends_with_user.eos_target


def test_mistral_layout_and_assistant_targets():
    r = render(CONV, "mistral", "assistant")
    assert _kinds(r) == [
        ("text", "[INST] Be brief.\n\n", False),
        ("image", "", False),
        ("text", "\nWhat colour? [/INST]", False),
        ("text", " Red.", True),
        ("eos", "", True),
        ("text", "[INST] And the shape? [/INST]", False),
        ("text", " A square.", True),
    ]
    assert r.eos_target  # the document's own EOS closes the last answer


def test_mistral_generation_prompt_has_no_closing_target():
    r = render(CONV[:4], "mistral", "assistant", add_generation_prompt=True)
    assert r.segments[-1] == Segment("text", False, text="[INST] And the shape? [/INST]")
    assert not r.eos_target
    with pytest.raises(TemplateError, match="already ends with an assistant"):
        render(CONV, "mistral", add_generation_prompt=True)


def test_token_ids_targets_align():
    r = render(CONV, "mistral", "assistant")
    enc = lambda s: [100 + len(s)]  # one fake id per run: its length tells which run it is
    ids, targets = token_ids(r, enc, lambda ref: [7, 8, 9], bos_id=1, eos_id=2)
    assert ids[0] == 1 and ids[-1] == 2
    assert len(ids) == len(targets)
    assert ids[2:5] == [7, 8, 9] and targets[2:5] == [0, 0, 0]
    assert [i for i, t in zip(ids, targets) if t] == [100 + len(" Red."), 2, 100 + len(" A square."), 2]
    prompt_ids, _ = token_ids(render(CONV[:4], "mistral", add_generation_prompt=True), enc, lambda r: [7], 1, 2, False)
    assert prompt_ids[-1] != 2


def test_place_images_and_errors():
    assert place_images("<image>\nDescribe.", ["a"]) == [Image("a"), "\nDescribe."]
    assert place_images("x <image> y <image>", ["a", "b"]) == ["x ", Image("a"), " y ", Image("b")]
    with pytest.raises(TemplateError, match="1 <image> placeholder"):
        place_images("<image>", [])
    with pytest.raises(TemplateError, match="unknown role"):
        render([Turn.of("bot", "x")])
    with pytest.raises(TemplateError, match="unknown chat template"):
        render(CONV, "chatml")
    with pytest.raises(TemplateError, match="images belong to user turns"):
        render([Turn.of("assistant", Image("a"))], "mistral")
