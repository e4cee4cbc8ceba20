"""The SOLO input format: tokenizer + special tokens (tokens), image loading + resize rule (image),
patchify + token layout (layout, a typed face of the C++ rule in megatron_solo._C)."""
