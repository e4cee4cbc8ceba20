"""Evaluation during training (``--eval-tasks``): downstream scores on held-out tasks every N steps, next to the loss.

SOLO's authors found that neither the pre-training nor the SFT loss predicts benchmark scores (paper §7.1: two SFT
runs with the same loss, very different accuracy), so a run shows a score while it trains. A task is any
``megatron_solo.eval`` task file (``[name=]vqa:FILE.jsonl`` / ``caption:FILE.jsonl``); the trainer's own model
answers it in process (eval/inprocess.py: greedy, KV cache, every TP rank, the items split over DP), rendered with
the run's chat template, so the score is the one ``megatron_solo.evaluate`` gives the exported checkpoint of the
same step.

The schedule is a pure function of the iteration (``tasks_due``: iteration 0, every ``--eval-tasks-interval``
steps, and the last iteration of the run), so a resumed run scores at the same steps as an uninterrupted one; a
run stopped early (``--exit-interval``, SIGTERM) adds no extra score at the iteration it stopped at. Task files are
read at setup (``load_eval_tasks``, before process groups): a missing file or a bad record stops the run there, once.
"""

from __future__ import annotations

import time

from megatron_solo.training.errors import SetupError


def tasks_due(iteration: int, interval: int, train_iters: int) -> bool:
    """Whether the tasks are scored after ``iteration`` steps (0: the starting weights)."""
    return interval > 0 and (iteration % interval == 0 or iteration == train_iters)


def load_eval_tasks(specs: list[str], samples: int | None) -> list:
    """``--eval-tasks`` specs -> tasks (the first ``samples`` items each), or SetupError naming the spec."""
    from megatron_solo.eval.records import RecordError
    from megatron_solo.eval.tasks import load_task

    tasks = []
    for spec in specs:
        try:
            tasks.append(load_task(spec, limit=samples))
        except (OSError, RecordError, ValueError) as e:
            raise SetupError(f"--eval-tasks {spec}: {e}") from None
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise SetupError(f"--eval-tasks: two tasks named the same ({', '.join(names)}): name them, e.g. a=vqa:FILE")
    return tasks


class TaskEvaluator:
    """Runs the tasks with the trainer's model (its one chunk: no pipeline stages); every rank calls :meth:`run` at
    the same iterations."""

    def __init__(self, tasks: list, model, tokenizer_model: str, template: str, max_new_tokens: int, batch_size: int):
        from megatron.core import parallel_state as ps

        from megatron_solo.eval.inprocess import MegatronModelFn

        self.tasks, self.ddp = tasks, model
        self.model_fn = MegatronModelFn(model, tokenizer_model, template, max_new_tokens)
        self.batch_size = batch_size * ps.get_data_parallel_world_size()  # batch_size prompts per DP replica

    def run(self, iteration: int) -> tuple[dict, str]:
        """Score every task -> (metrics record ``{"iteration", "<task>/<metric>": value, ...}``, console line)."""
        record: dict = {"iteration": iteration}
        parts = []
        start = time.perf_counter()
        # With --overlap-param-gather the distributed optimizer's all-gather runs in forward pre-hooks (a DP
        # collective per forward); DP replicas decode different numbers of steps, so sync now and decode without
        # them, as Megatron-LM's own evaluation does.
        hooked = getattr(self.ddp, "use_forward_hook", False)
        if hooked:
            self.ddp.disable_forward_pre_hook(param_sync=True)
        try:
            self._run_tasks(record, parts)
        finally:
            if hooked:
                self.ddp.enable_forward_pre_hook()
        seconds = time.perf_counter() - start
        record["eval_tasks_seconds"] = seconds
        return record, f"eval tasks at iter {iteration} | " + " | ".join(parts) + f" | {seconds:.1f} s"

    def _run_tasks(self, record: dict, parts: list[str]) -> None:
        for task in self.tasks:
            tokens_before = self.model_fn.new_tokens
            result = task.run(self.model_fn, batch_size=self.batch_size, progress=False)
            record.update({f"{task.name}/{k}": float(v) for k, v in result.scores.items()})
            # answer length (EOS included): whether the model learned to answer briefly and stop, beside the score
            answer_tokens = (self.model_fn.new_tokens - tokens_before) / max(1, len(task.items))
            record[f"{task.name}/answer_tokens"] = answer_tokens
            parts.append(f"{task.name} {task.primary} {result.scores[task.primary]:.4f} (n {result.scores['n']})")
