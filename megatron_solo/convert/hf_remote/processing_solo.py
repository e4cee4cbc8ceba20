"""HF processor of SOLO: image(s) + text -> ``input_ids``, ``attention_mask``, ``patches`` (copied into HF dirs).

It does not re-implement the SOLO format. Image loading, the resize rule, patchify, the image token layout and the
tokenizer (vision pieces never produced from text) come from ``megatron_solo.format``, the ONE implementation the
shard builder uses (patchify / layout in C++), so an exported model sees exactly the token layout it was trained on.
The HF model and config files need only transformers + torch; this processor additionally needs the
``megatron_solo`` package installed (``pip install megatron-solo``; only its ``format`` part is imported).

A prompt is one document prefix as in training: ``[BOS] + items``, where items are text runs and images in order.
Images go where the text holds ``<image>``; without any ``<image>``, all images come first, then the text.

Conversations (``apply_chat_template``) are rendered by ``megatron_solo.format.chat_template``, the one module the
shard builder and ``megatron_solo.generate`` render through too, so the ids are those a shard holds for the same
conversation (``[BOS] + segments + [EOS]``; without the closing EOS for a generation prompt). A plain prompt
(``processor(text=..., images=...)``) is the ``plain`` template's rendering of one user turn.
"""

import io
import json
import os

import numpy as np
import torch

IMAGE_PLACEHOLDER = "<image>"


def _solo_format():
    try:
        from megatron_solo.format import chat_template, messages
        from megatron_solo.format import image as solo_image
        from megatron_solo.format import layout as solo_layout
        from megatron_solo.format import tokens as solo_tokens
    except ImportError as e:
        raise ImportError(
            "SoloProcessor needs the SOLO format rule from the megatron_solo package (patchify and the image token "
            f"layout live in its C++ extension; they are not duplicated here): pip install megatron-solo ({e})"
        ) from e
    return solo_image, solo_layout, solo_tokens, chat_template, messages


class SoloProcessor:
    """``processor(text=..., images=...)`` -> dict of ``input_ids`` [B, T], ``attention_mask`` [B, T] (left padded)
    and ``patches`` uint8 [P, patch_dim] (all patches of the batch, in the flattened order of the ``<vpatch>``
    tokens).

    ``default_template``: the chat template ``apply_chat_template`` uses when given none (``solo_chat_template`` in
    an exported config.json: the template the model was instruction-tuned with), else ``plain``."""

    def __init__(self, tokenizer_file: str, vision_token_ids: dict | None = None, default_template: str | None = None):
        solo_image, solo_layout, solo_tokens, self._chat, self._messages = _solo_format()
        self._image, self._layout = solo_image, solo_layout
        self.default_template = default_template or "plain"
        if self.default_template not in self._chat.TEMPLATES:
            raise ValueError(f"unknown chat template {self.default_template!r}; one of {self._chat.TEMPLATES}")
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
        config = {}
        config_file = os.path.join(path, "config.json")
        if os.path.exists(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        template = kwargs.get("default_template") or config.get("solo_chat_template")
        return cls(os.path.join(path, "tokenizer.model"), config.get("vision_token_ids"), template)

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

    def _image_ids(self, patches: list):
        """chat_template.token_ids' image callback: an image's ``<vision>`` layout ids; its patches go to
        ``patches`` (called in token order)."""

        def image_ids(ref) -> list[int]:
            pixels = self.image_to_pixels(ref)
            n_h, n_w = self._layout.grid_shape(pixels)
            patches.append(self._layout.patchify(pixels))
            return [int(t) for t in self._layout.image_tokens(self.tokenizer, n_h, n_w).token_ids]

        return image_ids

    def encode_turns(
        self, turns, template: str = "plain", loss_on: str = "assistant", add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int], list[np.ndarray]]:
        """Chat-template ``Turn`` list -> (ids, targets, per-image patch arrays in token order). The whole document
        ``[BOS] + segments + [EOS]``, or ``[BOS] + segments`` for a generation prompt."""
        rendered = self._chat.render(turns, template, loss_on, add_generation_prompt)
        patches: list[np.ndarray] = []
        tok = self.tokenizer
        ids, targets = self._chat.token_ids(
            rendered, tok.encode, self._image_ids(patches), tok.bos_id, tok.eos_id, add_eos=not add_generation_prompt
        )
        return ids, targets, patches

    def encode_prompt(self, text: str | None, images=()) -> tuple[list[int], list[np.ndarray]]:
        """One prompt -> (token ids, list of per-image uint8 patch arrays in token order)."""
        text = text or ""
        images = list(images or [])
        if IMAGE_PLACEHOLDER in text:
            parts = self._chat.place_images(text, images)
        else:
            parts = [*(self._chat.Image(i) for i in images), text]
        ids, _, patches = self.encode_turns([self._chat.Turn.of("user", *parts)], "plain", "text", True)
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
        return self._batch([(ids, None, ps) for ids, ps in encoded], return_tensors)

    def apply_chat_template(
        self,
        conversation,
        images=None,
        template: str | None = None,
        add_generation_prompt: bool = False,
        return_targets: bool = False,
        loss_on: str = "assistant",
        tokenize: bool = True,
        return_tensors: str = "pt",
        image_root: str | None = None,
        return_dict: bool = True,
    ) -> dict:
        """A conversation (or a list of them) -> the batch dict of ``__call__`` (+ ``targets`` [B, T] 0/1 where
        ``return_targets``), with the ids of ``megatron_solo.format.chat_template``.

        ``conversation``: HF messages (``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text":
        ...}]}, ...]``), LLaVA turns (``[{"from": "human", "value": "<image>\n..."}, ...]``) or ``Turn`` objects
        (megatron_solo.format.messages). ``images``: the images that ``{"type": "image"}`` parts and ``<image>``
        placeholders take in order (a list per conversation when batched); paths, bytes, PIL images or uint8
        arrays. ``template``: ``plain`` / ``mistral`` (default ``self.default_template``). ``add_generation_prompt``:
        the conversation ends with a user turn and the ids stop where the assistant's answer begins (no closing
        EOS): what ``generate`` feeds the model. Otherwise the whole document with its closing EOS, as a shard stores
        it; ``targets`` then follow ``loss_on`` (``assistant``, ``last`` or ``text``).
        """
        if not tokenize or not return_dict:
            raise ValueError(
                "SoloProcessor.apply_chat_template returns ids only (tokenize=True, return_dict=True): each segment "
                "of a conversation is encoded on its own, so a rendered string encoded again would not give the ids "
                "the model was trained on"
            )
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        if images is None:
            image_lists = [[] for _ in conversations]
        else:
            image_lists = [list(i) for i in images] if batched else [list(images)]
        if len(image_lists) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(image_lists)} image lists")
        template = template or self.default_template
        encoded = []
        for k, (conv, ims) in enumerate(zip(conversations, image_lists)):
            try:
                turns = self._messages.to_turns(conv, ims, image_root)
                encoded.append(self.encode_turns(turns, template, loss_on, add_generation_prompt))
            except self._chat.TemplateError as e:
                raise ValueError(f"conversation {k}: {e}" if batched else str(e)) from None
        return self._batch(encoded if return_targets else [(i, None, p) for i, _, p in encoded], return_tensors)

    def _batch(self, encoded: list, return_tensors) -> dict:
        """[(ids, targets or None, patches)] -> left-padded tensors (left padding: for generation)."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        width = max(len(ids) for ids, _, _ in encoded)
        pad = self.tokenizer.pad_id
        input_ids = [[pad] * (width - len(ids)) + ids for ids, _, _ in encoded]
        mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in encoded]
        all_patches = [p for _, _, ps in encoded for p in ps]
        patches = np.concatenate(all_patches) if all_patches else np.zeros((0, self._layout.PATCH_DIM), np.uint8)
        out = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "patches": torch.from_numpy(np.ascontiguousarray(patches)),
        }
        if encoded[0][1] is not None:
            out["targets"] = torch.tensor([[0] * (width - len(t)) + t for _, t, _ in encoded], dtype=torch.long)
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            tok = self.tokenizer
            special = {tok.bos_id, tok.eos_id, tok.pad_id}
            ids = [i for i in ids if i not in special and not tok.vision_id <= i <= tok.vision_end_id]
        return self.tokenizer.decode(ids)

    def batch_decode(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]
