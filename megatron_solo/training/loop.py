"""The training loop: data -> ``get_forward_backward_func`` (grad accumulation, ``finalize_model_grads`` with the
global text-token count) -> Megatron optimizer step -> schedule -> metrics / validation / checkpoints.

Loss convention (docs/model.md): every micro-batch back-propagates the SUM of its text-token losses;
``calculate_per_token_loss=True`` makes the schedule pass the step's token count to ``finalize_model_grads``, which
divides the DP-reduced gradient by the global count: the gradient of the token-weighted mean over the global batch,
whatever the micro-batch / DP split.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_solo import parallel
from megatron_solo.data.batch import BatchLoader, SoloBatch
from megatron_solo.model import build_packed_seq_params, mean_losses, solo_losses
from megatron_solo.model.loss import LOSS_NAMES
from megatron_solo.model.pipeline import schedule_shape, stage_needs
from megatron_solo.training import checkpointing as ckpt
from megatron_solo.training.arguments import RunArgs
from megatron_solo.training.errors import SetupError, report
from megatron_solo.training.eval_tasks import TaskEvaluator, tasks_due
from megatron_solo.training.exits import ExitConditions
from megatron_solo.training.metrics import MetricsWriter, console_line, memory_gb, peak_tflops, training_flops
from megatron_solo.training.optimizer import TrainState, build_model_and_optimizer, build_scheduler
from megatron_solo.training.plan import RunPlan, plan_run

# Test hook (fault injection): SIGKILL rank 0 after this iteration (see also checkpointing.KILL_IN_SAVE_ITER).
KILL_AFTER_ITER = "SOLO_TEST_KILL_AFTER_ITER"


def _log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


@dataclass
class StepResult:
    losses: dict[str, float]
    pairs: dict[str, torch.Tensor]  # DP-reduced (sum, count) per loss kind
    tokens: int
    real_tokens: int
    flops: float


class Trainer:
    """One run: build everything from ``RunArgs``, then :meth:`train`."""

    def __init__(self, args: RunArgs, plan: RunPlan | None = None):
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.args = args
        plan = plan_run(args) if plan is None else plan  # before process groups: setup errors stop here, once
        self.plan = plan
        self.tokenizer_path = plan.tokenizer_path
        self.train_data, self.valid_data = plan.train_data, plan.valid_data
        self.seq_length = plan.seq_length
        self.config = plan.config
        # The plan derived the virtual-stage count from the model's layer count (the config), hence groups after it.
        parallel.initialize(
            tensor_model_parallel_size=args.parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.config.virtual_pipeline_model_parallel_size,
            seed=args.train.seed,
        )
        self.rank = dist.get_rank()
        self.device = parallel.device()
        self.model, self.optimizer = build_model_and_optimizer(self.config, args.parallel, args.optim)
        self.scheduler = build_scheduler(self.optimizer, args.optim, args.sched, args.train)
        needs = stage_needs(self.config)
        gbs, mbs = args.train.global_batch_size, args.train.micro_batch_size
        self.loader = BatchLoader(self.train_data, gbs, mbs, self.device, needs=needs)
        self.valid_loader = (
            BatchLoader(self.valid_data, gbs, mbs, self.device, needs=needs) if self.valid_data is not None else None
        )
        self.forward_backward = get_forward_backward_func()
        self.dp_size = ps.get_data_parallel_world_size()
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        # Global rank 0 writes metrics and prints: the step's losses reach every stage (``_run`` broadcasts them).
        self.writer = MetricsWriter(
            args.log.tensorboard_dir, args.log.metrics_log, enabled=self.rank == 0, wandb=self._wandb_settings()
        )
        self.peak = peak_tflops(args.log.peak_tflops)
        self.state = self._load()
        self._log_start()
        self.task_eval = self._task_evaluator()

    def _log_start(self) -> None:
        a, vpp = self.args, self.config.virtual_pipeline_model_parallel_size
        n_params = sum(p.numel() for c in self.model for p in c.module.parameters())
        precision = "bf16" if a.bf16 else "fp16" if a.fp16 else "fp32"
        _log(
            f"SOLO run: world {dist.get_world_size()} = TP {self.tp_size} x PP {self.pp_size} x DP {self.dp_size}"
            f"{f' ({vpp} virtual stages per rank)' if vpp else ''}, "
            f"{type(self.model[0].module.language_model).__name__}, dist-opt "
            f"{a.parallel.use_distributed_optimizer}, {precision}, {n_params:,} params on rank 0, seq "
            f"{self.seq_length}, GBS {a.train.global_batch_size}, MBS {a.train.micro_batch_size}, "
            f"{self.loader.num_microbatches} micro-batches/step; data: {len(self.train_data)} packs/epoch; "
            f"starting at iteration {self.state.iteration} ({self.state.consumed_samples} samples consumed)"
        )
        _log(f"train: {self.plan.describe_samples(a)}")

    def _task_evaluator(self) -> TaskEvaluator | None:
        e = self.args.eval_tasks
        if not self.plan.eval_tasks:
            return None
        template = self.plan.chat_template or "plain"
        names = ", ".join(t.name for t in self.plan.eval_tasks)
        _log(f"eval tasks: {names} every {e.interval} iterations, {template} chat template")
        return TaskEvaluator(
            self.plan.eval_tasks, self.model[0], self.tokenizer_path, template, e.max_new_tokens, e.batch_size
        )

    def _score_tasks(self) -> None:
        """``--eval-tasks`` at this iteration if the schedule says so (every rank decides the same)."""
        e, it = self.args.eval_tasks, self.state.iteration
        if self.task_eval is None or not tasks_due(it, e.interval, self.args.train.train_iters):
            return
        record, line = self.task_eval.run(it)
        self.writer.write("eval_tasks", record)
        _log(line)

    def _wandb_settings(self) -> dict | None:
        a = self.args
        if not a.log.wandb_project:
            return None
        save_dir = a.log.wandb_save_dir or (os.path.join(a.ckpt.save, "wandb") if a.ckpt.save else "wandb")
        config = {"world_size": dist.get_world_size(), "start": self.plan.start.describe(), "argv": _argv()}
        return {"project": a.log.wandb_project, "name": a.log.wandb_exp_name, "save_dir": save_dir, "config": config}

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def _load(self) -> TrainState:
        c, start = self.args.ckpt, self.plan.start
        if start.kind == "resume":
            state = ckpt.load_checkpoint(
                start.checkpoint, self.model, self.optimizer, self.scheduler, load_optim=not c.no_load_optim,
                load_rng=not c.no_load_rng,
            )  # fmt: skip
            _log(f"resumed from {start.checkpoint.it_dir} at iteration {state.iteration}")
            return state
        if start.kind == "weights":
            ckpt.load_weights(self.model, self.optimizer, start.checkpoint)
            _log(f"loaded weights from {start.checkpoint.it_dir} (fresh optimizer and schedule)")
        return TrainState()

    def save(self) -> None:
        c = self.args.ckpt
        layout = {
            "tensor_model_parallel_size": self.tp_size,
            "pipeline_model_parallel_size": self.pp_size,
            "virtual_pipeline_model_parallel_size": self.config.virtual_pipeline_model_parallel_size,
            "data_parallel_size": self.dp_size,
        }
        t0 = time.time()
        path = ckpt.save_checkpoint(
            c.save, self.state, self.model, self.optimizer, self.scheduler, self.config, self.tokenizer_path, layout,
            save_optim=not c.no_save_optim, chat_template=self.plan.chat_template,
        )  # fmt: skip
        _log(f"saved checkpoint {path} in {time.time() - t0:.1f}s")

    # ---- steps -------------------------------------------------------------------------------------------------
    @staticmethod
    def _forward_step(data_iterator, model):
        """Megatron's forward_step_func for one micro-batch of one model chunk (a pipeline stage sees None for the
        fields it does not need; the loss function runs on the last stage only)."""
        batch: SoloBatch = next(data_iterator)
        psp = build_packed_seq_params(batch.cu_seqlens, batch.max_seqlen)
        output = model(batch.tokens, batch.position_ids, batch.patches, labels=batch.labels, packed_seq_params=psp)

        def loss_func(per_token: torch.Tensor):
            pairs = solo_losses(per_token, batch.loss_mask, batch.vision_doc_mask)
            stacked = torch.stack([pairs[k].detach() for k in LOSS_NAMES])
            return pairs["overall"][0], pairs["overall"][1].int(), {"pairs": stacked}

        return output, loss_func

    def _run(self, batches: list[SoloBatch], forward_only: bool) -> StepResult:
        """One global batch through the schedule; the (sum, count) pairs come from the last pipeline stage, are
        summed over DP there and broadcast to every stage, so all ranks return the same StepResult."""
        from megatron.core import parallel_state as ps

        # packed micro-batches run as [1, b*s]: the shape of the hidden states between stages (model/pipeline.py)
        seq, mbs = schedule_shape(self.args.train.micro_batch_size, self.seq_length, packed=True)
        chunks = len(self.model)
        out = self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=iter(batches) if chunks == 1 else [iter(batches) for _ in range(chunks)],
            model=self.model,
            num_microbatches=len(batches),
            seq_length=seq,
            micro_batch_size=mbs,
            forward_only=forward_only,
        )
        # empty except on the last stage
        pairs = sum(d["pairs"] for d in out) if out else torch.zeros(len(LOSS_NAMES), 2)
        tokens = sum(b.num_tokens for b in batches)
        real = sum(b.num_real_tokens for b in batches)
        flops = sum(training_flops(self.config, b.doc_lengths, b.num_patches) for b in batches)
        # one all-reduce over DP: (sum, count) pairs + token and FLOP totals; then the last stage's to all stages
        extra = torch.tensor([[tokens, real], [flops, 0.0]], dtype=torch.float64)
        packed = torch.cat([pairs.double().reshape(-1).to(self.device), extra.reshape(-1).to(self.device)])
        dist.all_reduce(packed, group=ps.get_data_parallel_group())
        if self.pp_size > 1:
            last = ps.get_pipeline_model_parallel_last_rank()
            dist.broadcast(packed, src=last, group=ps.get_pipeline_model_parallel_group())
        packed = packed.cpu()
        n = len(LOSS_NAMES) * 2
        reduced = {k: packed[2 * i : 2 * i + 2] for i, k in enumerate(LOSS_NAMES)}
        return StepResult(mean_losses(reduced), reduced, int(packed[n]), int(packed[n + 1]), float(packed[n + 2]))

    def train_step(self) -> tuple[StepResult, float]:
        batches = self.loader.step(self.state.consumed_samples)  # the next step's read starts in the background
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        result = self._run(batches, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=self.args.train.global_batch_size)  # samples, as Megatron-LM
        self.state.iteration += 1
        self.state.consumed_samples += self.args.train.global_batch_size
        return result, float("nan") if grad_norm is None else float(grad_norm)

    def evaluate(self) -> dict[str, float]:
        """Token-weighted validation losses over the first ``--eval-iters`` global batches of the held-out sets."""
        totals = None
        for chunk in self.model:
            chunk.eval()
        with torch.no_grad():
            n, gbs = self.args.train.eval_iters, self.args.train.global_batch_size
            for k in range(n):  # prefetching the next batch, after the last the next evaluation's first
                batches = self.valid_loader.step(k * gbs, next_consumed=(k + 1) % n * gbs)
                pairs = self._run(batches, forward_only=True).pairs
                totals = pairs if totals is None else {n: totals[n] + pairs[n] for n in totals}
        for chunk in self.model:
            chunk.train()
        return mean_losses(totals)

    # ---- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> TrainState:
        a = self.args
        stop_at = a.train.train_iters
        if self.state.iteration >= stop_at:
            _log(f"nothing to train: the run is at iteration {self.state.iteration} >= --train-iters {stop_at}")
        t = a.train
        exits = ExitConditions(t.exit_interval, t.exit_duration_in_mins, t.exit_signal_handler, self.device)
        kill_after = os.environ.get(KILL_AFTER_ITER)
        world = dist.get_world_size()
        bar = None
        if a.log.progress_bar and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=stop_at, initial=self.state.iteration, unit="it")
        self.first_loss = self.last_loss = None
        start, last_saved = self.state.iteration, None
        if start == 0:
            self._score_tasks()  # the starting point's score (before any step)
        while self.state.iteration < stop_at:
            t0 = time.time()
            result, grad_norm = self.train_step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.time() - t0
            it = self.state.iteration
            tflops = result.flops / dt / world / 1e12
            m = {
                "iteration": it,
                "consumed_samples": self.state.consumed_samples,
                "loss": result.losses["overall"],
                "vision_lm": result.losses["vision_lm"],
                "text_lm": result.losses["text_lm"],
                "lr": self.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "tokens_per_s": result.tokens / dt,
                "real_tokens_per_s": result.real_tokens / dt,
                "tflops_per_gpu": tflops,
                "mfu": tflops / self.peak if self.peak else float("nan"),
                "mem_gb": memory_gb(),
                "step_time_s": dt,
                "data_wait_s": self.loader.last_wait_s,
            }
            if a.fp16:
                m["loss_scale"] = float(self.optimizer.get_loss_scale())
            self.first_loss = m["loss"] if self.first_loss is None else self.first_loss
            self.last_loss = m["loss"]
            self.writer.write("train", m)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
            elif it % a.log.log_interval == 0 or it == stop_at:
                _log(console_line(m, a.train.train_iters, throughput=a.log.log_throughput))
            if self.valid_loader is not None and a.train.eval_interval and it % a.train.eval_interval == 0:
                self._log_eval()
            self._score_tasks()
            if a.ckpt.save and a.ckpt.save_interval and it % a.ckpt.save_interval == 0:
                self.save()
                last_saved = it
            if kill_after is not None and int(kill_after) == it:
                _kill_self()
            reason = exits.check(it)
            if reason is not None:
                _log(f"exiting after iteration {it}: {reason}")
                break
        exits.close()
        if bar is not None:
            bar.close()
        ran = self.state.iteration > start
        if (
            ran
            and self.valid_loader is not None
            and a.train.eval_interval
            and self.state.iteration % a.train.eval_interval
        ):
            self._log_eval()
        if ran and a.ckpt.save and a.ckpt.save_at_exit and last_saved != self.state.iteration:
            self.save()
        self.writer.close()
        for loader in (self.loader, self.valid_loader):
            if loader is not None:
                loader.close()
        return self.state

    def _log_eval(self) -> None:
        r = self.evaluate()
        m = {"iteration": self.state.iteration, **{f"valid_{k}": v for k, v in r.items()}}
        self.writer.write("valid", m)
        _log(
            f"validation at iter {self.state.iteration} | loss {r['overall']:.4f} | vision-lm {r['vision_lm']:.4f} | "
            f"text-lm {r['text_lm']:.4f}"
        )


def _kill_self() -> None:
    if dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()  # the others wait here until torchrun tears the job down


def _argv() -> list[str]:
    import sys

    return list(sys.argv[1:])


def main(argv: list[str] | None = None) -> TrainState:
    """Parse, plan (before process groups), train, save. A SetupError is printed once (rank 0) and every rank
    exits with code 2: no traceback wall."""
    import sys

    from megatron_solo.training.arguments import parse_args

    try:
        args = parse_args(argv)
        trainer = Trainer(args, plan_run(args))
        state = trainer.train()
    except SetupError as e:
        code = report(e)
        if dist.is_initialized():
            parallel.destroy()
        sys.exit(code)
    if trainer.first_loss is not None:
        _log(f"first loss {trainer.first_loss:.4f} -> last loss {trainer.last_loss:.4f} ({state.iteration} iterations)")
    parallel.destroy()
    return state
