"""TP=2 parity on CPU/gloo: megatron's tensor-parallel layers and a tiny GPTModel equal their unsharded versions."""

import torch
import torch.nn.functional as F

from megatron_solo import parallel
from megatron_solo.testing.dist_checks import DistChecks
from megatron_solo.testing.tp import full_state

checks = DistChecks()
V, S, B, H = 128, 16, 2, 64


def _shard(t: torch.Tensor, dim: int) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    return t.chunk(ps.get_tensor_model_parallel_world_size(), dim=dim)[ps.get_tensor_model_parallel_rank()].clone()


@checks.check
def column_row_parallel_equal_linear():
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    parallel.initialize(tensor_model_parallel_size=2)
    cfg = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True)
    g = torch.Generator().manual_seed(7)
    w1, b1, w2, b2 = (torch.randn(*s, generator=g) for s in [(16, 8), (16,), (12, 16), (12,)])
    x_full, grad_out = torch.randn(5, 8, generator=g), torch.randn(5, 12, generator=g)
    for gather_output in (False, True):
        col = ColumnParallelLinear(8, 16, config=cfg, init_method=torch.nn.init.zeros_, gather_output=gather_output)
        row = RowParallelLinear(16, 12, config=cfg, init_method=torch.nn.init.zeros_, bias=True,
                                input_is_parallel=not gather_output, skip_bias_add=False)  # fmt: skip
        with torch.no_grad():
            col.weight.copy_(_shard(w1, 0))
            col.bias.copy_(_shard(b1, 0))
            row.weight.copy_(_shard(w2, 1))
            row.bias.copy_(b2)
        x = x_full.clone().requires_grad_(True)
        y = row(F.gelu(col(x)[0]))[0]
        (y * grad_out).sum().backward()

        xr = x_full.clone().requires_grad_(True)
        l1, l2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 12)
        with torch.no_grad():
            l1.weight.copy_(w1), l1.bias.copy_(b1), l2.weight.copy_(w2), l2.bias.copy_(b2)
        yr = l2(F.gelu(l1(xr)))
        (yr * grad_out).sum().backward()
        pairs = {
            "y": (y, yr),
            "dx": (x.grad, xr.grad),
            "dW1": (col.weight.grad, _shard(l1.weight.grad, 0)),
            "db1": (col.bias.grad, _shard(l1.bias.grad, 0)),
            "dW2": (row.weight.grad, _shard(l2.weight.grad, 1)),
            "db2": (row.bias.grad, l2.bias.grad),
        }
        for key, (a, b) in pairs.items():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{key} gather_output={gather_output}")


def _tiny_gpt(tp: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=2, hidden_size=H, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
        tensor_model_parallel_size=tp, use_cpu_initialization=True, attention_dropout=0.0, hidden_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                    vocab_size=V, max_sequence_length=S, position_embedding_type="rope",
                    share_embeddings_and_output_weights=False)  # fmt: skip


def _loss_and_grads(model):
    g = torch.Generator().manual_seed(42)
    tokens, labels = torch.randint(0, V, (B, S), generator=g), torch.randint(0, V, (B, S), generator=g)
    position_ids = torch.arange(S).expand(B, S)
    loss = model(tokens, position_ids, attention_mask=None, labels=labels)  # [b, s] per-token loss
    loss.mean().backward()
    return loss.detach(), full_state(model, grads=True, gated_linear_unit=True)


@checks.check
def gpt_tp2_matches_tp1():
    parallel.initialize(tensor_model_parallel_size=2)
    tp2 = _tiny_gpt(2)
    weights = full_state(tp2, gated_linear_unit=True)
    loss2, grads2 = _loss_and_grads(tp2)

    parallel.initialize(tensor_model_parallel_size=1)  # same processes, now TP=1 (x DP=2): the reference
    tp1 = _tiny_gpt(1)
    tp1.load_state_dict(weights, strict=False)
    for name, p in tp1.named_parameters():
        torch.testing.assert_close(p.data, weights[name], msg=name)
    loss1, grads1 = _loss_and_grads(tp1)
    torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-5)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        torch.testing.assert_close(grads2[name], grads1[name], rtol=1e-4, atol=1e-5, msg=name)


if __name__ == "__main__":
    checks.main()
