"""format/schema.py, the one owner of the shard schema: its values are the C++ writer's, the token-id table built
from a real tokenizer is what the builder writes into the sidecar and the reader parses back, and the places that
used to spell the table out (model/config.py, the HF classes) now take it from the owner."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_solo import _C
from megatron_solo.data.shards import Shard
from megatron_solo.format import schema
from megatron_solo.format.schema import TokenIds
from megatron_solo.format.tokens import VISION_TOKEN_ROLES, appended_vision_ids
from megatron_solo.preprocess import validate as validate_mod
from tests.test_tokens import base_model, solo_tok  # noqa: F401 (fixtures: a SentencePiece model trained here)


def test_values_come_from_the_writer():
    assert (schema.PATCH_SIZE, schema.PATCH_DIM) == (32, 3 * 32 * 32)
    assert schema.SHARD_FORMAT == "solo-shard" and schema.SHARD_FORMAT_VERSION == 2
    assert schema.SHARD_PARTS == ("tokens", "patches", "docs", "targets")
    assert schema.shard_parts(1) == ("tokens", "patches", "docs")
    assert schema.shard_files("d/s") == [
        f"d/s.{p}.{e}" for p in ("tokens", "patches", "docs", "targets") for e in ("bin", "idx")
    ] + ["d/s.json"]
    assert len(schema.shard_files("s", version=1)) == 7
    assert set(schema.SHARD_ENTRY_COUNTS) <= set(schema.COUNT_KEYS)
    assert set(validate_mod.TOTALS) <= set(schema.COUNT_KEYS)  # validate recomputes schema counts only
    with pytest.raises(ValueError, match="v3 is not readable"):
        schema.shard_parts(3)


def test_token_ids_from_a_tokenizer_round_trip_through_a_shard(solo_tok, tmp_path):  # noqa: F811
    ids = TokenIds.from_tokenizer(solo_tok)
    assert ids.vpatch == solo_tok.vpatch_id and ids.first_special == solo_tok.first_special_id
    assert ids.layout_ids == (solo_tok.vision_id, solo_tok.vpatch_id, solo_tok.row_sep_id, solo_tok.vision_end_id)
    b = _C.ShardBuilder(str(tmp_path / "s"), 64, ids.as_dict())
    b.add_document("a", [np.array(solo_tok.encode("a red square"), np.int32), np.zeros((32, 32, 3), np.uint8)])
    b.finish()
    assert json.loads((tmp_path / "s.json").read_text())["token_ids"] == ids.as_dict()
    assert Shard(tmp_path / "s").ids == ids
    with pytest.raises(ValueError, match=r"x\.json: token_ids lacks \['vpatch'\]"):
        TokenIds.from_dict({k: v for k, v in ids.as_dict().items() if k != "vpatch"}, "x.json")


def test_vision_roles_follow_the_released_order(solo_tok):  # noqa: F811
    from megatron_solo.model.config import FRAME_SEP_ID, VISION_ID, VPATCH_ID, SoloConfig

    assert appended_vision_ids(32000) == dict(
        vision=32000, vpatch=32001, row_sep=32002, frame_sep=32003, vision_end=32004
    )
    assert (VISION_ID, VPATCH_ID, FRAME_SEP_ID) == (32000, 32001, 32003)
    cfg = SoloConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
    assert (cfg.vocab_size, cfg.vpatch_id, cfg.first_special_id, cfg.patch_dim) == (32005, 32001, 32000, 3072)
    base = solo_tok.first_special_id
    assert solo_tok.vision_token_ids() == appended_vision_ids(base)
    assert list(VISION_TOKEN_ROLES.values()) == ["<vision>", "<vpatch>", "<vrow_sep>", "<vframe_sep>", "</vision>"]
    assert set(TokenIds.roles()) - {"bos", "eos", "pad", "first_special"} == set(VISION_TOKEN_ROLES) - {"frame_sep"}


def test_hf_config_has_no_solo_constants_of_its_own():
    """The shipped HF classes take the vision fields from config.json (written at export), not from defaults."""
    pytest.importorskip("transformers")
    from megatron_solo.convert.hf_remote.configuration_solo import SoloConfig as HFSoloConfig
    from megatron_solo.convert.hf_remote.modeling_solo import SoloForCausalLM

    bare = HFSoloConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1)
    assert bare.patch_dim is None and bare.patch_size is None and bare.vision_token_ids == {}
    with pytest.raises(ValueError, match="lacks .*patch_dim.*export_hf"):
        SoloForCausalLM(bare)
