"""Carlini-Wagner L2 (untargeted): the minimal-perturbation attack with a logit margin."""

from __future__ import annotations

import torch
from torch import nn

from defcnn.attack.gradient import Attack, _check_steps
from defcnn.errors import ConfigError

_NO_BOUND = 1e10


class CWL2(Attack):
    """Carlini & Wagner 2017, L2, untargeted, optimised in tanh space with Adam.

    Minimises ``||delta||_2^2 + c * max(Z_y - max_{i != y} Z_i, -confidence)`` per image,
    with a binary search on ``c`` (raised tenfold until the first success, then bisected).
    A high ``confidence`` (the paper's kappa = 40) buys examples that still fool other
    models, at the price of a larger perturbation. Returns, per image, the smallest-L2
    example that beat the margin; images never broken are returned unchanged. There is no
    eps-ball: the budget is the L2 distance.
    """

    eps = None

    def __init__(
        self,
        *,
        confidence: float = 0.0,
        steps: int = 100,
        lr: float = 0.01,
        binary_search_steps: int = 5,
        initial_const: float = 1.0,
    ) -> None:
        if not confidence >= 0:
            raise ConfigError(f"confidence must be >= 0, got {confidence}")
        if not lr > 0:
            raise ConfigError(f"lr must be > 0, got {lr}")
        if not initial_const > 0:
            raise ConfigError(f"initial_const must be > 0, got {initial_const}")
        self.confidence = float(confidence)
        self.steps = _check_steps(steps)
        self.lr = float(lr)
        self.binary_search_steps = _check_steps(binary_search_steps)
        self.initial_const = float(initial_const)

    def _margin(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``Z_y - max_{i != y} Z_i`` per image."""
        real = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return real - other

    def run(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = len(x0)
        w0 = torch.atanh((2 * x0 - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        const = torch.full((n,), self.initial_const, device=x0.device)
        lower = torch.zeros(n, device=x0.device)
        upper = torch.full((n,), _NO_BOUND, device=x0.device)
        best_l2 = torch.full((n,), float("inf"), device=x0.device)
        best = x0.clone()
        for _ in range(self.binary_search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x0.device)
            for _ in range(self.steps):
                with torch.enable_grad():
                    adv = (torch.tanh(w) + 1) / 2
                    l2 = (adv - x0).pow(2).flatten(1).sum(1)
                    margin = self._margin(model(adv).float(), y)
                    loss = (l2 + const * margin.clamp(min=-self.confidence)).sum()
                    (w.grad,) = torch.autograd.grad(loss, w)
                with torch.no_grad():
                    # Judged before the step, on the point the loss was evaluated at.
                    hit = margin < -self.confidence
                    better = hit & (l2 < best_l2)
                    best_l2 = torch.where(better, l2, best_l2)
                    best[better] = adv.detach()[better]
                    succeeded |= hit
                opt.step()
            with torch.no_grad():
                upper = torch.where(succeeded, torch.minimum(upper, const), upper)
                lower = torch.where(succeeded, lower, torch.maximum(lower, const))
                bounded = upper < _NO_BOUND
                const = torch.where(bounded, (lower + upper) / 2, const * 10)
        return best.clamp(0.0, 1.0)
