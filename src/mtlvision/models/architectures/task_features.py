"""Task-specific feature vectors with a learned sharing module between them."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal, Optional

import torch
from torch import nn

from ...registry import Spec
from ...tasks import Task
from ..backbones import Backbone
from ..heads import build_head
from .base import ARCHITECTURES, Architecture, TaskJacobian


@dataclasses.dataclass
class TaskFeaturesParams:
    feature_dim: int = 128
    sharing: Literal["attention", "gate"] = "attention"


@ARCHITECTURES.register("task-features", params=TaskFeaturesParams)
class TaskFeatures(Architecture):
    r"""Task-specific feature vectors that every head reads through a learned sharing module.

    With h = backbone(x) in R^D and T tasks:

        z_t     = ReLU(LayerNorm(W_t h + b_t))                    task feature, in R^d
        a_{t,s} = softmax_s( (W_q z_t)·(W_k z_s) / sqrt(d) + beta_{t,s} )   ("attention")
        a_{t,s} = softmax_s( beta_{t,s} )                                  ("gate")
        u_t     = z_t + W_o sum_s a_{t,s} W_v z_s
        y_t     = head_t(u_t)

    W_o starts at zero, so training begins from independent task features (u_t = z_t) and learns
    how much each task borrows from the others; beta starts at zero (uniform mixing).

    Split at the cut, the model offers the per-task gradients at h in closed form (`SharingJacobian`):
    every task reads the sharing module, which one autograd call per task would cross T times.
    """

    no_weight_decay = frozenset({"beta"})

    def __init__(self, p: TaskFeaturesParams, backbone: Backbone, tasks: list[Task], head: Spec) -> None:
        super().__init__(backbone, tasks)
        t, d, dim = len(tasks), p.feature_dim, backbone.out_dim
        self.sharing = p.sharing
        self.proj_weight = nn.Parameter(torch.empty(t, d, dim))
        self.proj_bias = nn.Parameter(torch.zeros(t, d))
        bound = 1 / math.sqrt(dim)
        nn.init.uniform_(self.proj_weight, -bound, bound)
        self.norm = nn.LayerNorm(d)
        self.beta = nn.Parameter(torch.zeros(t, t))
        if p.sharing == "attention":
            self.query = nn.Linear(d, d, bias=False)
            self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.out.weight)
        self.scale = 1 / math.sqrt(d)
        self.heads = nn.ModuleList([build_head(head, d, task.num_classes) for task in tasks])

    def _scores(self, z: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(scores (B, T, T), queries, keys); no queries or keys for "gate" sharing."""
        scores = self.beta.expand(z.shape[0], -1, -1)
        if self.sharing != "attention":
            return scores, None, None
        q, k = self.query(z), self.key(z)
        return scores + q @ k.transpose(1, 2) * self.scale, q, k

    def mixing(self, z: torch.Tensor) -> torch.Tensor:
        """Sharing weights a (B, T, T): row t says how much task t reads from each task."""
        return self._scores(z)[0].softmax(-1)

    def decode(self, shared: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.decode_at_cut(shared)[0]

    def decode_at_cut(self, shared: torch.Tensor) -> tuple[dict[str, torch.Tensor], Optional[TaskJacobian]]:
        pre = torch.einsum("bD,tdD->btd", shared, self.proj_weight) + self.proj_bias
        z = torch.relu(self.norm(pre))
        scores, q, k = self._scores(z)
        mix, v = scores.softmax(-1), self.value(z)
        u = z + self.out(mix @ v)
        logits = {name: head(u[:, i]) for i, (name, head) in enumerate(zip(self.task_names, self.heads))}
        # the weights as this forward used them (a functional_call's shifted ones are restored after it)
        weights = (self.proj_weight, self.norm.weight, self.value.weight, self.out.weight,
                   *((self.query.weight, self.key.weight) if q is not None else ()))
        return logits, SharingJacobian(pre, z, mix, v, q, k, u, weights, self.norm.eps, self.scale)


@dataclasses.dataclass
class SharingJacobian:
    r"""Task-features' per-task gradients at h in closed form (`ModelOutput.task_jacobian`): exact, the same
    rows as one autograd call per task (`spaces.per_task_rows`) to float rounding.

    Objective t reads h only through u_t (the validity condition of `task_jacobian`), so ONE backward of
    Σ_t objective_t to u gives every g_t = ∂objective_t/∂u_t. Then, for each row of the batch (W x: a Linear
    weight applied; Wᵀ: its transpose):

        m_t = Σ_s a_ts v_s:   ∂/∂m_t = gm_t = W_oᵀ g_t;  ∂/∂v_s = a_ts gm_t;  e_ts = gm_t·v_s
        softmax:              c_ts = ∂/∂scores_ts = a_ts (e_ts − Σ_r a_tr e_tr)          (attention only)
        ∂objective_t/∂z_s = X_ts = δ_ts y_t + a_ts α_t + c_ts κ_t,  with
            y_t = g_t + W_qᵀ Σ_s c_ts k_s / √d,   α_t = W_vᵀ gm_t,   κ_t = W_kᵀ q_t / √d
        (gate: a does not depend on z, so c = 0 and y_t = g_t).

    Through ReLU and LayerNorm at (b, s) (pre-activation p_s = W_s h + b_s, x̂_s its normalised value, σ_s its
    standard deviation, γ the LayerNorm weight), with R_s = γ ⊙ 1[z_s > 0] / σ_s:

        ∂/∂p_s = R_s ⊙ X_ts − μ1_ts 1 − μ2_ts x̂_s,   μ1_ts = <R_s, X_ts> / d,   μ2_ts = <R_s ⊙ x̂_s, X_ts> / d

    and ∂objective_t/∂h = Σ_s W_sᵀ ∂/∂p_s. The inner products μ are small (B, T, T) products of the (B, T, d)
    fields; the first term is a (B·T, T·d) x (T·d, D) matrix product: B·T²·d·D multiply-adds, where T
    autograd calls would also cross LayerNorm, the value/key/query/output layers and the softmax T times.
    """

    pre: torch.Tensor  # (B, T, d) W_s h + b_s, before LayerNorm
    z: torch.Tensor  # (B, T, d)
    mix: torch.Tensor  # (B, T, T) a
    value: torch.Tensor  # (B, T, d) v
    query: Optional[torch.Tensor]  # (B, T, d) q (attention only)
    key: Optional[torch.Tensor]  # (B, T, d) k (attention only)
    u: torch.Tensor  # (B, T, d) the heads' inputs
    weights: tuple[torch.Tensor, ...]  # W_s (T, d, D), γ, W_v, W_o[, W_q, W_k]
    eps: float  # LayerNorm's
    scale: float  # 1 / √d
    chunk: ClassVar[int] = 2 ** 22  # elements of the (rows, T, T, d) buffer (at least one row)

    def __call__(self, objectives: list[torch.Tensor]) -> torch.Tensor:
        T, (B, _, d), (D,) = self.pre.shape[1], self.pre.shape, self.weights[0].shape[2:]
        if len(objectives) != T:
            raise ValueError(f"task-features' Jacobian: expected one objective per task ({T}), got {len(objectives)}")
        used = [o for o in objectives if o.requires_grad]
        dtype = torch.promote_types(self.u.dtype, torch.float32)
        if not used:  # constant objectives: zero rows
            return torch.zeros(T, B * D, dtype=dtype, device=self.u.device)
        g = torch.autograd.grad(used, self.u, retain_graph=True, allow_unused=True)[0]
        if g is None:  # every task's logits read u: these objectives are not functions of the task losses
            raise ValueError("task-features' Jacobian: the objectives do not depend on the heads' inputs u; it "
                             "applies to functions of the forward's own task logits only")
        g, pre, z, a, v = (t.detach().to(dtype) for t in (g, self.pre, self.z, self.mix, self.value))
        W, gamma, Wv, Wo, *qk = (w.detach().to(dtype) for w in self.weights)
        gm = g @ Wo
        terms, y = [(a, gm @ Wv)], g  # X_ts = δ_ts y_t + Σ C_ts V_t over (C, V) in terms
        if qk:
            Wq, Wk = qk
            q, k = self.query.detach().to(dtype), self.key.detach().to(dtype)
            e = gm @ v.transpose(1, 2)
            c = a * (e - (a * e).sum(-1, keepdim=True))
            y = g + (c @ k) @ Wq * self.scale
            terms.append((c, q @ Wk * self.scale))
        var, mean = torch.var_mean(pre, -1, unbiased=False, keepdim=True)
        rstd = (var + self.eps).rsqrt()
        xhat = (pre - mean) * rstd
        R = gamma * (z > 0) * rstd

        def inner(F: torch.Tensor) -> torch.Tensor:  # <F_s, X_ts> (B, T, T) for a field F (B, T, d) over s
            out = sum(C * (V @ F.transpose(1, 2)) for C, V in terms)
            out.diagonal(0, 1, 2).add_((F * y).sum(-1))
            return out

        J = torch.empty(B, T, D, dtype=dtype, device=g.device)
        # Σ_s W_sᵀ (R_s ⊙ X_ts) in chunks of rows: R ⊙ X is (B, T, T, d), a fresh allocation of that size costs
        # more in page faults than filling it; one buffer of at most `chunk` elements is reused instead
        rows = max(1, min(B, self.chunk // (T * T * d)))
        buffer = torch.empty(rows, T, T, d, dtype=dtype, device=g.device)
        for i in range(0, B, rows):
            n, part = min(rows, B - i), slice(i, i + rows)
            X = buffer[:n]
            torch.mul(terms[0][0][part].unsqueeze(-1), terms[0][1][part].unsqueeze(2), out=X)
            for C, V in terms[1:]:
                X.addcmul_(C[part].unsqueeze(-1), V[part].unsqueeze(2))
            X.mul_(R[part].unsqueeze(1))
            X.diagonal(0, 1, 2).add_((R[part] * y[part]).transpose(1, 2))
            torch.mm(X.view(n * T, T * d), W.reshape(T * d, D), out=J[part].view(n * T, D))
        J -= torch.einsum("bts,sD->btD", inner(R) / d, W.sum(1))
        J -= torch.einsum("bts,bsD->btD", inner(R * xhat) / d, torch.einsum("bsk,skD->bsD", xhat, W))
        return J.transpose(0, 1).reshape(T, B * D)
