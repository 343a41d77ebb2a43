"""Certified-step gradient descent: the step of the descent lemma with a certified L_F.

At a step, :class:`CertifiedGD` certifies (:func:`smoothchain.certify` with
``around_weights=True``, RH Cor. 4.5, then Prop. 4.2) the smoothness L_F of the objective

    F(w) = f(psi(w; x)) + l2/2 ||w||^2      (the batch ``(x, y) = closure()``)

on the ball C = {w : ||v_l - v*_l|| <= R for every RH layer l} around the current weights v*
(a layer = the parameters of one bi-affine component, the flat slices of
:func:`smoothchain.check.layer_blocks`), and steps w <- w - eta g, g = grad F(w), with

    eta = min(1/L_F, R / max_l ||g_l||)

(recertifying every step, the default): the largest step of the descent lemma whose segment
[w, w - eta g] stays in C (C is convex and both ends are in it).  On C, F is L_F-smooth, so
(descent lemma, RH Thm 4.1's proof; the lecture's "by smoothness" step)

    F(w) - F(w - eta g) >= eta ||g||^2 - L_F eta^2 ||g||^2 / 2 = eta ||g||^2 (1 - L_F eta / 2) >= 0.

With ``recertify_every = k > 1`` a certificate is reused for up to k steps: every step stays in
the ball certified at the last recertification (its centre c is kept), with the largest step that
ball allows, eta = min(1/L_F, t*), t* = max{t : ||w_l - t g_l - c_l|| <= R for every l}
(a quadratic per layer).  The optimizer recertifies early when that is shorter than what a fresh
ball would allow (t* < min(1/L_F, R / max_l ||g_l||)), when the batch no longer fits the
certificate (another batch size or input shape, a larger ||x|| or target norm) and when the
settings (radius, loss, mode, l2) changed.

Each step appends a frozen :class:`CertifiedStep` to ``history`` (also in ``state_dict``):
F before and after the step in float64, their difference, the certified decrease, eta, 1/L_F, the
ball-limited step t*, L_F, ||g|| and whether (and why) it recertified.  F after the step costs one
more forward pass (in float64, on copies of the weights and buffers: the module's own buffers,
e.g. batch-norm statistics, are not touched); a model that is not float64 pays a second one for
F before the step in float64 (a float64 model's gradient pass gives it).

Layout (in the manner of ``torch/optim/sgd.py``): :class:`CertifiedGD` gathers the state (the
certificate, its ball's centre, the history) and calls the functional pieces on plain tensors:
:func:`certified_step_size` (the step), :func:`ball_step_limit` (t*),
:func:`certified_decrease` (the guarantee) and :func:`certified_gd` (the update).

``loss``: a loss of :mod:`smoothchain.losses` with RH constants ("cross-entropy", "square",
"autoencoder", "convex-clustering"), or one of square form without them ("squared-error", alias
"mse": F's eqs. 21-22, no 1/2), certified as a multiple of "square" (see :func:`certificate_loss`).
``mode``: ``"local"`` certifies the step's batch itself (:func:`smoothchain.local.certify_local`:
the forward at the weights, activation constants over the reachable pre-activations, norms of
the actual weights; docs/local.md), a certificate that serves that very batch only (another
batch recertifies); any other mode is handed unchanged to :func:`smoothchain.certify`, which
certifies every batch of the same shape and no larger ||x|| (``"tight"``, ``"paper"``).

The guarantee is a statement in exact arithmetic about the exact gradient: the computed gradient
and the rounded update differ from it by rounding (the tests, in float64, allow a tiny slack).
With mini-batches it is a guarantee on each step's batch objective.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..losses import get_loss, loss_function, loss_names

__all__ = ["CertifiedGD", "CertifiedStep", "certified_gd", "certified_step_size", "ball_step_limit",
           "certified_decrease", "certificate_loss", "CERTIFIED_GD_LOSSES"]

#: the losses CertifiedGD takes: those with RH constants, and the square-form ones without them
CERTIFIED_GD_LOSSES = loss_names(certified=True) + tuple(
    n for n in loss_names(square=True) if n not in loss_names(certified=True))

#: the constants mode that certifies the batch itself (smoothchain.local.certify_local)
LOCAL = "local"
#: the mode that certifies each step's own segment (smoothchain.segment, docs/segment.md)
SEGMENT = "segment"

#: reasons for a (re)certification, as recorded in :attr:`CertifiedStep.reason`
REASONS = ("first", "every", "ball", "batch", "settings", "reused", "segment")


@dataclass(frozen=True)
class CertifiedStep:
    """One step's log (all floats; F in float64 on the step's batch).

    ``ball_eta`` is the largest t with w - t g in the certified ball (R / max_l ||g_l|| right
    after a recertification, inf for g = 0); ``eta = min(inverse_smoothness, ball_eta)``.
    ``certified_decrease = eta ||g||^2 (1 - L_F eta / 2)``, ``actual_decrease = loss_before -
    loss_after``.  ``reason``: "first", "every" (k steps done), "ball" (the certified ball would
    shorten the step), "batch" (the batch does not fit the certificate), "settings" (radius,
    loss, mode or l2 changed) -- a recertification -- or "reused".  ``certify_seconds``: wall
    time of the certify call (0 when reused); ``displacement``: max_l ||w_l - c_l|| after the
    step (c the certified ball's centre).
    """

    step: int
    loss_before: float
    loss_after: float
    actual_decrease: float
    certified_decrease: float
    eta: float
    inverse_smoothness: float
    ball_eta: float
    smoothness: float
    grad_norm: float
    recertified: bool
    reason: str
    certify_seconds: float
    displacement: float


# --------------------------------------------------------------------------------------------
# the functional pieces
def certified_step_size(smoothness: float, ball_eta: float) -> float:
    """eta = min(1/L_F, ball_eta) (1/0 = inf).  L_F must not be infinite or NaN."""
    if not smoothness >= 0 or math.isinf(smoothness):
        raise ValueError(f"the certified smoothness must be finite and >= 0, got {smoothness!r}")
    inv = math.inf if smoothness == 0 else 1.0 / smoothness
    return min(inv, ball_eta)


def certified_decrease(eta: float, grad_norm_sq: float, smoothness: float) -> float:
    """eta ||g||^2 - L_F eta^2 ||g||^2 / 2 (the descent lemma on a segment in C); 0 for g = 0."""
    if grad_norm_sq == 0:
        return 0.0
    return eta * grad_norm_sq * (1.0 - 0.5 * smoothness * eta)


def ball_step_limit(offset: Tensor | None, grad: Tensor, blocks: Sequence[slice], radius: float) -> float:
    """max{t >= 0 : ||offset_l - t grad_l|| <= R for every layer l} (flat float64 vectors; the
    slices ``blocks`` are the layers; ``offset`` = w - c, None for 0).  0 if some layer is
    already outside the ball, inf if the gradient is 0 on every layer.

    With offset 0 it is R / max_l ||g_l||.  Otherwise per layer the larger root of
    t^2 ||g||^2 - 2 t <a, g> + ||a||^2 - R^2 = 0, written without cancellation."""
    R2 = radius * radius
    best = math.inf
    for b in blocks:
        if b.stop <= b.start:
            continue
        g = grad[b]
        gg = float(g.dot(g))
        if offset is None:
            if gg > 0:
                best = min(best, radius / math.sqrt(gg))
            continue
        a = offset[b]
        aa = float(a.dot(a))
        if aa > R2:
            return 0.0
        if gg == 0:
            continue
        ag = float(a.dot(g))
        s = math.sqrt(ag * ag + gg * (R2 - aa))
        t = (ag + s) / gg if ag >= 0 else (R2 - aa) / (s - ag)
        best = min(best, t)
    return best


@torch.no_grad()
def certified_gd(params: Sequence[Tensor], grads: Sequence[Tensor], *, eta: float) -> None:
    """w <- w - eta g in place (``eta`` finite and >= 0; nothing moves for eta = 0)."""
    if not (0 <= eta < math.inf):
        raise ValueError(f"eta must be finite and >= 0, got {eta!r}")
    if eta == 0:
        return
    for p, g in zip(params, grads):
        p.add_(g.to(p.dtype), alpha=-eta)


def certificate_loss(loss: str) -> tuple[str, float]:
    """(the loss to certify, the factor s on F's loss part): "squared-error" (and "mse"),
    f = (1/m) sum ||z_i - y_i||^2, is 2 x "square" (1/(2m) sum ||z_i - y_i||^2), so its
    certificate is that of "square" with L_F scaled by 2 (and l2 halved before, see
    :meth:`CertifiedGD._certify`); a loss with RH constants is certified as itself (s = 1)."""
    row = get_loss(loss, CERTIFIED_GD_LOSSES + ("mse",))
    if row.rh_constants is not None:
        return row.name, 1.0
    square = get_loss("square")
    # F's loss part is (s/m) sum ||.||^2 = (s / s_square) x square: every term of RH Prop. 4.2
    # (L_psi l_f + l_psi^2 L_f) scales with it
    return "square", row.square_scale / square.square_scale


# --------------------------------------------------------------------------------------------
def _check_radius(radius) -> float:
    r = float(radius) if isinstance(radius, numbers.Real) and not isinstance(radius, bool) else math.nan
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"radius must be a finite positive number (the ball C = {{||v_l - v*_l|| <= R}}), "
                         f"got {radius!r}")
    return r


def _check_every(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"recertify_every must be a positive integer, got {k!r}")
    return k


def _check_l2(l2) -> float:
    try:
        x = float(l2)
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and x >= 0):
        raise ValueError(f"l2 must be a finite non-negative number, got {l2!r}")
    return x


def _infinite_reason(cert) -> str:
    """Why L_F is infinite: the components with infinite smoothness, by layer."""
    parts = []
    for layer in cert.chain.layers:
        for comp in layer.nonlinear:
            if math.isinf(comp.smoothness):
                parts.append(f"{comp.name or 'a nonlinear component'} in layer {layer.name!r}")
        if math.isinf(layer.bilinear.smoothness):
            parts.append(f"the bi-affine part of layer {layer.name!r}")
    if parts:
        return (f"{', '.join(parts)} {'is' if len(parts) == 1 else 'are'} not C^1 (infinite smoothness, "
                f"RH Sec. 5.1): use a smooth activation (softplus, tanh, sigmoid)")
    o = cert.objective
    return (f"the chain or loss constants overflow (l_f = {o.loss_lipschitz}, L_f = {o.loss_smoothness}, "
            f"chain smoothness {cert.bounds.smoothness}, Lipschitz {cert.bounds.lipschitz})")


def _same_batch(held, new) -> bool:
    """A local certificate (``held`` its batch) serves only the very batch it was computed for."""
    if held is None:
        return True
    if new is None:
        return False
    (x0, y0), (x1, y1) = held, new
    same_y = (y0 is None and y1 is None) or (y0 is not None and y1 is not None and y0.shape == y1.shape
                                             and bool(torch.equal(y0, y1)))
    return x0.shape == x1.shape and bool(torch.equal(x0, x1)) and same_y


class CertifiedGD(torch.optim.Optimizer):
    """Gradient descent with the largest step a smoothness certificate allows (module docstring).

    Args:
        model: a chain-like ``nn.Module`` that :func:`smoothchain.certify` takes (its parameters
            form one group, each belonging to one RH layer).
        loss: one of :data:`CERTIFIED_GD_LOSSES`.
        radius: R of the ball C around the weights (finite, > 0).
        mode: ``"local"`` (:func:`smoothchain.local.certify_local` on the step's batch) or a
            constants mode of :func:`smoothchain.certify`, passed as is (module docstring).
        l2: lambda of r(w) = lambda/2 ||w||^2.
        recertify_every: k, the most steps one certificate serves (1 = every step).
        certifier: optional ``certifier(model, x, y, *, loss, radius, mode, l2) -> Certificate``
            in place of :func:`smoothchain.certify` (e.g. a certificate that needs the batch);
            its ``objective.smoothness`` must hold on C around the current weights for the
            batch's objective with the ``loss`` and ``l2`` it is given (for "squared-error":
            "square" and l2 / 2, the result is doubled; see :func:`certificate_loss`).

    ``step(closure)``: ``closure()`` returns the batch ``(x, y)`` (``y`` unused by "autoencoder"
    and "convex-clustering"); the step returns F(w_t) before the step (a 0-dim float64 tensor).
    After it, ``history[-1]`` is its :class:`CertifiedStep` and ``last_certificate`` the
    :class:`~smoothchain.certificate.Certificate` in force.
    """

    def __init__(self, model: nn.Module, *, loss: str = "cross-entropy", radius: float = 0.1,
                 mode: str = "tight", l2: float = 0.0, recertify_every: int = 1,
                 certifier: Callable[..., Any] | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss not in CERTIFIED_GD_LOSSES + ("mse",):
            raise ValueError(f"loss must be one of {', '.join(CERTIFIED_GD_LOSSES)}, got {loss!r}")
        if not isinstance(mode, str):
            raise TypeError(f"mode must be a constants mode name (str), got {type(mode).__name__}")
        params = list(model.parameters())
        if not params:
            raise ValueError("the model has no parameters: nothing to optimise")
        defaults = dict(radius=_check_radius(radius), loss=loss, mode=mode, l2=_check_l2(l2),
                        recertify_every=_check_every(recertify_every))
        super().__init__(params, defaults)
        self.model = model
        self.certifier = certifier
        self.history: list[CertifiedStep] = []
        self.last_certificate = None
        self._cert: dict | None = None     # the certificate in force (see _certify)
        self._blocks_cache: dict[tuple, list[slice]] = {}

    def add_param_group(self, param_group: dict) -> None:
        if self.param_groups:
            raise ValueError("CertifiedGD certifies the whole chain as one group; it takes no extra "
                             "parameter groups")
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------------------
    # checkpoints: the certificate in force (its ball's centre) and the history travel along
    def state_dict(self):
        sd = super().state_dict()
        c = self._cert
        sd["certified_gd"] = {
            "history": [asdict(r) for r in self.history],
            "certificate": None if c is None else {k: (v.clone() if isinstance(v, Tensor) else v)
                                                   for k, v in c.items()},
        }
        return sd

    def load_state_dict(self, state_dict) -> None:
        """Restore (load the model's weights too: a certificate whose ball no longer holds the
        weights is replaced at the next step)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("certified_gd", None)
        super().load_state_dict(state_dict)
        if extra is None:
            return
        self.history = [CertifiedStep(**r) for r in extra.get("history", [])]
        c = extra.get("certificate")
        self._cert = None if c is None else {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in c.items()}
        self.last_certificate = None

    # ----------------------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    def _flat64(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])

    def _blocks(self, input_shape: tuple[int, ...]) -> list[slice]:
        blocks = self._blocks_cache.get(input_shape)
        if blocks is None:
            from ..check import layer_blocks

            blocks, _ = layer_blocks(self.model, input_shape)
            total = sum(p.numel() for p in self._params())
            if sum(b.stop - b.start for b in blocks) != total:
                raise ValueError("the optimizer's parameters are not the model's RH layers")
            self._blocks_cache[input_shape] = blocks
        return blocks

    def _objective(self, x, y, loss: str, l2: float, params=None) -> Tensor:
        f = loss_function(loss, y, x)
        value = f(self.model(x))
        if l2:
            ps = self._params() if params is None else params
            value = value + 0.5 * l2 * sum((p * p).sum() for p in ps)
        return value

    @torch.no_grad()
    def _objective64(self, x, y, loss: str, l2: float) -> float:
        """F at the current weights in float64, on copies (the module's buffers are untouched)."""
        from ..functional import make_functional_call

        def to64(t: Tensor) -> Tensor:
            return t.detach().to(torch.float64, copy=True) if t.is_floating_point() else t.detach().clone()

        fm = make_functional_call(self.model)
        params = [to64(p) for _, p in self.model.named_parameters()]
        buffers = {n: to64(b) for n, b in self.model.named_buffers()}
        x64 = to64(x) if isinstance(x, Tensor) else x
        y64 = to64(y) if isinstance(y, Tensor) else y
        value = loss_function(loss, y64, x64)(fm(params, x64, buffers=buffers))
        if l2:
            value = value + 0.5 * l2 * sum((p * p).sum() for p in params)
        return float(value)

    def _batch_facts(self, x: Tensor, y, cert_loss: str) -> dict:
        """What the certificate depends on in the batch: its shape, ||x|| and the target norm."""
        facts = {"shape": tuple(int(s) for s in x.shape), "input_norm": float(x.detach().double().norm()),
                 "target_norm": 1.0}
        if self.param_groups[0]["mode"] == LOCAL:  # valid for this very batch only
            facts["batch"] = (x.detach().clone(), None if y is None else y.detach().clone())
        if cert_loss == "square":
            if y is None:
                raise ValueError("the square loss needs targets y")
            yy = y.detach().double().reshape(len(y), -1)
            facts["target_norm"] = float(yy.norm(dim=1).max()) if yy.numel() else 0.0
        return facts

    def _certify(self, x, y, *, loss: str, radius: float, mode: str, l2: float, facts: dict) -> tuple[Any, float]:
        """The certificate on C around the current weights and F's L_F from it.

        F = s f_c o psi + l2/2 ||w||^2 with f_c the certified loss (:func:`certificate_loss`):
        certify f_c with l2 / s, then L_F = s x its smoothness (= s (L_psi l_f + l_psi^2 L_f) + l2,
        RH Prop. 4.2)."""
        cert_loss, scale = certificate_loss(loss)
        if self.certifier is not None:
            cert = self.certifier(self.model, x, y, loss=cert_loss, radius=radius, mode=mode, l2=l2 / scale)
        elif mode == LOCAL:
            from ..local import certify_local

            cert = certify_local(self.model, x, y, loss=cert_loss, radius=radius, l2=l2 / scale)
        else:
            from ..certificate import certify

            cert = certify(self.model, input_shape=tuple(x.shape[1:]), batch_size=len(x), radius=radius,
                           input_norm=facts["input_norm"], loss=cert_loss, mode=mode, l2=l2 / scale,
                           around_weights=True, target_norm=facts["target_norm"])
        smoothness = scale * float(cert.objective.smoothness)
        if math.isnan(smoothness) or math.isinf(smoothness):
            raise ValueError(f"CertifiedGD: the certified smoothness L_F of the objective is {smoothness} on "
                             f"the ball of radius {radius:g} around the weights ({mode} constants), so no step "
                             f"is certified: {_infinite_reason(cert)}")
        return cert, smoothness

    def _stale(self, facts: dict, settings: dict, k: int) -> str | None:
        """Why the certificate in force cannot serve this step (None: it can, ball permitting)."""
        c = self._cert
        if c is None:
            return "first"
        if c["settings"] != settings:
            return "settings"
        if c["steps"] >= k:
            return "every"
        if (c["shape"] != facts["shape"] or facts["input_norm"] > c["input_norm"]
                or facts["target_norm"] > c["target_norm"] or not _same_batch(c.get("batch"), facts.get("batch"))):
            return "batch"
        return None

    def _segment_step(self, x, y, params, grads, g64, grad_norm_sq, value, loss_before, loss, l2) -> Tensor:
        """A step certified on its own segment (:func:`smoothchain.segment.certified_segment_step`):
        eta from the certified curvature of F along -g, recertified every step."""
        from ..segment import certified_segment_step

        cert_loss, scale = certificate_loss(loss)
        seconds, eta, decrease, curvature = 0.0, 0.0, 0.0, 0.0
        if grad_norm_sq > 0:
            t0 = time.perf_counter()
            previous = self.history[-1].eta if self.history and self.history[-1].eta > 0 else None
            # F = s f_c + l2/2 ||w||^2: certify F / s = f_c + (l2/s)/2 ||w||^2 along the same g
            bound = certified_segment_step(self.model, x, y, g64, loss=cert_loss, l2=l2 / scale, start=previous)
            seconds = time.perf_counter() - t0
            self.last_certificate = bound
            eta, decrease = bound.step, scale * bound.guaranteed_decrease
            curvature = scale * bound.curvature_bound / grad_norm_sq  # L along g on the segment
            certified_gd(params, grads, eta=eta)
        loss_after = self._objective64(x, y, loss, l2)
        state = self.state[params[0]]
        state["step"] = state.get("step", 0) + 1
        self.history.append(CertifiedStep(
            step=len(self.history) + 1, loss_before=loss_before, loss_after=loss_after,
            actual_decrease=loss_before - loss_after, certified_decrease=decrease, eta=eta,
            inverse_smoothness=math.inf if curvature <= 0 else 1.0 / curvature, ball_eta=math.inf,
            smoothness=curvature, grad_norm=math.sqrt(grad_norm_sq), recertified=grad_norm_sq > 0,
            reason="segment", certify_seconds=seconds, displacement=eta * math.sqrt(grad_norm_sq)))
        return torch.tensor(loss_before, dtype=torch.float64)

    # ----------------------------------------------------------------------------------------
    def step(self, closure=None) -> Tensor:  # type: ignore[override]
        """One certified step on the batch ``(x, y) = closure()``; returns F(w_t) before it."""
        if closure is None:
            raise ValueError("CertifiedGD.step needs a closure returning the batch (x, y)")
        batch = closure()
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"the closure must return the batch (x, y), got {type(batch).__name__}")
        x, y = batch
        if not isinstance(x, Tensor) or x.dim() < 1 or len(x) == 0:
            raise TypeError("the closure's x must be a non-empty tensor batch (examples first)")
        group = self.param_groups[0]
        radius = _check_radius(group["radius"])
        k = _check_every(group["recertify_every"])
        l2 = _check_l2(group["l2"])
        loss, mode = group["loss"], group["mode"]
        params = self._params()
        settings = {"radius": radius, "loss": loss, "mode": mode, "l2": l2}

        with torch.enable_grad():
            value = self._objective(x, y, loss, l2)
            grads = torch.autograd.grad(value, params, allow_unused=True)
        value = value.detach()
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        g64 = self._flat64(grads)
        if not bool(torch.isfinite(g64).all()) or not math.isfinite(float(value)):
            raise ValueError(f"CertifiedGD: non-finite objective or gradient (F = {float(value)})")
        grad_norm_sq = float(g64.dot(g64))
        loss_before = float(value) if value.dtype == torch.float64 else self._objective64(x, y, loss, l2)

        if mode == SEGMENT:
            return self._segment_step(x, y, params, grads, g64, grad_norm_sq, value, loss_before, loss, l2)
        blocks = self._blocks(tuple(x.shape[1:]))
        cert_loss, _ = certificate_loss(loss)
        facts = self._batch_facts(x, y, cert_loss)
        fresh_ball = ball_step_limit(None, g64, blocks, radius)
        w64 = self._flat64(params)
        reason = self._stale(facts, settings, k)
        ball = fresh_ball
        if reason is None:
            c = self._cert
            ball = ball_step_limit(w64 - c["centre"], g64, blocks, radius)
            if ball < certified_step_size(c["smoothness"], fresh_ball):
                reason = "ball"
        seconds = 0.0
        if reason is not None:
            t0 = time.perf_counter()
            cert, smoothness = self._certify(x, y, loss=loss, radius=radius, mode=mode, l2=l2, facts=facts)
            seconds = time.perf_counter() - t0
            self.last_certificate = cert
            self._cert = {"centre": w64, "smoothness": smoothness, "steps": 0, "settings": settings, **facts}
            ball = fresh_ball
        c = self._cert
        smoothness = c["smoothness"]
        eta = certified_step_size(smoothness, ball)
        if grad_norm_sq == 0:
            pass  # a stationary point: nothing moves, nothing is guaranteed
        elif eta == 0:
            warnings.warn(f"CertifiedGD: the certified step is 0 (1/L_F = {1 / smoothness:g}, ball step "
                          f"{ball:g}); the weights do not move", RuntimeWarning, stacklevel=2)
        else:
            certified_gd(params, grads, eta=eta)
        c["steps"] += 1
        loss_after = self._objective64(x, y, loss, l2)
        offset = self._flat64(params) - c["centre"]
        displacement = max((float(offset[b].norm()) for b in blocks if b.stop > b.start), default=0.0)
        state = self.state[params[0]]
        state["step"] = state.get("step", 0) + 1
        record = CertifiedStep(
            step=len(self.history) + 1, loss_before=loss_before, loss_after=loss_after,
            actual_decrease=loss_before - loss_after,
            certified_decrease=certified_decrease(eta, grad_norm_sq, smoothness) if grad_norm_sq else 0.0,
            eta=eta, inverse_smoothness=math.inf if smoothness == 0 else 1.0 / smoothness, ball_eta=ball,
            smoothness=smoothness, grad_norm=math.sqrt(grad_norm_sq), recertified=reason is not None,
            reason=reason or "reused", certify_seconds=seconds, displacement=displacement)
        self.history.append(record)
        return torch.tensor(loss_before, dtype=torch.float64)
