"""Transformer building blocks: norms, feed-forwards (SwiGLU, GELU, mixture of experts) and the
pre-norm block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plm.model.attention import Attention, AttnContext, KVCache
from plm.model.config import FFNConfig, ModelConfig

# ----------------------------------------------------------------------------- norms


class RMSNorm(nn.RMSNorm):
    """`nn.RMSNorm`, written out while exporting to ONNX (the TorchScript exporter has no
    `aten::rms_norm` symbolic below opset 23). Same weights, same result."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.onnx.is_in_onnx_export():
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        if self.weight is not None and x.dtype != self.weight.dtype:
            # bf16 activations, fp32 weight: CPU autocast (bf16-mixed on CPU) passes them as they
            # are and torch.rms_norm falls back to its composite path with a warning on every
            # call; run it in fp32 as CUDA autocast's policy for rms_norm does
            return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps)
        return super().forward(x)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm '{kind}'")


# ----------------------------------------------------------------------------- feed-forward


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), with w1 and w3 fused into one projection."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=bias)
        self.w2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class GeluMLP(nn.Module):
    """w2(gelu(w1 x)), the BERT/GPT-2 feed-forward."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.gelu(self.w1(x)))


def make_ffn(d_model: int, hidden: int, cfg: FFNConfig) -> nn.Module:
    cls = SwiGLU if cfg.kind == "swiglu" else GeluMLP
    return cls(d_model, hidden, cfg.bias)


class MoE(nn.Module):
    """Top-k mixture of experts (each an FFN of `kind`) with a Switch-Transformer load-balancing loss.

    After each forward `aux_loss` holds n_experts * sum_e f_e * P_e, where f_e is the fraction of
    (event, slot) assignments routed to expert e and P_e the mean router probability of e; it is
    1.0 for perfectly balanced routing. The training code adds it to the loss with its weight.
    """

    def __init__(self, d_model: int, hidden: int, cfg: FFNConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.router = nn.Linear(d_model, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(make_ffn(d_model, hidden, cfg) for _ in range(cfg.n_experts))
        self.aux_loss: Tensor = torch.zeros(())

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, d)
        probs = torch.softmax(self.router(x).float(), dim=-1)  # (N, E)
        weight, expert = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:  # renormalised over the k chosen; top-1 (Switch) keeps the router's
            weight = weight / weight.sum(-1, keepdim=True)  # probability, else its weight is 1 and
        weight = weight.to(x.dtype)  # the task loss would never reach the router
        out = torch.zeros_like(x)
        # an ONNX trace would freeze `rows.numel()` to the export example (an expert it did not
        # route to would vanish from the graph): exported, every expert runs on its (maybe no) rows
        onnx = torch.onnx.is_in_onnx_export()
        for e in range(self.n_experts):
            rows, slot = (expert == e).nonzero(as_tuple=True)
            if onnx or rows.numel():
                out.index_add_(0, rows, self.experts[e](x[rows]) * weight[rows, slot, None])
        # load balancing over real events only
        keep = valid.reshape(-1) if valid is not None else torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        n = keep.sum().clamp(min=1)
        onehot = F.one_hot(expert, self.n_experts).sum(1).float()  # (N, E)
        frac = (onehot * keep[:, None]).sum(0) / (n * self.top_k)
        mean_p = (probs * keep[:, None]).sum(0) / n
        self.aux_loss = self.n_experts * (frac * mean_p).sum()
        return out.view(shape)


# ----------------------------------------------------------------------------- block


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)); x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, moe: bool = False):
        super().__init__()
        d = cfg.d_model
        self.norm1 = make_norm(cfg.norm, d, cfg.norm_eps)
        self.attn = Attention(d, cfg.attention)
        self.norm2 = make_norm(cfg.norm, d, cfg.norm_eps)
        self.ffn = MoE(d, cfg.ffn_hidden, cfg.ffn) if moe else make_ffn(d, cfg.ffn_hidden, cfg.ffn)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, ctx: AttnContext, cache: KVCache | None = None, layer: int = 0,
                valid: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), ctx, cache, layer))  # (B, T, d)
        h = self.norm2(x)
        h = self.ffn(h, valid) if isinstance(self.ffn, MoE) else self.ffn(h)
        return x + self.drop(h)
