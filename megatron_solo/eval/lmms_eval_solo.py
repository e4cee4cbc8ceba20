"""lmms-eval model adapter: an exported SOLO-HF dir (or a SOLO checkpoint) as lmms-eval's ``--model solo``.

    python -m lmms_eval --model solo --model_args pretrained=hf/solo-7b[,template=mistral,max_new_tokens=128] \\
        --tasks mme,pope --batch_size 8 --device cuda --output_path runs/lmms

Registered through the ``lmms_eval.models`` entry point (setup.py -> :func:`manifest`), so it needs no change to
lmms-eval. The model is opened by ``megatron_solo.generate.load`` and answers through ``generate.chat``: the same
processor chat template (``apply_chat_template``), batching (left padding), KV cache and EOS stop as
``python -m megatron_solo.generate`` and ``python -m megatron_solo.evaluate``, so a prompt gets the same answer
from all three. A request's context is the user turn; its images (``doc_to_visual``) go where the context holds
``<image>``, otherwise first. ``loglikelihood`` scores the continuation as the assistant's answer (the tokens the
chat template marks as targets of the last turn, without the closing EOS; the continuation's leading space is
dropped: each text segment is encoded on its own, so the segment boundary already is a word boundary). Its value
follows lmms-eval's convention, not lm-eval-harness's: lmms-eval's ``multiple_choice`` picks the choice with the
SMALLEST value (``argmin``), because its bundled models return HF's ``loss``; so this returns the mean negative
log-likelihood per continuation token (what ``model(..., labels=...).loss`` gives), and whether greedy decoding
would produce the continuation.

Results go back wrapped in lmms-eval's ``GenerationResult`` (with token counts for generated answers): lmms-eval
0.7.3's evaluator turns any other non-string result into ``str(result)``, which would break ``multiple_choice`` /
``loglikelihood`` tasks, whose ``(logprob, is_greedy)`` pairs it then cannot unpack.
"""

from __future__ import annotations

import json

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

from megatron_solo import generate as solo_generate


def manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's model manifest for ``solo``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="solo", simple_class_path="megatron_solo.eval.lmms_eval_solo.SoloLMMS")


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class SoloLMMS(lmms):
    """lmms-eval's ``lmms`` interface (``generate_until``, ``loglikelihood``) over a SOLO model."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        template: str = "auto",
        max_new_tokens: int | str = 128,
        **kwargs,
    ) -> None:
        super().__init__()
        unknown = {k for k in kwargs if k != "max_batch_size"}
        if unknown:
            raise ValueError(
                f"solo: unknown model_args {sorted(unknown)} (pretrained, device, dtype, batch_size, "
                "template, max_new_tokens)"
            )
        if device in (None, "", "auto") or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.processor = solo_generate.load(pretrained, device, dtype)
        self.template = None if template == "auto" else template
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 1
        self.max_new_tokens = int(max_new_tokens)
        self.device = device

    # ---- helpers -------------------------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        for v in visuals:
            if isinstance(v, str) or not hasattr(v, "mode"):
                raise ValueError(f"solo: task {task!r} gives a {type(v).__name__} visual; SOLO reads images only")
        return visuals

    def _conversation(self, context: str, visuals: list, answer: str | None = None) -> tuple[list, list]:
        messages = [{"role": "user", "content": context}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
        return messages, visuals

    def _sampling(self, gen_kwargs: dict) -> solo_generate.Sampling:
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        greedy = temperature == 0.0 or not _flag(gen_kwargs.get("do_sample", temperature > 0))
        top_p = gen_kwargs.get("top_p")
        return solo_generate.Sampling(
            max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
            greedy=greedy,
            temperature=temperature if not greedy else 1.0,
            top_p=float(top_p) if top_p is not None and not greedy else 1.0,
        )

    @staticmethod
    def _cut(text: str, until) -> str:
        stops = [until] if isinstance(until, str) else list(until or [])
        for s in stops:
            if s and s in text:
                text = text[: text.index(s)]
        return text

    # ---- lmms interface ------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy (or sampled, per the task's generation_kwargs) answers; requests with the same generation
        settings are batched ``batch_size`` at a time; stops at EOS or the task's ``until`` strings."""
        from tqdm import tqdm

        groups: dict[str, list[int]] = {}
        for k, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(k)
        out: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="SOLO responding")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            sampling, until = self._sampling(gen_kwargs), gen_kwargs.get("until")
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                convs, images = [], []
                for k in batch:
                    context, _, doc_to_visual, doc_id, task, split = requests[k].args
                    conv, ims = self._conversation(context, self._visuals(doc_to_visual, doc_id, task, split))
                    convs.append(conv)
                    images.append(ims)
                inputs = self.processor.apply_chat_template(
                    convs, images=images, template=self.template, add_generation_prompt=True
                )
                g = solo_generate.decode(self.model, self.processor, inputs, sampling)
                prompt_lengths = inputs["attention_mask"].sum(1).tolist()
                for k, text, ids, n_in in zip(batch, g.texts, g.ids, prompt_lengths):
                    counts = TokenCounts(input_tokens=int(n_in), output_tokens=len(ids))
                    out[k] = GenerationResult(self._cut(text, until), counts)
                bar.update(len(batch))
        bar.close()
        return out

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(mean negative log-likelihood per token of the continuation given the context, whether greedy decoding
        would produce it) per request: lmms-eval's convention (module docstring)."""
        results = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            continuation = str(continuation).strip()
            conv, ims = self._conversation(context, self._visuals(doc_to_visual, doc_id, task, split), continuation)
            batch = self.processor.apply_chat_template(
                conv, images=ims, template=self.template, return_targets=True, loss_on="last"
            )
            ids, targets = batch["input_ids"][0], batch["targets"][0].clone()
            targets[-1] = 0  # the document's closing EOS
            positions = targets.nonzero(as_tuple=True)[0]
            if len(positions) == 0:
                raise ValueError(f"solo: empty continuation for {task} doc {doc_id}")
            device = next(self.model.parameters()).device
            with torch.no_grad():
                logits = self.model(input_ids=ids[None].to(device), patches=batch["patches"].to(device)).logits[0]
            logprobs = torch.log_softmax(logits[positions - 1].float(), dim=-1)
            wanted = ids[positions].to(device)
            nll = -float(logprobs.gather(1, wanted[:, None]).mean())
            greedy = bool((logprobs.argmax(-1) == wanted).all())
            results.append(GenerationResult((nll, greedy)))  # passed through unchanged (module docstring)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("solo: multi-round generation is not implemented (use generate_until)")
