"""HF processor of SOLO: image(s) + text -> ``input_ids``, ``attention_mask``, ``patches`` (copied into HF dirs).

It does not re-implement the SOLO format. Image loading, the resize rule, patchify, the image token layout and the
tokenizer (vision pieces never produced from text) come from ``megatron_solo.format``, the ONE implementation the
shard builder uses (patchify / layout in C++), so an exported model sees exactly the token layout it was trained on.
The HF model and config files need only transformers + torch; this processor additionally needs the
``megatron_solo`` package installed (``pip install megatron-solo``; only its ``format`` part is imported).

A prompt is one document prefix as in training: ``[BOS] + items``, where items are text runs and images in order.
Images go where the text holds ``<image>``; without any ``<image>``, all images come first, then the text.
"""

import io
import json
import os

import numpy as np
import torch

IMAGE_PLACEHOLDER = "<image>"


def _solo_format():
    try:
        from megatron_solo.format import image as solo_image
        from megatron_solo.format import layout as solo_layout
        from megatron_solo.format import tokens as solo_tokens
    except ImportError as e:
        raise ImportError(
            "SoloProcessor needs the SOLO format rule from the megatron_solo package (patchify and the image token "
            f"layout live in its C++ extension; they are not duplicated here): pip install megatron-solo ({e})"
        ) from e
    return solo_image, solo_layout, solo_tokens


class SoloProcessor:
    """``processor(text=..., images=...)`` -> dict of ``input_ids`` [B, T], ``attention_mask`` [B, T] (left padded)
    and ``patches`` uint8 [P, patch_dim] (all patches of the batch, in the flattened order of the ``<vpatch>``
    tokens)."""

    def __init__(self, tokenizer_file: str, vision_token_ids: dict | None = None):
        solo_image, solo_layout, solo_tokens = _solo_format()
        self._image, self._layout = solo_image, solo_layout
        self.tokenizer = solo_tokens.SoloTokenizer(tokenizer_file)
        if vision_token_ids:
            ours = self.tokenizer.vision_token_ids()
            wrong = {k: (v, ours.get(k)) for k, v in vision_token_ids.items() if ours.get(k) != v}
            if wrong:
                raise ValueError(f"{tokenizer_file}: vision token ids disagree with the model config: {wrong}")

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        path = str(path)
        if not os.path.isdir(path):
            raise ValueError(f"SoloProcessor.from_pretrained expects a local exported SOLO directory, got {path!r}")
        vision_ids = None
        config_file = os.path.join(path, "config.json")
        if os.path.exists(config_file):
            with open(config_file, encoding="utf-8") as f:
                vision_ids = json.load(f).get("vision_token_ids")
        return cls(os.path.join(path, "tokenizer.model"), vision_ids)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Already registered through ``auto_map`` in config.json; nothing to do."""

    # ---- building one prompt -------------------------------------------------------------------------------------
    def image_to_pixels(self, image) -> np.ndarray:
        """Path / bytes / data URL / PIL image / uint8[H, W, 3] -> the resized uint8[H', W', 3] the model sees."""
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"an array image must be uint8[H, W, 3], got {image.dtype}{list(image.shape)}")
            return self._image.resize_for_solo(np.ascontiguousarray(image))
        if hasattr(image, "save") and hasattr(image, "mode"):  # a PIL image: same conversion rule as files
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            image = buf.getvalue()
        return self._image.resize_for_solo(self._image.load_image(image))

    def encode_prompt(self, text: str | None, images=()) -> tuple[list[int], list[np.ndarray]]:
        """One prompt -> (token ids, list of per-image uint8 patch arrays in token order)."""
        text = text or ""
        images = list(images or [])
        n_slots = text.count(IMAGE_PLACEHOLDER)
        if n_slots and n_slots != len(images):
            raise ValueError(f"text has {n_slots} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s)")
        pieces = text.split(IMAGE_PLACEHOLDER) if n_slots else [""] * len(images) + [text]
        ids, patches = [self.tokenizer.bos_id], []
        for k, piece in enumerate(pieces):
            if piece:
                ids += self.tokenizer.encode(piece)
            if k < len(images):
                pixels = self.image_to_pixels(images[k])
                n_h, n_w = self._layout.grid_shape(pixels)
                ids += [int(t) for t in self._layout.image_tokens(self.tokenizer, n_h, n_w).token_ids]
                patches.append(self._layout.patchify(pixels))
        return ids, patches

    def __call__(self, text=None, images=None, return_tensors="pt", **kwargs):
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        if images is None:
            image_lists = [[] for _ in texts]
        elif batched:
            image_lists = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        else:
            image_lists = [list(images) if isinstance(images, (list, tuple)) else [images]]
        if len(image_lists) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(image_lists)} image lists")
        encoded = [self.encode_prompt(t, ims) for t, ims in zip(texts, image_lists)]
        width = max(len(ids) for ids, _ in encoded)
        pad = self.tokenizer.pad_id
        input_ids = [[pad] * (width - len(ids)) + ids for ids, _ in encoded]  # left padding, for generation
        mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in encoded]
        all_patches = [p for _, ps in encoded for p in ps]
        patches = np.concatenate(all_patches) if all_patches else np.zeros((0, self._layout.PATCH_DIM), np.uint8)
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "patches": torch.from_numpy(np.ascontiguousarray(patches)),
        }

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            tok = self.tokenizer
            special = {tok.bos_id, tok.eos_id, tok.pad_id}
            ids = [i for i in ids if i not in special and not tok.vision_id <= i <= tok.vision_end_id]
        return self.tokenizer.decode(ids)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]
