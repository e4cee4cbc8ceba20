"""Chat generation and the processor's chat-template method on a tiny exported SOLO model (tests/tiny_solo.py).

Template parity: for a multi-turn conversation with images in two places, the processor's ``apply_chat_template``
ids == ``token_ids(render(...))`` built from megatron_solo.format directly == the document the C++ shard builder
stores for the rendered segments == (for the generation prompt) the ids ``generate`` feeds the model, seen by a
forward hook. Then batching (left padding == one by one), the EOS stop, the JSONL batch mode and the interactive
chat through the real CLI entry, and the checkpoint's recorded template as the default.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from megatron_solo.format.chat_template import Image, Turn, render, token_ids

SYSTEM = "Answer briefly."
HF_CONV = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is in the picture?"}]},
    {"role": "assistant", "content": "A woman in uniform."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "And in this one"}, {"type": "image"}, {"type": "text", "text": "?"}],
    },
    {"role": "assistant", "content": "A blue box."},
]
LLAVA_CONV = [
    {"from": "system", "value": SYSTEM},
    {"from": "human", "value": "<image>\nWhat is in the picture?"},
    {"from": "gpt", "value": "A woman in uniform."},
    {"from": "human", "value": "And in this one<image>?"},
    {"from": "gpt", "value": "A blue box."},
]


@pytest.fixture(scope="module")
def hf(tiny_solo):
    from megatron_solo.generate import load

    model, processor = load(tiny_solo.hf)
    return model, processor


def _turns(images):
    return [
        Turn.of("system", SYSTEM),
        Turn.of("user", Image(images[0]), "\nWhat is in the picture?"),
        Turn.of("assistant", "A woman in uniform."),
        Turn.of("user", "And in this one", Image(images[1]), "?"),
        Turn.of("assistant", "A blue box."),
    ]


def _reference(tokenizer, turns, template, add_generation_prompt):
    """ids/targets/patches straight from megatron_solo.format: the renderer + the image layout + patchify."""
    from megatron_solo.format.image import load_and_resize
    from megatron_solo.format.layout import grid_shape, image_tokens, patchify

    patches = []

    def image_ids(ref):
        pixels = load_and_resize(str(ref))
        patches.append(patchify(pixels))
        return image_tokens(tokenizer, *grid_shape(pixels)).token_ids.tolist()

    rendered = render(turns, template, "assistant", add_generation_prompt)
    ids, targets = token_ids(rendered, tokenizer.encode, image_ids, tokenizer.bos_id, tokenizer.eos_id,
                             add_eos=not add_generation_prompt)  # fmt: skip
    return ids, targets, np.concatenate(patches), rendered


def _shard_document(tmp_path, tokenizer, rendered):
    """The document the C++ ShardBuilder stores for the rendered segments (text encoded per segment, the inner
    EOS a one-token item, images as resized pixels, one target flag per segment), read back with the shard reader:
    (ids, targets, patches)."""
    from megatron_solo import _C
    from megatron_solo.data.shards import Shard
    from megatron_solo.format.image import load_and_resize
    from megatron_solo.format.schema import TokenIds

    items = []
    for s in rendered.segments:
        if s.kind == "text":
            items.append(np.asarray(tokenizer.encode(s.text), np.int32))
        elif s.kind == "eos":
            items.append(np.asarray([tokenizer.eos_id], np.int32))
        else:
            items.append(load_and_resize(str(s.image)))
    builder = _C.ShardBuilder(str(tmp_path / "shard_00000"), 512, TokenIds.from_tokenizer(tokenizer).as_dict())
    flags = [int(s.target and s.kind != "image") for s in rendered.segments]  # an image is never a target
    builder.add_document("conv0", items, targets=flags, eos_target=rendered.eos_target)
    builder.finish()
    pack = Shard(tmp_path / "shard_00000")[0]
    n = pack.cu_seqlens[1]
    return pack.tokens[:n].tolist(), pack.targets[:n].tolist(), pack.patches


def _first_forward_ids(model):
    seen = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append((kwargs["input_ids"].clone(), kwargs["patches"].clone()))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("template", ["mistral", "plain"])
def test_processor_renderer_shard_and_generate_ids_are_identical(hf, tiny_solo, tmp_path, template):
    from megatron_solo.generate import Sampling, chat

    model, processor = hf
    tok = processor.tokenizer
    images = [str(tiny_solo.images[0]), str(tiny_solo.images[1])]
    want_ids, want_targets, want_patches, rendered = _reference(tok, _turns(images), template, False)
    assert sum(s.kind == "image" for s in rendered.segments) == 2

    got = processor.apply_chat_template(HF_CONV, images=images, template=template, return_targets=True)
    assert got["input_ids"][0].tolist() == want_ids and got["targets"][0].tolist() == want_targets
    assert torch.equal(got["patches"], torch.from_numpy(want_patches))
    llava = processor.apply_chat_template(LLAVA_CONV, images=images, template=template, return_targets=True)
    assert llava["input_ids"][0].tolist() == want_ids and llava["targets"][0].tolist() == want_targets
    # Targets: exactly the two answers (and, for mistral, the EOS closing each), nothing from system/user/images.
    answer_ids = [t for t, m in zip(want_ids, want_targets) if m and t != tok.eos_id]
    lead = " " if template == "mistral" else ""  # mistral renders an answer as " " + answer
    assert answer_ids == tok.encode(lead + "A woman in uniform.") + tok.encode(lead + "A blue box.")
    n_eos_targets = sum(m for t, m in zip(want_ids, want_targets) if t == tok.eos_id)
    assert n_eos_targets == (2 if template == "mistral" else 1)  # mistral: each answer's EOS; plain: the final one

    shard_ids, shard_targets, shard_patches = _shard_document(tmp_path, tok, rendered)
    assert shard_ids == want_ids and np.array_equal(shard_patches, want_patches)
    assert shard_targets == want_targets  # the stored targets (format v2) are the processor's

    # generate: the prompt (the conversation up to the last user turn) as the model's first forward sees it.
    prompt_ids, _, prompt_patches, _ = _reference(tok, _turns(images)[:-1], template, True)
    seen, handle = _first_forward_ids(model)
    try:
        chat(model, processor, [HF_CONV[:-1]], template, Sampling(max_new_tokens=2), images=[images])
    finally:
        handle.remove()
    assert seen[0][0][0].tolist() == prompt_ids and torch.equal(seen[0][1], torch.from_numpy(prompt_patches))
    if template == "mistral":  # the stored document starts with exactly the prompt generate feeds
        assert want_ids[: len(prompt_ids)] == prompt_ids


def test_plain_prompt_is_the_plain_template_of_one_user_turn(hf, tiny_solo):
    _, processor = hf
    image = str(tiny_solo.images[2])
    a = processor(text="a photo <image> of the sea", images=[image])
    b = processor.apply_chat_template([{"role": "user", "content": "a photo <image> of the sea"}], images=[image],
                                      template="plain", add_generation_prompt=True)  # fmt: skip
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["patches"], b["patches"])


def test_processor_errors_are_clear(hf, tiny_solo):
    _, processor = hf
    with pytest.raises(ValueError, match="places more images than the 0 given"):
        processor.apply_chat_template(HF_CONV)
    with pytest.raises(ValueError, match="unknown chat template 'llama'"):
        processor.apply_chat_template(LLAVA_CONV, images=list(tiny_solo.images[:2]), template="llama")
    with pytest.raises(ValueError, match="returns ids only"):
        processor.apply_chat_template(LLAVA_CONV, tokenize=False)
    two = list(tiny_solo.images[:2])
    with pytest.raises(ValueError, match="conversation 1: the conversation places more images than the 1 given"):
        processor.apply_chat_template([LLAVA_CONV, LLAVA_CONV], images=[two, two[:1]])
    with pytest.raises(ValueError, match="3 image.s. given but the conversation places 2"):
        processor.apply_chat_template(LLAVA_CONV, images=list(tiny_solo.images))


def _convs(tiny_solo):
    photo, box, noise = (str(p) for p in tiny_solo.images)
    return [
        [Turn.of("user", Image(photo), "Who is this?")],
        [Turn.of("user", "hello there, how are you today?")],
        [Turn.of("user", "Compare", Image(noise), "and", Image(box)), Turn.of("assistant", "x"), Turn.of("user", "?")],
    ]


def test_batched_left_padded_generation_equals_one_by_one(hf, tiny_solo):
    from megatron_solo.generate import Sampling, chat

    model, processor = hf
    convs = _convs(tiny_solo)
    for template in ("mistral", "plain"):
        batch = chat(model, processor, convs, template, Sampling(max_new_tokens=6))
        alone = [chat(model, processor, [c], template, Sampling(max_new_tokens=6)).ids[0] for c in convs]
        assert batch.ids == alone and all(len(i) == 6 for i in alone)
        assert batch.new_tokens == 18 and batch.seconds > 0


def test_generation_stops_at_eos_per_row(tiny_solo):
    """Make EOS the greedy choice wherever token T was (T: row 0's third token; T's own row zeroed): each row must
    end at its first T, as EOS, while the other rows of the batch go on."""
    from megatron_solo.generate import Sampling, chat, load

    model, processor = load(tiny_solo.hf)
    convs, eos = _convs(tiny_solo), processor.tokenizer.eos_id
    before = chat(model, processor, convs, "mistral", Sampling(max_new_tokens=8)).ids
    t = before[0][2]
    assert t != eos and t not in before[0][:2] and eos not in sum(before, [])
    with torch.no_grad():
        w = model.lm_head.weight
        w[eos] = w[t]
        w[t] = 0
    after = chat(model, processor, convs, "mistral", Sampling(max_new_tokens=8))
    want = [row[: row.index(t)] + [eos] if t in row else row for row in before]
    assert after.ids == want and len(after.ids[0]) == 3
    assert any(len(r) == 8 for r in after.ids), "another row keeps generating past row 0's EOS"
    assert after.texts[0] == processor.decode(before[0][:2])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_cli_jsonl_batches_in_input_order(hf, tiny_solo, tmp_path, capsys):
    from megatron_solo.generate import Sampling, chat, main

    model, processor = hf
    shutil.copy(tiny_solo.images[0], tmp_path / "photo.png")
    rows = [
        {"id": "llava", "image": "photo.png", "conversations": [
            {"from": "human", "value": "<image>\nWho is this?"}, {"from": "gpt", "value": "Grace Hopper."}]},
        {"id": "hf", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Look:"}, {"type": "image", "image": "photo.png"}]}]},
        {"messages": [{"role": "user", "content": "just text"}]},
    ]  # fmt: skip
    inp, out = _write_jsonl(tmp_path / "prompts.jsonl", rows), tmp_path / "answers.jsonl"
    args = ["--checkpoint", str(tiny_solo.hf), "--input", str(inp), "--output", str(out), "--batch-size", "2",
            "--template", "mistral", "--max-new-tokens", "5"]  # fmt: skip
    assert main(args) == 0
    assert "tokens/s" in capsys.readouterr().err
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == ["llava", "hf", "2"] and got[0]["reference"] == "Grace Hopper."
    photo = str(tmp_path / "photo.png")
    expect = [
        [Turn.of("user", Image(photo), "\nWho is this?")],
        [Turn.of("user", "Look:", Image(photo))],
        [Turn.of("user", "just text")],
    ]
    for g, turns in zip(got, expect):
        ref = chat(model, processor, [turns], "mistral", Sampling(max_new_tokens=5))
        assert g["answer"] == ref.texts[0] and g["num_tokens"] == len(ref.ids[0]) <= 5

    _write_jsonl(inp, [rows[0], {"id": "x", "conversations": [{"from": "gpt", "value": "no question"}]}])
    out.unlink()
    assert main(args) == 1
    assert "prompts.jsonl:2: the conversation must end with a user turn" in capsys.readouterr().err
    assert not out.exists(), "no answers file from a run that failed"
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _write_jsonl(inp, [rows[2], {"id": "b", "image": "broken.png", "conversations": rows[0]["conversations"][:1]}])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "prompts.jsonl:1 .. " in err and "prompts.jsonl:2: " in err and "broken.png" in err, err[-1500:]
    assert not out.exists() and not list(tmp_path.glob("answers.jsonl*")), "no answers file, no temp file left"


def test_chat_cli_keeps_the_history(hf, tiny_solo, monkeypatch, capsys):
    from megatron_solo.generate import Sampling, chat, main

    model, processor = hf
    photo = str(tiny_solo.images[0])
    lines = f"/image {photo}\nWhat is it?\n/image /no/such.png\nAnd now?\n/exit\nnever read\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    args = ["--checkpoint", str(tiny_solo.hf), "--chat", "--template", "mistral", "--max-new-tokens", "4"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "no such image file" in captured.err and "tokens/s" in captured.err
    s = Sampling(max_new_tokens=4)
    first = [Turn.of("user", Image(photo), "What is it?")]
    a1 = chat(model, processor, [first], "mistral", s).texts[0]
    second = [*first, Turn.of("assistant", a1), Turn.of("user", "And now?")]
    a2 = chat(model, processor, [second], "mistral", s).texts[0]
    assert captured.out == f"{a1}\n{a2}\n"  # one printed answer per message (the model may emit line breaks)


def test_recorded_template_is_the_default(tiny_solo, tmp_path):
    """An instruction-tuned checkpoint records its template (solo_config.json ``chat_template``); the export carries
    it to config.json ``solo_chat_template``; the processor and generate default to it; otherwise plain."""
    from megatron_solo.convert.export_hf import export_hf
    from megatron_solo.generate import load, recorded_template

    assert recorded_template(tiny_solo.hf) is None and recorded_template(tiny_solo.solo) is None
    sft = tmp_path / "sft"
    shutil.copytree(tiny_solo.solo, sft)
    for cfg_file in sft.glob("iter_*/solo_config.json"):
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "chat_template": "mistral"}))
    assert recorded_template(sft) == "mistral"
    export_hf(sft, tmp_path / "sft_hf")
    assert json.loads((tmp_path / "sft_hf" / "config.json").read_text())["solo_chat_template"] == "mistral"
    for path in (sft, tmp_path / "sft_hf"):
        _, processor = load(path)
        assert processor.default_template == "mistral"
        a = processor.apply_chat_template(LLAVA_CONV, images=list(tiny_solo.images[:2]))
        b = processor.apply_chat_template(LLAVA_CONV, images=list(tiny_solo.images[:2]), template="mistral")
        assert torch.equal(a["input_ids"], b["input_ids"])
    _, plain = load(tiny_solo.hf)
    assert plain.default_template == "plain"
