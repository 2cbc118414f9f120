"""Muon for the hidden weight matrices, AdamW for every other parameter, in one optimizer.

Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks")
takes SGD momentum of a weight matrix's gradient and replaces it by the nearest
semi-orthogonal matrix, computed with a few Newton-Schulz iterations. Embeddings, the
output head, norms and biases are trained with AdamW as usual.

Here the Newton-Schulz iteration runs in ``ns_dtype`` ("float32" by default: CPUs without
bf16 instructions run bf16 matmuls an order of magnitude slower), and matrices of the same
shape are orthogonalized together as one batched matmul, which cuts per-step overhead.
"""

from __future__ import annotations

from collections import defaultdict

import torch

# Quintic Newton-Schulz coefficients from the Muon write-up: they push all singular values
# of the normalized matrix into roughly [0.7, 1.2] in five steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(updates: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Approximately orthogonalize each matrix of a (N, rows, cols) stack with Newton-Schulz."""
    a, b, c = NS_COEFFICIENTS
    x = updates.to(dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(updates.dtype)


class Muon(torch.optim.Optimizer):
    """One optimizer holding Muon groups (``use_muon=True``) and AdamW groups.

    Muon groups use ``lr``, ``momentum``, ``nesterov``, ``weight_decay``; AdamW groups use
    ``lr``, ``betas``, ``eps``, ``weight_decay``. Each group may set its own ``lr``; the
    defaults below apply otherwise. Muon updates are scaled by ``sqrt(max(1, rows/cols))``
    so tall and wide matrices move at comparable rates.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: str = "float32",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            use_muon=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param)
            buffer = state["momentum_buffer"]
            buffer.lerp_(param.grad, 1 - group["momentum"])
            update = param.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
            by_shape[param.shape].append((param, update))
        for shape, pairs in by_shape.items():
            params = [p for p, _ in pairs]
            updates = torch.stack([u for _, u in pairs])
            updates = orthogonalize(updates, group["ns_steps"], getattr(torch, group["ns_dtype"]))
            scale = max(1.0, shape[-2] / shape[-1]) ** 0.5
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, list(updates.unbind(0)), alpha=-group["lr"] * scale)

    def _adamw_step(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)
            state["step"] += 1
            step = state["step"]
            state["exp_avg"].lerp_(param.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(group["eps"])
            if group["weight_decay"]:
                param.mul_(1 - group["lr"] * group["weight_decay"])
            param.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1**step))
