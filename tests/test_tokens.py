"""SOLO special tokens, tokenizer extension (incl. refusal to extend twice) and the SoloTokenizer contract."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from megatron_solo.format import tokens
from megatron_solo.format.tokens import (
    LOC_TOKENS,
    VISION_TOKENS,
    SoloTokenizer,
    TokenizerError,
    extend_tokenizer,
    train_sentencepiece,
)

CORPUS = Path(tokens.__file__).resolve().parent.parent / "demo_data" / "corpus.txt"
VOCAB = 1000


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny Mistral-like SentencePiece model trained now on the corpus the repo ships."""
    return train_sentencepiece([CORPUS], tmp_path_factory.mktemp("sp") / "base.model", VOCAB)


@pytest.fixture(scope="module")
def solo_tok(base_model, tmp_path_factory) -> SoloTokenizer:
    return extend_tokenizer(base_model, tmp_path_factory.mktemp("sp") / "solo.model")


def test_released_order_and_names():
    assert VISION_TOKENS == ("<vision>", "<vpatch>", "<vrow_sep>", "<vframe_sep>", "</vision>")
    assert len(LOC_TOKENS) == 1024 and LOC_TOKENS[0] == "<loc_1>" and LOC_TOKENS[-1] == "<loc_1024>"


def test_special_ids_follow_the_base_vocab(base_model, solo_tok):
    assert spm.SentencePieceProcessor(model_file=str(base_model)).get_piece_size() == VOCAB
    t = solo_tok
    assert (t.vision_id, t.vpatch_id, t.row_sep_id, t.frame_sep_id, t.vision_end_id) == tuple(range(VOCAB, VOCAB + 5))
    assert t.first_special_id == VOCAB
    assert t.vocab_size == VOCAB + 5
    assert not t.has_loc_tokens
    for i, name in enumerate(VISION_TOKENS):
        assert t.id_to_piece(VOCAB + i) == name
    # Stored as USER_DEFINED pieces in the ModelProto itself.
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(t.path.read_bytes())
    assert [p.type for p in proto.pieces[VOCAB:]] == [sp_pb2.ModelProto.SentencePiece.USER_DEFINED] * 5


def test_32000_piece_model_gets_32000_to_32004(base_model, tmp_path):
    # A Mistral-sized piece table, built cheaply by padding the tiny model's proto with extra NORMAL pieces.
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(base_model.read_bytes())
    for k in range(32000 - len(proto.pieces)):
        p = proto.pieces.add()
        p.piece, p.score, p.type = f"zzfill{k}", -1000.0 - k, sp_pb2.ModelProto.SentencePiece.NORMAL
    big = tmp_path / "big.model"
    big.write_bytes(proto.SerializeToString())
    t = extend_tokenizer(big, tmp_path / "big_solo.model", with_loc_tokens=True)
    assert [t.vision_id, t.vpatch_id, t.row_sep_id, t.frame_sep_id, t.vision_end_id] == [
        32000,
        32001,
        32002,
        32003,
        32004,
    ]
    # Released SOLO-7B: <loc_1>..<loc_1024> = 32005..33028, vocab 33029.
    assert t.loc_id(1) == 32005 and t.loc_id(1024) == 33028 and t.vocab_size == 33029
    assert 32011 in t.encode("a <loc_7>")


def test_refuses_to_extend_twice(solo_tok, tmp_path):
    out = tmp_path / "twice.model"
    with pytest.raises(TokenizerError, match=r"twice") as err:
        extend_tokenizer(solo_tok.path, out)
    assert str(solo_tok.path) in str(err.value)
    assert not out.exists()
    with pytest.raises(TokenizerError, match=r"twice"):
        extend_tokenizer(solo_tok.path, out, with_loc_tokens=True)


def test_loc_tokens_follow_vision_tokens(base_model, tmp_path):
    t = extend_tokenizer(base_model, tmp_path / "loc.model", with_loc_tokens=True)
    assert t.vision_end_id == VOCAB + 4
    assert t.loc_id(1) == VOCAB + 5 and t.loc_id(1024) == VOCAB + 1028
    assert t.vocab_size == VOCAB + 5 + 1024
    ids = t.encode("a box <loc_12><loc_900> here")
    assert t.loc_id(12) in ids and t.loc_id(900) in ids
    with pytest.raises(ValueError):
        t.loc_id(1025)


def test_encode_decode_contract(solo_tok):
    t = solo_tok
    text = "A small red bicycle is standing next to a wooden fence at sunset."
    ids = t.encode(text)
    assert ids and t.bos_id not in ids and t.eos_id not in ids
    assert all(0 <= i < t.first_special_id for i in ids)
    assert t.decode(ids) == text
    assert (t.bos_id, t.eos_id) == (1, 2)
    assert t.pad_id == 0  # no pad piece in the model -> unk (documented choice)
    assert t.encode_batch([text, "two"]) == [ids, t.encode("two")]
    # Unseen characters still round-trip (byte fallback).
    assert t.decode(t.encode("naïve café ✓")) == "naïve café ✓"


def test_vision_token_strings_in_text_never_become_vision_ids(solo_tok):
    t = solo_tok
    text = "literal <vision><vpatch> and <vrow_sep> </vision> <vframe_sep>"
    ids = t.encode(text)
    assert not set(ids) & set(range(t.first_special_id, t.first_special_id + 5))
    assert t.decode(ids) == text
    # Inserted ids decode to their names (debugging aid).
    assert t.decode([t.vision_id, t.vpatch_id, t.vision_end_id]) == "<vision><vpatch></vision>"


def test_pad_piece_is_used_when_present(tmp_path):
    lines = tmp_path / "c.txt"
    lines.write_text("\n".join(CORPUS.read_text().splitlines()[:100]))
    buf = tmp_path / "pad.model"
    spm.SentencePieceTrainer.train(
        input=str(lines), model_prefix=str(tmp_path / "pad"), vocab_size=200, pad_id=3, minloglevel=2
    )
    t = extend_tokenizer(buf, tmp_path / "pad_solo.model")
    assert t.pad_id == 3


def test_checksum_is_sha256_of_file(solo_tok):
    assert solo_tok.checksum == hashlib.sha256(solo_tok.path.read_bytes()).hexdigest()


def test_training_is_deterministic(base_model, tmp_path):
    again = train_sentencepiece([CORPUS], tmp_path / "again.model", VOCAB)
    assert again.read_bytes() == base_model.read_bytes()


def test_unextended_or_broken_models_are_rejected(base_model, tmp_path):
    with pytest.raises(TokenizerError, match="extend it first"):
        SoloTokenizer(base_model)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00not a model at all" * 10)
    with pytest.raises(TokenizerError, match="junk.model"):
        SoloTokenizer(junk)
    with pytest.raises(TokenizerError, match="does not exist"):
        extend_tokenizer(tmp_path / "missing.model", tmp_path / "x.model")


def test_cli_extend_and_refuse(base_model, tmp_path, capsys):
    out = tmp_path / "cli.model"
    assert tokens.main(["extend", "--input", str(base_model), "--output", str(out), "--loc-tokens"]) == 0
    assert f"<vision>={VOCAB}" in capsys.readouterr().out
    assert SoloTokenizer(out).has_loc_tokens
    assert tokens.main(["extend", "--input", str(out), "--output", str(tmp_path / "again.model")]) == 1
    err = capsys.readouterr().err
    assert "refusing to extend a tokenizer twice" in err and str(out) in err


def test_cli_train_extend_as_module(tmp_path):
    out = tmp_path / "m.model"
    cmd = [sys.executable, "-m", "megatron_solo.format.tokens", "train", "--input", str(CORPUS)]
    cmd += ["--output", str(out), "--vocab-size", "500", "--extend"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr
    assert "<vision>=500" in res.stdout
    assert SoloTokenizer(out).vocab_size == 505
