"""L-infinity gradient attacks (FGSM, PGD/BIM, MI-FGSM, DI-FGSM) for crafting transfer examples.

Each attack is an object configured once with keyword-only arguments and called as
``attack(model, images, labels)`` (foolbox-style), so one configuration can be run over
many batches and surrogates. Images are float pixels in [0, 1], NCHW; labels are class
indices. The update order (step, clip to [0, 1], project onto the eps-ball) and the
momentum normalisation follow the Adversarial Robustness Toolbox, so results can be
checked against it image for image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from defcnn.errors import ConfigError


def model_device(model: nn.Module) -> torch.device:
    """The device the attack runs on: wherever the model's weights live."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run with every module in eval mode (fixed batch-norm statistics), then restore each."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def input_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, transform: nn.Module | None = None
) -> torch.Tensor:
    """Gradient of the summed cross-entropy w.r.t. the input only.

    ``torch.autograd.grad`` on the input leaves the weights' ``.grad`` untouched (and skips
    computing weight gradients); the sum keeps each image's gradient independent of the
    batch it was crafted in.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        inputs = x if transform is None else transform(x)
        loss = F.cross_entropy(model(inputs).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def _check_eps(name: str, value: float, *, positive: bool = False) -> float:
    value = float(value)
    if not (0.0 <= value <= 1.0) or (positive and value == 0.0) or math.isnan(value):
        bound = "(0, 1]" if positive else "[0, 1]"
        raise ConfigError(
            f"{name} must be in {bound} (pixels are in [0, 1]; pass k/255), got {value}"
        )
    return value


def _check_steps(steps: int) -> int:
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps}")
    return int(steps)


class Attack:
    """Base: runs on the model's device in eval mode; returns on the input's device."""

    eps: float | None = None

    def __call__(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        device = model_device(model)
        x0 = images.detach().to(device, torch.float32)
        y = torch.as_tensor(labels).to(device, torch.long)
        if x0.ndim != 4 or y.shape != x0.shape[:1]:
            raise ConfigError(f"expected images [N, C, H, W] and labels [N], got "
                              f"{tuple(x0.shape)} and {tuple(y.shape)}")  # fmt: skip
        with eval_mode(model):
            adv = self.run(model, x0, y)
        return adv.detach().to(images.device)

    def run(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _project(x: torch.Tensor, x0: torch.Tensor, eps: float) -> torch.Tensor:
    """ART's order: clip to [0, 1], then clip the perturbation to the eps-ball around ``x0``."""
    x = x.clamp(0.0, 1.0)
    return x0 + (x - x0).clamp(-eps, eps)


class FGSM(Attack):
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps."""

    eps: float  # an L-inf attack always has one

    def __init__(self, *, eps: float) -> None:
        self.eps = _check_eps("eps", eps)

    def run(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grad = input_grad(model, x0, y)
        return (x0 + self.eps * grad.sign()).clamp(0.0, 1.0)


class PGD(Attack):
    """Projected gradient descent; without a random start it is BIM (Kurakin et al.).

    The paper's preset is eps 16/255, step 1/255, 20 steps, no random start, which is
    ART's ``ProjectedGradientDescent`` with ``num_random_init=0``.
    """

    eps: float  # an L-inf attack always has one

    def __init__(
        self, *, eps: float, step: float, steps: int, random_start: bool = False, seed: int = 0
    ) -> None:
        self.eps = _check_eps("eps", eps)
        self.step = _check_eps("step", step, positive=True)
        self.steps = _check_steps(steps)
        self.random_start = bool(random_start)
        self.seed = int(seed)

    def run(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x0
        if self.random_start:
            gen = torch.Generator().manual_seed(self.seed)
            noise = torch.rand(x0.shape, generator=gen).mul_(2 * self.eps).sub_(self.eps)
            x = (x0 + noise.to(x0.device)).clamp(0.0, 1.0)
        for _ in range(self.steps):
            x = _project(x + self.step * input_grad(model, x, y).sign(), x0, self.eps)
        return x


class MIFGSM(Attack):
    """Momentum iterative FGSM (Dong et al. 2018): momentum of L1-normalised gradients.

    ``g = decay * g + grad / ||grad||_1`` per image, then a sign step; the normalisation
    makes each step's gradient count equally regardless of its scale, which is what lets
    the momentum stabilise the direction and transfer better. Matches ART's
    ``MomentumIterativeMethod``.
    """

    eps: float  # an L-inf attack always has one

    def __init__(self, *, eps: float, step: float, steps: int, decay: float = 1.0) -> None:
        self.eps = _check_eps("eps", eps)
        self.step = _check_eps("step", step, positive=True)
        self.steps = _check_steps(steps)
        if not decay >= 0:
            raise ConfigError(f"decay must be >= 0, got {decay}")
        self.decay = float(decay)

    def _transform(self, gen: torch.Generator) -> nn.Module | None:
        return None

    def run(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(getattr(self, "seed", 0))
        momentum = torch.zeros_like(x0)
        x = x0
        for _ in range(self.steps):
            grad = input_grad(model, x, y, self._transform(gen))
            flat = grad.reshape(len(grad), -1)
            norm1 = torch.linalg.norm(flat, ord=1, dim=1, keepdim=True)
            # A zero gradient stays zero (ART's convention) instead of dividing by zero.
            normalised = (flat * norm1.where(norm1 == 0, 1 / norm1)).reshape(grad.shape)
            momentum = self.decay * momentum + normalised
            x = _project(x + self.step * momentum.sign(), x0, self.eps)
        return x


class _InputDiversity(nn.Module):
    """Xie et al. 2019: with probability ``prob``, resize to a random size in
    [H, H * rate) and zero-pad at a random offset to H * rate, then resize back to H
    (so models without global pooling accept it). One draw per step for the batch."""

    def __init__(self, gen: torch.Generator, prob: float, resize_rate: float) -> None:
        super().__init__()
        self.gen, self.prob, self.resize_rate = gen, prob, resize_rate

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.gen).item())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-1]
        big = int(size * self.resize_rate)
        # Draw every random number each step so the sequence does not depend on `prob`.
        rnd = self._randint(size, big) if big > size else size
        top = self._randint(0, big - rnd + 1)
        left = self._randint(0, big - rnd + 1)
        apply = torch.rand((1,), generator=self.gen).item() < self.prob
        if not apply or big <= size:
            return x
        out = F.interpolate(x, size=(rnd, rnd), mode="bilinear", align_corners=False)
        out = F.pad(out, (left, big - rnd - left, top, big - rnd - top), value=0.0)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


class DIFGSM(MIFGSM):
    """MI-FGSM on randomly resized and padded inputs (input diversity, Xie et al. 2019),
    which keeps the perturbation from overfitting the surrogate and improves transfer."""

    def __init__(
        self,
        *,
        eps: float,
        step: float,
        steps: int,
        decay: float = 1.0,
        prob: float = 0.5,
        resize_rate: float = 1.1,
        seed: int = 0,
    ) -> None:
        super().__init__(eps=eps, step=step, steps=steps, decay=decay)
        if not 0.0 <= prob <= 1.0:
            raise ConfigError(f"prob must be in [0, 1], got {prob}")
        if not resize_rate >= 1.0:
            raise ConfigError(f"resize_rate must be >= 1, got {resize_rate}")
        self.prob = float(prob)
        self.resize_rate = float(resize_rate)
        self.seed = int(seed)

    def _transform(self, gen: torch.Generator) -> nn.Module | None:
        return _InputDiversity(gen, self.prob, self.resize_rate)
