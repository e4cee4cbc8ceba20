"""SOLO vision special tokens and the SentencePiece tokenizer wrapper.

The vision tokens are appended to the SentencePiece ModelProto itself (as USER_DEFINED pieces, in the released
SOLO order), so a 32000-piece model gets ids 32000..32004; optional ``<loc_1>``..``<loc_1024>`` follow.

CLI::

    python -m megatron_solo.format.tokens extend --input tokenizer.model --output solo.model [--loc-tokens]
    python -m megatron_solo.format.tokens train --input corpus.txt --output m.model --vocab-size 1000 [--extend]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

VISION_TOKEN = "<vision>"
VPATCH_TOKEN = "<vpatch>"
ROW_SEP_TOKEN = "<vrow_sep>"
FRAME_SEP_TOKEN = "<vframe_sep>"
VISION_END_TOKEN = "</vision>"
# role -> token, in the released SOLO order: ids V..V+4 on a V-piece model. The role names are the tokenizer's
# ``{role}_id`` attributes, the keys of an HF config's ``vision_token_ids`` and (but frame_sep) of schema.TokenIds.
VISION_TOKEN_ROLES: dict[str, str] = {
    "vision": VISION_TOKEN,
    "vpatch": VPATCH_TOKEN,
    "row_sep": ROW_SEP_TOKEN,
    "frame_sep": FRAME_SEP_TOKEN,
    "vision_end": VISION_END_TOKEN,
}
VISION_TOKENS: tuple[str, ...] = tuple(VISION_TOKEN_ROLES.values())
NUM_LOC_TOKENS = 1024
LOC_TOKENS: tuple[str, ...] = tuple(f"<loc_{k}>" for k in range(1, NUM_LOC_TOKENS + 1))

_USER_DEFINED = sp_pb2.ModelProto.SentencePiece.USER_DEFINED
_CONTROL = sp_pb2.ModelProto.SentencePiece.CONTROL

PathLike = str | os.PathLike


class TokenizerError(ValueError):
    """A tokenizer file cannot be used or extended as asked."""


def appended_vision_ids(base_vocab: int) -> dict[str, int]:
    """role -> id of the SOLO tokens once :func:`extend_proto` has appended them to a ``base_vocab``-piece model."""
    return {role: base_vocab + k for k, role in enumerate(VISION_TOKEN_ROLES)}


def _load_proto(path: PathLike) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(path).read_bytes())
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer model {str(path)!r} does not exist") from None
    except Exception as e:  # protobuf DecodeError and friends
        raise TokenizerError(f"{str(path)!r} is not a SentencePiece model: {e}") from e
    if len(proto.pieces) == 0:
        raise TokenizerError(f"{str(path)!r} is not a SentencePiece model (no pieces)")
    return proto


def _atomic_write(path: PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def extend_proto(proto: sp_pb2.ModelProto, with_loc_tokens: bool = False, source: str = "<proto>") -> None:
    """Append the SOLO tokens to ``proto`` in place. Refuses a model that already holds any of them."""
    wanted = VISION_TOKENS + (LOC_TOKENS if with_loc_tokens else ())
    existing = {p.piece: i for i, p in enumerate(proto.pieces)}
    clash = [t for t in VISION_TOKENS + LOC_TOKENS if t in existing]
    if clash:
        raise TokenizerError(
            f"{source} already contains SOLO special token(s) {clash[:3]} (e.g. {clash[0]!r} at id "
            f"{existing[clash[0]]}); refusing to extend a tokenizer twice"
        )
    for token in wanted:
        piece = proto.pieces.add()
        piece.piece = token
        piece.score = 0.0
        piece.type = _USER_DEFINED


def extend_tokenizer(in_path: PathLike, out_path: PathLike, with_loc_tokens: bool = False) -> SoloTokenizer:
    """Write ``in_path`` + the SOLO special tokens to ``out_path`` (atomically) and return it loaded.

    Raises TokenizerError if ``in_path`` already holds any SOLO token (no double extension).
    """
    proto = _load_proto(in_path)
    base = len(proto.pieces)
    extend_proto(proto, with_loc_tokens, source=f"tokenizer {str(in_path)!r}")
    data = proto.SerializeToString()
    # Check the result loads and ids are where the format says, before anything is written.
    sp = spm.SentencePieceProcessor(model_proto=data)
    for role, want in appended_vision_ids(base).items():
        token = VISION_TOKEN_ROLES[role]
        if sp.piece_to_id(token) != want:
            got = sp.piece_to_id(token)
            raise TokenizerError(f"extending {str(in_path)!r}: {token!r} got id {got}, not {want}")
    _atomic_write(out_path, data)
    return SoloTokenizer(out_path)


def _iter_lines(text_paths: Sequence[PathLike]) -> Iterator[str]:
    for path in text_paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    yield line


def train_sentencepiece(
    text_paths: PathLike | Sequence[PathLike],
    out_path: PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    extend: bool = False,
    with_loc_tokens: bool = False,
) -> Path:
    """Train a small Mistral-like SentencePiece model (unk=0, bos=1, eos=2, no pad, byte fallback) on text files.

    Deterministic: single thread, no sampling/shuffling, and the input is streamed (no file paths end up in the
    model), so the same text gives the same bytes. With ``extend=True`` the SOLO tokens are appended too.
    Needs ``vocab_size`` >= 300 or so (256 byte pieces + specials + a few merges).
    """
    if isinstance(text_paths, (str, os.PathLike)):
        text_paths = [text_paths]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_iter_lines(text_paths),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=16384,
        minloglevel=2,
    )
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    if extend:
        extend_proto(proto, with_loc_tokens, source="freshly trained model")
    _atomic_write(out_path, proto.SerializeToString())
    return Path(out_path)


class SoloTokenizer:
    """A SOLO-extended SentencePiece model.

    ``encode`` never produces vision-token ids, even when the text literally contains ``<vpatch>`` etc.: those ids
    are inserted by the image layout only (an id without its patch would corrupt a pack). ``<loc_k>`` strings in
    text DO encode to their ids (they are meant to appear in text). ``pad_id`` is the model's pad piece if it has
    one, else its unk id, else eos (padding is never attended to nor a target, so any real id serves).
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        data = self.path.read_bytes() if self.path.exists() else None
        if data is None:
            raise TokenizerError(f"tokenizer model {str(path)!r} does not exist")
        self.checksum: str = hashlib.sha256(data).hexdigest()
        proto = _load_proto(self.path)
        ids = {p.piece: i for i, p in enumerate(proto.pieces)}
        missing = [t for t in VISION_TOKENS if t not in ids]
        if missing:
            raise TokenizerError(
                f"tokenizer {str(path)!r} lacks SOLO token(s) {missing}; extend it first with "
                f"`python -m megatron_solo.format.tokens extend --input {path} --output <solo.model>`"
            )
        first = ids[VISION_TOKEN]
        if [ids[t] for t in VISION_TOKENS] != list(range(first, first + len(VISION_TOKENS))):
            raise TokenizerError(f"tokenizer {str(path)!r}: SOLO tokens are not consecutive in the released order")
        self._sp = spm.SentencePieceProcessor(model_proto=data)  # decode: vision ids print as their strings
        # Encode with the vision pieces made CONTROL: same ids, but never matched from raw text.
        for t in VISION_TOKENS:
            proto.pieces[ids[t]].type = _CONTROL
        self._sp_encode = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

        self.vocab_size: int = self._sp.get_piece_size()
        self.vision_id, self.vpatch_id, self.row_sep_id, self.frame_sep_id, self.vision_end_id = (
            ids[t] for t in VISION_TOKENS
        )
        self.first_special_id: int = first
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise TokenizerError(
                f"tokenizer {str(path)!r} has no BOS or EOS piece (bos={self.bos_id}, eos={self.eos_id})"
            )
        pad, unk = self._sp.pad_id(), self._sp.unk_id()
        self.pad_id: int = pad if pad >= 0 else unk if unk >= 0 else self.eos_id
        self.has_loc_tokens: bool = LOC_TOKENS[0] in ids
        self._loc_base = ids.get(LOC_TOKENS[0], -1)

    def vision_token_ids(self) -> dict[str, int]:
        """role -> id of the SOLO vision tokens (an exported HF config's ``vision_token_ids``)."""
        return {role: getattr(self, f"{role}_id") for role in VISION_TOKEN_ROLES}

    def encode(self, text: str) -> list[int]:
        """Text -> ids, without BOS/EOS."""
        return self._sp_encode.encode(text)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return self._sp_encode.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def loc_id(self, k: int) -> int:
        """Id of ``<loc_k>`` (1 <= k <= 1024); the model must have been extended with loc tokens."""
        if not self.has_loc_tokens:
            raise TokenizerError(f"tokenizer {str(self.path)!r} has no <loc_k> tokens (extend with --loc-tokens)")
        if not 1 <= k <= NUM_LOC_TOKENS:
            raise ValueError(f"loc index must be in 1..{NUM_LOC_TOKENS}, got {k}")
        return self._loc_base + k - 1

    def __repr__(self) -> str:
        return (
            f"SoloTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, first_special_id={self.first_special_id})"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_solo.format.tokens", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ext = sub.add_parser("extend", help="append the SOLO special tokens to an existing tokenizer.model")
    ext.add_argument("--input", required=True, help="SentencePiece .model to extend (e.g. Mistral's tokenizer.model)")
    ext.add_argument("--output", required=True, help="where to write the extended model")
    ext.add_argument("--loc-tokens", action="store_true", help="also append <loc_1>..<loc_1024>")
    tr = sub.add_parser("train", help="train a small SentencePiece model on text files (tests, demo)")
    tr.add_argument("--input", required=True, nargs="+", help="UTF-8 text file(s), one sentence/paragraph a line")
    tr.add_argument("--output", required=True)
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    tr.add_argument("--extend", action="store_true", help="append the SOLO special tokens too")
    tr.add_argument("--loc-tokens", action="store_true", help="with --extend: also append <loc_1>..<loc_1024>")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "extend":
            tok = extend_tokenizer(args.input, args.output, with_loc_tokens=args.loc_tokens)
        else:
            train_sentencepiece(
                args.input,
                args.output,
                args.vocab_size,
                args.model_type,
                extend=args.extend,
                with_loc_tokens=args.loc_tokens,
            )
            if not args.extend:
                sp = spm.SentencePieceProcessor(model_file=str(args.output))
                print(f"wrote {args.output}: {sp.get_piece_size()} pieces (not extended)")
                return 0
            tok = SoloTokenizer(args.output)
    except (TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {args.output}: vocab_size={tok.vocab_size} <vision>={tok.vision_id} <vpatch>={tok.vpatch_id} "
        f"<vrow_sep>={tok.row_sep_id} <vframe_sep>={tok.frame_sep_id} </vision>={tok.vision_end_id} "
        f"loc_tokens={tok.has_loc_tokens} sha256={tok.checksum[:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
