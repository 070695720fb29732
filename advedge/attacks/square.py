"""Square attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), L-inf and L2.

"Square Attack: a query-efficient black-box adversarial attack via random search", ECCV 2020.
A score-based attack: it only reads the model's scores, never its gradients, so it runs against
anything that maps a batch of images to logits (a torch module, a torch function, a numpy
function, or an ONNX Runtime / TensorRT runner with ``run(batch) -> logits``). It is the
ensemble's check against gradient masking.

Random search (Algorithm 1 of the paper), per example: start from ``x_hat = init(x)``; at each
iteration change one square window of side ``h(i)`` at a random position, query the model and
keep the change if the loss ``L = z_y - max_{j != y} z_j`` (the margin, minimised) decreases;
stop once the example is misclassified. ``h(i) = round(sqrt(p(i) * H * W))``, where the fraction
``p`` starts at ``p_init`` and is halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
and 8000 of a 10,000-query run (rescaled to the query budget).

* L-inf (Algorithm 2): the init is vertical stripes (each column is ``x +- eps`` per channel);
  an update sets the window to ``x +- eps`` with one random sign per channel.
* L2 (Algorithm 3): the update moves the perturbation mass of a second window ``W2`` and the
  unused budget into the window ``W1``, along the "meta" pattern of eq. (7) (two centred squares
  of opposite sign), so that ``||delta||_2`` stays equal to ``eps``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from advedge.attacks.base import Attack, ce_loss, margin_loss, project, register_attack
from advedge.errors import UsageError

logger = logging.getLogger(__name__)

__all__ = ["Square", "as_logits_fn"]

# Iterations (of a 10,000-query run) after which p is halved (Andriushchenko et al. 2020,
# Section 4 / Appendix: the piecewise-constant schedule).
_P_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_RESAMPLE_TRIES = 10


class _LogitsFunction:
    """Call a model with a torch batch and get torch logits, whatever the model takes.

    Args:
        model: A torch module or function, a numpy function, or an object with
            ``run(batch: np.ndarray) -> np.ndarray``.
        numpy_model: Feed numpy arrays from the start.
    """

    def __init__(self, model: Any, numpy_model: bool = False) -> None:
        runner = getattr(model, "run", None)
        if not isinstance(model, nn.Module) and callable(runner):
            self.call: Callable[[Any], Any] = runner
            self.numpy = True
        elif callable(model):
            self.call = model
            self.numpy = bool(numpy_model)
        else:
            raise UsageError(
                f"cannot query a {type(model).__name__}",
                "pass a callable mapping a batch to logits, or an object with .run(batch)",
            )

    def __call__(self, x: Tensor) -> Tensor:
        """Logits of the batch ``x``, as a float tensor on ``x``'s device.

        Shape:
            x ``[N, C, H, W]`` -> ``[N, K]``.
        """
        if not self.numpy:
            try:
                out = self.call(x)
            except TypeError as error:
                if isinstance(self.call, nn.Module):
                    raise  # a torch module's TypeError is a real bug, not a numpy model
                try:
                    out = self._call_numpy(x)
                except Exception:
                    raise error from None  # numpy did not help either: show the first error
                logger.debug("model rejected a torch tensor (%s); feeding numpy arrays", error)
                self.numpy = True
                return out
            return _to_tensor(out, x.device)
        return self._call_numpy(x)

    def _call_numpy(self, x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().cpu().numpy())
        return _to_tensor(self.call(array), x.device)


def _to_tensor(out: Any, device: torch.device) -> Tensor:
    if isinstance(out, (list, tuple)) and len(out) == 1:  # runners that return [logits]
        out = out[0]
    t = out if isinstance(out, Tensor) else torch.from_numpy(np.asarray(out))
    return t.detach().to(device=device).float()


def as_logits_fn(model: Any, *, numpy_model: bool = False) -> Callable[[Tensor], Tensor]:
    """Wrap any model so that it is called with a torch batch and returns torch logits.

    A torch module or function is called with the tensor as is. The model is fed numpy arrays
    (``x.cpu().numpy()``, whose result goes back through ``torch.from_numpy``) when
    ``numpy_model`` is set, when it has a ``run`` method and is not an ``nn.Module`` (ONNX
    Runtime / TensorRT runners: ``runner.run(batch)``), or when calling it with a tensor raises
    ``TypeError`` (from then on it is always fed numpy).

    Args:
        model: Anything that maps a batch of images in [0, 1] to logits.
        numpy_model: Declare that ``model`` takes and returns numpy arrays.

    Returns:
        ``fn(x: Tensor) -> Tensor``, logits as float32 on ``x``'s device.

    Raises:
        UsageError: if ``model`` is neither callable nor has a ``run`` method.

    Shape:
        ``[N, C, H, W] -> [N, K]``.
    """
    if isinstance(model, _LogitsFunction):
        return model
    return _LogitsFunction(model, numpy_model=numpy_model)


def _window_mask(rows: Tensor, cols: Tensor, side: int, height: int, width: int) -> Tensor:
    """Boolean masks of the ``side x side`` windows whose top-left corners are ``(rows, cols)``.

    Shape:
        rows, cols ``[n]`` -> ``[n, 1, H, W]``.
    """
    r = torch.arange(height, device=rows.device)[None, :, None] - rows[:, None, None]
    c = torch.arange(width, device=cols.device)[None, None, :] - cols[:, None, None]
    return ((r >= 0) & (r < side) & (c >= 0) & (c < side))[:, None]


def centred_pattern(h1: int, h2: int) -> Tensor:
    """The centred square pattern ``eta^(h1, h2)`` of eq. (7) (Andriushchenko et al. 2020).

    ``eta_{r,s} = sum_{k=0}^{M(r,s)} 1 / (n + 1 - k)^2`` with ``n = floor(h1 / 2)`` and
    ``M(r, s) = n - max(|r - floor(h1/2) - 1|, |s - floor(h2/2) - 1|)`` for ``r = 1..h1``,
    ``s = 1..h2`` (an empty sum, 0, where ``M < 0``): concentric squares whose value grows
    towards the centre.

    Shape:
        ``[h1, h2]``.
    """
    n = h1 // 2
    r = torch.arange(1, h1 + 1)[:, None]
    s = torch.arange(1, h2 + 1)[None, :]
    m = n - torch.maximum((r - n - 1).abs(), (s - h2 // 2 - 1).abs())
    k = torch.arange(n + 1, dtype=torch.float64)
    partial_sums = (1.0 / (n + 1 - k) ** 2).cumsum(0)
    eta = torch.where(m >= 0, partial_sums[m.clamp(0, n)], torch.zeros((), dtype=torch.float64))
    return eta.float()


def meta_pattern(side: int) -> Tensor:
    """The L2 update pattern of a ``side x side`` window, with unit L2 norm.

    ``[eta^(h, k), -eta^(h, h - k)]`` with ``k = floor(h / 2)`` side by side: two centred
    patterns of opposite sign (Andriushchenko et al. 2020, Section 3.2).

    Shape:
        ``[side, side]``.
    """
    k = side // 2
    parts = [-centred_pattern(side, side - k)]
    if k > 0:
        parts.insert(0, centred_pattern(side, k))
    pattern = torch.cat(parts, dim=1)
    return pattern / pattern.norm()


@register_attack("square")
class Square(Attack):
    """The Square attack, score-based and gradient-free (Andriushchenko et al., ECCV 2020).

    Only examples the model classifies correctly are attacked; the others are returned unchanged.
    ``n_queries`` bounds the number of model evaluations of every example, the clean one
    included. After a call, ``last_query_counts`` holds each example's number of queries and
    ``last_queries`` the mean and median over the examples this call broke.

    Args:
        model: Anything that maps a batch to logits: a torch module or function, a numpy
            function, or an object with ``run(batch: np.ndarray) -> np.ndarray``
            (see :func:`as_logits_fn`).
        eps: Budget in pixel units.
        norm: ``"Linf"`` or ``"L2"``.
        n_queries: Query budget per example (5000 by default).
        p_init: Initial fraction of pixels a window covers (the paper's 0.8 for CIFAR-10 and
            MNIST; 0.05 is its L-inf value for ImageNet).
        loss: ``"margin"`` (``z_y - max_{j != y} z_j``, minimised) or ``"ce"`` (``log p_y``,
            minimised).
        seed: Seed of the random search when no ``generator`` is given.
        generator: RNG (on the device of the inputs).
        numpy_model: Feed the model numpy arrays (see :func:`as_logits_fn`).

    Raises:
        UsageError: for an unknown loss or out-of-range settings.
    """

    name = "square"
    SETTINGS = ("n_queries", "p_init", "loss", "seed")
    kind = "query"
    _LOSSES = ("margin", "ce")

    def __init__(
        self,
        model: Any,
        *,
        eps: float,
        norm: str = "Linf",
        n_queries: int = 5000,
        p_init: float = 0.8,
        loss: str = "margin",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        numpy_model: bool = False,
    ) -> None:
        super().__init__(model, eps=eps, norm=norm)
        if n_queries < 1:
            raise UsageError(f"n_queries must be >= 1, got {n_queries}")
        if not 0.0 < p_init <= 1.0:
            raise UsageError(f"p_init must lie in (0, 1], got {p_init}")
        if loss not in self._LOSSES:
            raise UsageError(f"unknown Square loss {loss!r}", "use margin or ce")
        self.n_queries = int(n_queries)
        self.p_init = float(p_init)
        self.loss = loss
        self.seed = seed
        self.generator = generator
        self.logits_fn = as_logits_fn(model, numpy_model=numpy_model)
        self.last_query_counts: Tensor | None = None
        self.last_queries: dict[str, float | int | None] = {
            "mean": None,
            "median": None,
            "n_broken": 0,
        }

    def _rng(self, device: torch.device) -> torch.Generator | None:
        """The user's generator, or one seeded from ``seed`` on ``device`` (made once)."""
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(int(self.seed))
        return self.generator

    def _objective(self, logits: Tensor, y: Tensor) -> Tensor:
        """The loss the search minimises: ``z_y - max_{j != y} z_j`` or ``log softmax(z)_y``.

        Shape:
            logits ``[n, K]``, y ``[n]`` -> ``[n]``.
        """
        if self.loss == "margin":
            return -margin_loss(logits, y)
        return -ce_loss(logits, y)

    def p_schedule(self, i: int) -> float:
        """The fraction ``p(i)`` at iteration ``i``: ``p_init`` halved at each threshold passed.

        The thresholds 10, 50, ..., 8000 are for 10,000 queries and are rescaled to
        ``n_queries``.
        """
        scaled = int(i / self.n_queries * 10_000)
        return self.p_init / 2 ** sum(scaled > t for t in _P_HALVINGS)

    def side_length(self, i: int, height: int, width: int) -> int:
        """Window side ``h(i) = round(sqrt(p(i) * H * W))``, between 1 and ``min(H, W)``."""
        side = round(math.sqrt(self.p_schedule(i) * height * width))
        return max(1, min(side, height, width))

    # -- L-inf (Algorithms 1 and 2) -----------------------------------------------------------

    def _signs(self, shape: tuple[int, ...], like: Tensor, gen: torch.Generator | None) -> Tensor:
        bits = torch.randint(0, 2, shape, generator=gen, device=like.device)
        return (2 * bits - 1).to(like.dtype)

    def _init_linf(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """Vertical stripes: every column is ``x +- eps``, one sign per channel and column.

        Shape:
            x ``[n, C, H, W]`` -> ``[n, C, H, W]``.
        """
        n, c, _, w = x.shape
        return (x + self.eps * self._signs((n, c, 1, w), x, gen)).clamp(0.0, 1.0)

    def _propose_linf(
        self, x: Tensor, x_hat: Tensor, side: int, gen: torch.Generator | None
    ) -> Tensor:
        """Set a random ``side x side`` window to ``x +- eps`` (one sign per channel).

        Equivalent to ``P(x_hat + delta)`` with the ``+-2 eps`` window ``delta`` of Algorithm 2.
        Signs that leave the window unchanged are drawn again (up to 10 times), so that a query
        is not spent on the current point.

        Shape:
            x, x_hat ``[n, C, H, W]`` -> ``[n, C, H, W]``.
        """
        n, c, h, w = x.shape
        rows = torch.randint(0, h - side + 1, (n,), generator=gen, device=x.device)
        cols = torch.randint(0, w - side + 1, (n,), generator=gen, device=x.device)
        mask = _window_mask(rows, cols, side, h, w)
        signs = self._signs((n, c, 1, 1), x, gen)
        x_new = torch.where(mask, (x + self.eps * signs).clamp(0.0, 1.0), x_hat)
        for _ in range(_RESAMPLE_TRIES):
            same = (x_new == x_hat).flatten(1).all(1)
            if not bool(same.any()):
                break
            signs[same] = self._signs((int(same.sum()), c, 1, 1), x, gen)
            x_new[same] = torch.where(
                mask[same], (x[same] + self.eps * signs[same]).clamp(0.0, 1.0), x_hat[same]
            )
        return x_new

    # -- L2 (Algorithms 1 and 3) --------------------------------------------------------------

    def _init_l2(self, x: Tensor, gen: torch.Generator | None) -> Tensor:
        """A grid of centred squares ``eta`` (eq. 7) with random signs, rescaled to norm eps.

        The tiles have side ``max(1, min(H, W) // 5)``; tiles cut by the border are cropped.

        Shape:
            x ``[n, C, H, W]`` -> ``[n, C, H, W]``.
        """
        n, c, h, w = x.shape
        tile = max(1, min(h, w) // 5)
        pattern = centred_pattern(tile, tile).to(device=x.device, dtype=x.dtype)
        delta = torch.zeros_like(x)
        for top in range(0, h, tile):
            for left in range(0, w, tile):
                th, tw = min(tile, h - top), min(tile, w - left)
                signs = self._signs((n, c, 1, 1), x, gen)
                delta[:, :, top : top + th, left : left + tw] = signs * pattern[:th, :tw]
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return project(x + self.eps * delta / norm, x, self.eps, "L2")

    def _propose_l2(
        self, x: Tensor, x_hat: Tensor, side: int, gen: torch.Generator | None
    ) -> Tensor:
        """Algorithm 3: move the mass of ``W2`` and the unused budget into ``W1``.

        With ``nu = x_hat - x`` and ``eps_unused^2 = eps^2 - ||nu||^2``, for each channel ``i``:
        ``nu_tmp = rho * eta* + nu_{W1,i} / ||nu_{W1,i}||``,
        ``eps_avail = sqrt(||nu_{W1 u W2, i}||^2 + eps_unused^2 / c)``,
        ``nu_{W2,i} = 0`` and ``nu_{W1,i} = eps_avail * nu_tmp / ||nu_tmp||``, where ``eta*`` is
        the unit meta pattern (transposed with probability 1/2) and ``rho = +-1``. The new
        ``||nu||_2`` equals ``eps`` before clipping to [0, 1].

        Shape:
            x, x_hat ``[n, C, H, W]`` -> ``[n, C, H, W]``.
        """
        n, c, h, w = x.shape
        dev = x.device
        corners = [
            torch.randint(0, bound - side + 1, (n,), generator=gen, device=dev)
            for bound in (h, w, h, w)
        ]
        m1 = _window_mask(corners[0], corners[1], side, h, w).to(x.dtype)
        m2 = _window_mask(corners[2], corners[3], side, h, w).to(x.dtype)
        union = (m1 + m2).clamp(max=1.0)

        # The meta pattern placed at W1, transposed for a random half of the examples.
        pattern = meta_pattern(side).to(device=dev, dtype=x.dtype)
        transpose = torch.randint(0, 2, (n,), generator=gen, device=dev).bool()
        rr = (torch.arange(h, device=dev)[None, :, None] - corners[0][:, None, None]).clamp(
            0, side - 1
        )
        cc = (torch.arange(w, device=dev)[None, None, :] - corners[1][:, None, None]).clamp(
            0, side - 1
        )
        rr, cc = rr.expand(n, h, w), cc.expand(n, h, w)
        placed = torch.where(transpose[:, None, None], pattern[cc, rr], pattern[rr, cc])
        placed = placed[:, None] * m1

        nu = x_hat - x
        unused = (self.eps**2 - nu.flatten(1).pow(2).sum(1)).clamp_min(0.0).view(-1, 1, 1, 1)
        nu_w1 = nu * m1
        w1_norm = nu_w1.pow(2).sum((2, 3), keepdim=True).sqrt()
        rho = self._signs((n, c, 1, 1), x, gen)
        tmp = rho * placed + nu_w1 / w1_norm.clamp_min(1e-12)
        tmp_norm = tmp.pow(2).sum((2, 3), keepdim=True).sqrt().clamp_min(1e-12)
        avail = ((nu * union).pow(2).sum((2, 3), keepdim=True) + unused / c).sqrt()
        nu_new = nu * (1.0 - union) + m1 * tmp / tmp_norm * avail
        return project(x + nu_new, x, self.eps, "L2")

    # -- the search ---------------------------------------------------------------------------

    def perturb(self, x: Tensor, y: Tensor) -> Tensor:
        """Random search on the examples the model classifies correctly.

        Shape:
            x ``[N, C, H, W]``, y ``[N]`` int64 -> ``[N, C, H, W]``.
        """
        if y.dim() != 1 or y.is_floating_point():
            raise UsageError("square needs class-index targets of shape [N]")
        with torch.no_grad():
            return self._search(x, y)

    def _search(self, x: Tensor, y: Tensor) -> Tensor:
        n, _, h, w = x.shape
        gen = self._rng(x.device)
        queries = torch.ones(n, dtype=torch.long, device=x.device)
        logits = self.logits_fn(x)
        loss = self._objective(logits, y)
        fooled = logits.argmax(1) != y
        already = fooled.clone()
        x_hat = x.clone()

        todo = (~fooled).nonzero().squeeze(1)
        if self.n_queries >= 2 and todo.numel() > 0:
            init = self._init_linf if self.norm == "Linf" else self._init_l2
            x_init = init(x[todo], gen)
            logits = self.logits_fn(x_init)
            queries[todo] += 1
            x_hat[todo] = x_init  # the start is always accepted (Algorithm 1, line 1)
            loss[todo] = self._objective(logits, y[todo])
            fooled[todo] = logits.argmax(1) != y[todo]

        propose = self._propose_linf if self.norm == "Linf" else self._propose_l2
        for i in range(1, self.n_queries - 1):
            act = (~fooled).nonzero().squeeze(1)
            if act.numel() == 0:
                break
            x_new = propose(x[act], x_hat[act], self.side_length(i, h, w), gen)
            logits = self.logits_fn(x_new)
            queries[act] += 1
            loss_new = self._objective(logits, y[act])
            broken = logits.argmax(1) != y[act]
            accept = (loss_new < loss[act]) | broken
            keep = act[accept]
            x_hat[keep] = x_new[accept]
            loss[keep] = loss_new[accept]
            fooled[act[broken]] = True

        self._record_queries(queries, fooled & ~already)
        return x_hat

    def _record_queries(self, queries: Tensor, broken: Tensor) -> None:
        self.last_query_counts = queries.cpu()
        used = queries[broken].double()
        n_broken = int(broken.sum())
        self.last_queries = {
            "mean": float(used.mean()) if n_broken else None,
            "median": float(used.quantile(0.5)) if n_broken else None,
            "n_broken": n_broken,
        }
        logger.debug(
            "square: broke %d/%d examples, queries %s", n_broken, broken.numel(), self.last_queries
        )
