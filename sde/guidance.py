"""Class-conditional generation by guidance: every method returns a new ``score_fn(x, t)``.

Conditioning is bound into the score callable (DESIGN.md), so a guided score works with
every sampler in the registry unchanged.

- Classifier guidance (Song et al. 2021, sec. 5 and app. I; Dhariwal & Nichol 2021):
  ``s(x, t) + scale * grad_x log p_t(y | x)`` with a time-dependent classifier.
- Classifier-free guidance (Ho & Salimans 2022): ``s_u + scale * (s_c - s_u)``; scale 1 is the
  plain conditional score, scale 0 the unconditional one (Ho & Salimans' w = scale - 1).
- ``NoiseConditionalClassifier`` and ``train_classifier``: a classifier of the noisy x_t,
  trained by cross-entropy on x_t ~ p_0t(. | x_0), t ~ U(eps, T).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._checks import as_time, bcast, check_callable, check_int, check_open_interval, check_positive, check_tensor
from .sdes import SDE, ScoreFn

__all__ = [
    "classifier_guided_score",
    "cfg_score",
    "NoiseConditionalClassifier",
    "train_classifier",
]

Classifier = Callable[[Tensor, Tensor], Tensor]  # (x, t) -> logits (B, K) or log p_t(y | x) (B,)
ConditionalScore = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]  # (x, t, y) -> score; y=None: null class


# -- label handling -------------------------------------------------------------------------
def _num_classes(model: object) -> int | None:
    """``num_classes`` of a model or of its ``net`` (ScoreModel wraps one); None if unknown."""
    for obj in (model, getattr(model, "net", None)):
        n = getattr(obj, "num_classes", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _check_labels(name: str, y: int | Tensor, num_classes: int | None, what: str) -> int | Tensor:
    """Validate class ids once, at wrap time (never per solver step)."""
    if num_classes == 0:
        raise ValueError(f"{name}: the {what} has num_classes=0 (no class embedding), so it cannot be conditioned on y")
    if isinstance(y, bool) or not isinstance(y, (int, Tensor)):
        raise TypeError(f"y must be an int class id or an integer tensor of shape (B,), got {type(y).__name__}")
    if isinstance(y, Tensor):
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of class ids, got dtype {y.dtype}")
        if y.dim() != 1:
            raise ValueError(f"y must have shape (B,), got shape {tuple(y.shape)}")
        low, high = (int(y.min()), int(y.max())) if y.numel() else (0, 0)
    else:
        low = high = y
    if low < 0 or (num_classes is not None and high >= num_classes):
        allowed = f"[0, {num_classes - 1}]" if num_classes is not None else ">= 0"
        raise ValueError(f"y holds class ids in [{low}, {high}]; the {what} allows {allowed}")
    return y


def _labels_for(y: int | Tensor, x: Tensor) -> Tensor:
    """y as a (B,) long tensor on x's device."""
    if isinstance(y, int):
        return torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)
    if y.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"y has {y.shape[0]} labels but x has batch size {x.shape[0]}")
    return y.to(x.device).expand(x.shape[0])


# -- classifier guidance --------------------------------------------------------------------
def classifier_guided_score(score_fn: ScoreFn, classifier: Classifier, y: int | Tensor, scale: float = 1.0) -> ScoreFn:
    """Classifier guidance (Song et al. 2021, sec. 5; Dhariwal & Nichol 2021).

    Returns ``s(x, t) + scale * grad_x log p_t(y | x)``, the gradient taken by autograd.
    With the exact classifier and scale 1 this is the exact score of p_t(x | y).

    Args:
        score_fn: unconditional score ``(x, t) -> Tensor`` shaped like x.
        classifier: time-dependent classifier ``(x, t) -> logits (B, K)``; log p_t(y | x) is
            their log-softmax at y. A callable returning shape (B,) is taken to return
            log p_t(y | x) itself (any differentiable log-likelihood of the condition).
        y: class id (int) or (B,) integer tensor of class ids.
        scale: guidance strength (>= 0); 1 samples p(x | y), larger sharpens it.

    Returns:
        The guided score function ``(x, t) -> Tensor``.

    Raises:
        TypeError / ValueError: y is not a class id, is out of range for a classifier with a
            ``num_classes`` attribute, or scale is negative or not finite.
    """
    scale = _check_scale(scale)
    y = _check_labels("classifier_guided_score", y, _num_classes(classifier), "classifier")
    check_callable("score_fn", score_fn, "score_fn(x, t)")
    check_callable("classifier", classifier, "classifier(x, t)")

    def guided(x: Tensor, t: Tensor) -> Tensor:
        labels = _labels_for(y, x)
        with torch.enable_grad():  # samplers may run under no_grad
            x_in = x.detach().requires_grad_(True)
            out = classifier(x_in, t)
            if out.dim() == 2:
                if labels.device.type == "cpu" and int(labels.max()) >= out.shape[1]:  # no sync on CPU
                    raise ValueError(f"y holds class id {int(labels.max())}; the classifier has {out.shape[1]} classes")
                log_p = torch.log_softmax(out, dim=1).gather(1, labels[:, None]).squeeze(1)
            elif out.dim() == 1:
                log_p = out
            else:
                raise ValueError(f"classifier must return logits (B, K) or log p(y|x) (B,), got {tuple(out.shape)}")
            grad = torch.autograd.grad(log_p.sum(), x_in)[0]
        return score_fn(x, t) + scale * grad

    return guided


# -- classifier-free guidance -----------------------------------------------------------------
def cfg_score(model: ConditionalScore, y: int | Tensor, scale: float = 1.0) -> ScoreFn:
    """Classifier-free guidance (Ho & Salimans 2022): ``s_u + scale * (s_c - s_u)``.

    ``s_c = model(x, t, y)`` and ``s_u = model(x, t, None)`` (None is the null class the model
    was trained on by label dropout). scale 1 is the plain conditional score (one model call
    per score evaluation), scale 0 the unconditional one; other scales cost two model calls
    per score evaluation (the ``nfe`` a sampler reports counts score evaluations). In Ho &
    Salimans' ``(1 + w) s_c - w s_u`` notation, w = scale - 1.

    Args:
        model: conditional score ``(x, t, y) -> Tensor``; y=None gives the unconditional score.
        y: class id (int) or (B,) integer tensor of class ids.
        scale: guidance scale >= 0.

    Returns:
        The guided score function ``(x, t) -> Tensor``.

    Raises:
        ValueError: the model (or its ``net``) has num_classes == 0, y is out of range, or
            scale is negative or not finite.
        TypeError: y is not an int or integer tensor.
    """
    scale = _check_scale(scale)
    y = _check_labels("cfg_score", y, _num_classes(model), "model")
    check_callable("model", model, "model(x, t, y)")

    def guided(x: Tensor, t: Tensor) -> Tensor:
        labels = _labels_for(y, x)
        if scale == 1.0:
            return model(x, t, labels)
        uncond = model(x, t, None)
        if scale == 0.0:
            return uncond
        return uncond + scale * (model(x, t, labels) - uncond)

    return guided


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    return float(scale)


# -- a noise-conditional classifier -------------------------------------------------------------
def _time_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of 1000 t (Vaswani et al. 2017, as in DDPM), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / max(half - 1, 1))
    arg = 1000.0 * t[:, None] * freqs[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class NoiseConditionalClassifier(nn.Module):
    """MLP classifier of noisy inputs, ``(x_t, t) -> logits (B, K)``, for classifier guidance.

    x is flattened (vectors or small images such as 8x8 digits); the time embedding is added
    to every hidden layer. With ``sde`` the input is scaled by 1 / sqrt(alpha^2 + sigma^2)
    (unit-variance data stays unit-variance at every t, EDM's c_in), which matters for VE.

    Args:
        in_shape: shape of one sample, e.g. (2,) or (1, 8, 8).
        num_classes: number of classes K >= 2.
        hidden: width of the hidden layers.
        depth: number of hidden layers >= 1.
        embed_dim: size of the time embedding (even).
        sde: optional SDE used for input scaling.

    Raises:
        ValueError / TypeError: non-positive sizes, num_classes < 2, odd embed_dim.
    """

    def __init__(
        self,
        in_shape: tuple[int, ...] | int,
        num_classes: int,
        *,
        hidden: int = 128,  # width of each hidden layer
        depth: int = 3,  # number of hidden layers
        embed_dim: int = 64,  # sinusoidal time-embedding size
        sde: SDE | None = None,  # if given, input scaled by 1/sqrt(alpha^2 + sigma^2)
    ) -> None:
        super().__init__()
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        for d in in_shape:
            check_int("in_shape entries", d, 1)
        self.in_shape = in_shape
        self.num_classes = check_int("num_classes", num_classes, 2)
        check_int("hidden", hidden, 1)
        check_int("depth", depth, 1)
        if check_int("embed_dim", embed_dim, 2) % 2:
            raise ValueError(f"embed_dim must be even, got {embed_dim}")
        self.embed_dim, self.sde = embed_dim, sde
        self.t_mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(math.prod(in_shape), hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.t_proj = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor, t: float | Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        t = as_time(t, x, self.sde.T if self.sde is not None else 1.0)
        if self.sde is not None:
            x = x / bcast(torch.sqrt(self.sde.alpha(t) ** 2 + self.sde.sigma(t) ** 2), x)
        emb = self.t_mlp(_time_embedding(t, self.embed_dim))
        h = self.inp(x.flatten(1))
        for layer, proj in zip(self.layers, self.t_proj):
            h = h + layer(torch.nn.functional.silu(h + proj(emb)))
        return self.out(torch.nn.functional.silu(h))


def train_classifier(
    classifier: nn.Module,
    sde: SDE,
    data: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch_size: int = 256,  # examples per step, drawn with replacement
    lr: float = 2e-3,  # Adam learning rate
    eps: float = 1e-5,  # smallest diffusion time drawn, t ~ U(eps, T)
    generator: torch.Generator | None = None,
    callback: Callable[[dict], None] | None = None,
) -> Tensor:
    """Train a time-dependent classifier on perturbed data (Song et al. 2021, app. I.1).

    Each step draws a batch (x_0, y), t ~ U(eps, T), x_t ~ p_0t(. | x_0) via ``sde.perturb``
    and takes an Adam step on the cross-entropy of ``classifier(x_t, t)`` against y.

    Args:
        classifier: module ``(x, t) -> logits (B, K)``, trained in place.
        sde: the forward SDE defining the noise.
        data: (N, ...) float training inputs.
        labels: (N,) integer class ids.
        steps: number of optimizer steps >= 1.
        generator: drives batch indices, times and noise.
        callback: called as ``callback({"step", "loss"})`` after every step.

    Returns:
        The per-step training losses, shape (steps,), float64 on the CPU.

    Raises:
        TypeError / ValueError: data or labels of the wrong kind or shape, bad step counts.
    """
    check_tensor("data", data, 2)
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.shape != (data.shape[0],):
        raise ValueError(f"labels must be an integer tensor of shape ({data.shape[0]},), got {labels!r:.80}")
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_positive("lr", lr)
    check_open_interval("eps", eps, 0.0, sde.T)
    n_cls = _num_classes(classifier)
    if n_cls is not None:
        _check_labels("train_classifier", labels, n_cls, "classifier")
    opt = torch.optim.Adam(classifier.parameters(), lr=lr)
    losses = torch.empty(steps, dtype=torch.float64, device=data.device)  # on the device: no host sync per step
    classifier.train()
    for step in range(steps):
        idx = torch.randint(data.shape[0], (batch_size,), generator=generator, device=data.device)
        x0, y = data[idx], labels[idx].to(data.device)
        t = eps + (sde.T - eps) * torch.rand(batch_size, generator=generator, device=data.device, dtype=data.dtype)
        xt, _ = sde.perturb(x0, t, generator=generator)
        loss = torch.nn.functional.cross_entropy(classifier(xt, t), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = loss.detach()
        if callback is not None:
            callback({"step": step, "loss": losses[step].item()})
    classifier.eval()
    return losses.cpu()
