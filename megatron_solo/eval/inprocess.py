"""Greedy generation with the trainer's own Megatron model, in process: the ``model_fn`` of evaluation during
training (``--eval-tasks``), at any TP x DP, no export.

Why our own small loop and not megatron.core's inference engines: ``StaticInferenceEngine`` runs
``DynamicInferenceEngine`` underneath (CUDA graphs, its tokenizer and request objects), and its model wrappers call
``model(tokens, position_ids, attention_mask, ...)``: SoloModel's merged patch embedding needs the patches of the
``<vpatch>`` tokens in each forward. What megatron.core provides and fits is used: ``StaticInferenceContext`` (the
KV cache every attention layer fills, RoPE at the cache offset) and ``set_model_to_sequence_parallel`` (megatron's
own inference runs without sequence parallelism: a one-token decode step cannot be split over TP ranks).

Decoding is megatron's static-batching scheme: prompts right-aligned to position 0 (no padding inside a row, so
positions and RoPE are those of training), the batch advances in lock step from the shortest prompt; a row still
inside its prompt takes its prompt token, the others their argmax. The vision special tokens are never generated
(the export's generation config suppresses the same five), a row stops at EOS. Every TP rank of a model replica runs
the same forward (TP collectives inside); the chosen tokens are broadcast from TP rank 0 so the ranks stay in lock
step. Prompts are split over the DP replicas and the answers all-gathered, so every rank returns all answers.

Prompt ids come from the HF processor's ``encode_turns`` (``megatron_solo.format.chat_template``): the ids
``megatron_solo.evaluate`` feeds the exported model, so the two score the same conversations the same way.
Pipeline parallelism is not supported here (the trainer refuses ``--eval-tasks`` with PP > 1 at setup).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_solo.format.chat_template import Turn


@dataclass
class Prompt:
    """One generation prompt: ``[BOS] + segments`` ids and the patches of its ``<vpatch>`` tokens, in order."""

    ids: list[int]
    patches: np.ndarray  # uint8 [P, patch_dim]

    def patches_before(self, vpatch_id: int) -> np.ndarray:
        """int [len(ids) + 1]: how many ``<vpatch>`` tokens precede each position (the patch cursor)."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.ids) == vpatch_id)])


def _unwrap(model):
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


class GreedyGenerator:
    """Greedy decoding over one (unwrapped or DDP-wrapped) SoloModel on this rank's TP group."""

    def __init__(self, model, eos_id: int, suppress_ids: Sequence[int], max_new_tokens: int = 16):
        self.model = model
        self.solo = _unwrap(model)
        if not (self.solo.pre_process and self.solo.post_process):
            raise ValueError("in-process generation needs the whole model on every rank (no pipeline stages)")
        self.eos_id, self.suppress = eos_id, sorted(set(suppress_ids))
        self.max_new_tokens = max_new_tokens

    def _forward(self, tokens: torch.Tensor, patches: torch.Tensor, context) -> torch.Tensor:
        """One forward of ``tokens [b, s]`` at the cache offset -> fp32 logits of the last position [b, V_pad]."""
        offset = context.sequence_len_offset
        b, s = tokens.shape
        positions = torch.arange(offset, offset + s, device=tokens.device).expand(b, s)
        logits = self.model(tokens, positions, patches, inference_context=context, runtime_gather_output=True)
        context.increment_sequence_len_offset(s)
        return logits[:, -1].float()

    def generate(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """New ids per prompt (up to and including EOS, at most ``max_new_tokens``)."""
        if not prompts:
            return []
        from megatron.core import parallel_state as ps
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.transformer.utils import set_model_to_sequence_parallel

        device = next(self.solo.parameters()).device
        vpatch = self.solo.config.vpatch_id
        lengths = [len(p.ids) for p in prompts]
        width = max(lengths) + self.max_new_tokens
        b = len(prompts)
        grid = torch.full((b, width), self.eos_id, dtype=torch.long)
        for k, p in enumerate(prompts):
            grid[k, : len(p.ids)] = torch.tensor(p.ids)
        cursors = [p.patches_before(vpatch) for p in prompts]

        def patches(start: int, end: int) -> torch.Tensor:  # row-major, as SoloModel.embed wants them
            rows = [p.patches[c[min(start, len(p.ids))] : c[min(end, len(p.ids))]] for p, c in zip(prompts, cursors)]
            return torch.from_numpy(np.concatenate(rows)).to(device)

        sequence_parallel = self.solo.config.sequence_parallel
        if sequence_parallel:
            set_model_to_sequence_parallel(self.solo.language_model, False)  # config flag too
        was_training = self.solo.training
        self.model.eval()
        try:
            context = StaticInferenceContext(b, width)
            out: list[list[int]] = [[] for _ in prompts]
            done = [False] * b
            pos = min(lengths)  # the first position to predict
            tp_src, tp_group = ps.get_tensor_model_parallel_src_rank(), ps.get_tensor_model_parallel_group()
            with torch.no_grad():
                logits = self._forward(grid[:, :pos].to(device), patches(0, pos), context)
                context.enable_decode_mode()
                while True:
                    if self.suppress:
                        logits[:, self.suppress] = float("-inf")
                    chosen = logits.argmax(dim=-1).cpu()
                    if dist.get_world_size(tp_group) > 1:  # identical on every TP rank; broadcast keeps lock step
                        chosen = chosen.to(device)
                        dist.broadcast(chosen, tp_src, group=tp_group)
                        chosen = chosen.cpu()
                    for k in range(b):
                        if pos < lengths[k] or done[k]:
                            continue
                        token = int(chosen[k])
                        grid[k, pos] = token
                        out[k].append(token)
                        done[k] = token == self.eos_id or len(out[k]) >= self.max_new_tokens
                    if all(done) or pos + 1 >= width:
                        break
                    logits = self._forward(grid[:, pos : pos + 1].to(device), patches(pos, pos + 1), context)
                    pos += 1
        finally:
            if sequence_parallel:
                set_model_to_sequence_parallel(self.solo.language_model, True)
            if was_training:
                self.model.train()
        return out


class MegatronModelFn:
    """``model_fn(list[list[Turn]]) -> list[str]`` (eval/tasks.py) over the trainer's model: prompts rendered with
    ``template`` by the HF processor, split over the DP replicas, decoded greedily, all-gathered; answers stripped
    (as ``megatron_solo.evaluate`` strips them). Call it on every rank with the same conversations."""

    def __init__(self, model, tokenizer_model: str, template: str = "plain", max_new_tokens: int = 16):
        from megatron_solo.convert.hf_remote.processing_solo import SoloProcessor

        self.processor = SoloProcessor(str(tokenizer_model), default_template=template)
        self.template = template
        tok = self.processor.tokenizer
        self.generator = GreedyGenerator(model, tok.eos_id, tok.vision_token_ids().values(), max_new_tokens)
        self.new_tokens, self.seconds = 0, 0.0

    def prompt(self, turns: list[Turn]) -> Prompt:
        ids, _, patches = self.processor.encode_turns(turns, self.template, "assistant", add_generation_prompt=True)
        dim = self.generator.solo.config.patch_dim
        return Prompt(ids, np.concatenate(patches) if patches else np.zeros((0, dim), np.uint8))

    def __call__(self, conversations: list[list[Turn]]) -> list[str]:
        from megatron.core import parallel_state as ps

        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = list(range(rank, len(conversations), dp))  # this replica's share
        start = time.perf_counter()
        ids = self.generator.generate([self.prompt(conversations[k]) for k in mine])
        self.seconds += time.perf_counter() - start
        answers = [self.processor.decode(i).strip() for i in ids]
        if dp > 1:
            shares: list = [None] * dp
            dist.all_gather_object(shares, (mine, answers, sum(map(len, ids))), group=ps.get_data_parallel_group())
        else:
            shares = [(mine, answers, sum(map(len, ids)))]
        out: list[str] = [""] * len(conversations)
        for indices, texts, n in shares:
            self.new_tokens += n
            for k, text in zip(indices, texts):
                out[k] = text
        return out
