"""Randomized Hadamard rotations of a layer's input side (incoherence processing, QuIP / paper App. C).

A Linear layer computes W x = (W R^T)(R x) for any orthogonal R. With R = H S (S diagonal random signs,
H an orthonormal Hadamard matrix), the rotated weight W' = W R^T has its outliers spread over all
columns, and its Hessian becomes R H_x R^T. The solver quantizes W'; the forward applies R to x online.

H is a Walsh-Hadamard matrix of size n = K x 2^k: a fast Walsh-Hadamard transform (O(n log n) per
token, butterfly reshapes) for the 2^k factor, times a small K x K Hadamard matrix (K in
:data:`SMALL_ORDERS`, built here by Paley's constructions) by a Kronecker product, as QuIP#'s
``matmul_had.py`` does. A block-diagonal variant applies one such H to every block of ``block``
consecutive inputs (the signs still span all inputs): the rotation mixes inputs only within a block, so
sensitivities still differ between blocks, which is what a per-column bit allocation needs.

Torch only; no transformers, no other module of the package.
"""

from __future__ import annotations

import functools
import math
import zlib
from dataclasses import dataclass

import torch

# Paley I (q prime, q = 3 mod 4): order q + 1; Paley II (q prime, q = 1 mod 4): order 2 (q + 1).
_PALEY_I = {12: 11, 20: 19, 44: 43, 60: 59, 108: 107, 140: 139}
_PALEY_II = {28: 13, 36: 17}
SMALL_ORDERS = tuple(sorted((*_PALEY_I, *_PALEY_II)))  # 40 = 20 x 2 etc. are covered by the 2^k factor


def _quadratic_character(q: int) -> list[int]:
    """chi(a) for a in 0..q-1: 0 at 0, 1 on the squares mod q, -1 elsewhere."""
    squares = {(a * a) % q for a in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    chi = _quadratic_character(q)
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley_i(q: int) -> torch.Tensor:
    """H = I + S with S = [[0, 1^T], [-1, Q]] (Q antisymmetric): order q + 1."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley_ii(q: int) -> torch.Tensor:
    """The symmetric conference matrix C = [[0, 1^T], [1, Q]] expanded: C x A + I x B, order 2 (q + 1)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.cache
def small_hadamard(order: int) -> torch.Tensor:
    """The +-1 Hadamard matrix of a small order in :data:`SMALL_ORDERS` (float64, H H^T = order I)."""
    if order in _PALEY_I:
        return _paley_i(_PALEY_I[order])
    if order in _PALEY_II:
        return _paley_ii(_PALEY_II[order])
    raise ValueError(f"no small Hadamard matrix of order {order}; built here: {list(SMALL_ORDERS)}")


@functools.cache
def _small_on(order: int, device: torch.device) -> torch.Tensor:
    return small_hadamard(order).to(device=device, dtype=torch.float32)


def hadamard_factor(n: int) -> int | None:
    """K with n = K x 2^k (K = 1 or one of :data:`SMALL_ORDERS`), or None if n has no such form."""
    for k in (1, *SMALL_ORDERS):
        m, r = divmod(n, k)
        if r == 0 and m >= 1 and m & (m - 1) == 0:
            return k
    return None


SUPPORTED_SIZES = (
    f"n = K x 2^k with K in {[1, *SMALL_ORDERS]} (e.g. 576 = 36 x 16, 640 = 20 x 32, 1536 = 12 x 128, "
    "3584 = 28 x 128)"
)


def block_for(n: int, rotation_block: int | None, name: str = "") -> int:
    """The rotation's block size for a layer with ``n`` inputs: all of them (``rotation_block`` None),
    else the largest supported size <= ``rotation_block`` that divides n. Refuses impossible sizes."""
    where = f" of layer {name!r}" if name else ""
    if rotation_block is None:
        if hadamard_factor(n) is None:
            raise ValueError(
                f"no Hadamard rotation of size {n} (the input size{where}): full rotations support "
                f"{SUPPORTED_SIZES}; set rotation_block (e.g. 128) to rotate in blocks, or list the layer "
                "in modules_to_not_convert"
            )
        return n
    sizes = [b for b in range(min(rotation_block, n), 1, -1) if n % b == 0 and hadamard_factor(b) is not None]
    if not sizes:
        raise ValueError(
            f"no Hadamard block of at most rotation_block={rotation_block} divides the input size "
            f"{n}{where}; block sizes must divide it and have the form {SUPPORTED_SIZES}"
        )
    return sizes[0]


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform (Sylvester order) over the last dim (a power of two)."""
    m = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < m:
        y = x.reshape(*lead, m // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return x.reshape(*lead, m)


def hadamard(x: torch.Tensor, block: int, transpose: bool = False) -> torch.Tensor:
    """H v (or H^T v) for every vector v of ``block`` consecutive entries of the last dim, H orthonormal
    of size ``block`` = K x 2^k: (A kron B) v = A V B for v reshaped to K x 2^k (B symmetric)."""
    n = x.shape[-1]
    k = hadamard_factor(block)
    if k is None or n % block:
        raise ValueError(f"no Hadamard block of size {block} over {n} inputs ({SUPPORTED_SIZES})")
    lead = x.shape[:-1]
    v = fwht(x.reshape(*lead, n // block, k, block // k))
    if k > 1:
        a = _small_on(k, x.device)
        v = torch.einsum("ik,...km->...im", a.t() if transpose else a, v)
    return (v * (1.0 / math.sqrt(block))).reshape(*lead, n)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random +-1 (int8) from a seed, on the CPU generator (the same on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int8) * 2 - 1).to(torch.int8)


def layer_seed(seed: int, name: str) -> int:
    """Each layer's signs come from the config's seed and the layer's name (deterministic, distinct)."""
    return zlib.crc32(f"{seed}:{name}".encode())


@dataclass(frozen=True)
class Rotation:
    """R = H S on a layer's inputs: ``signs`` (int8 +-1, n) and the Hadamard ``block`` size."""

    signs: torch.Tensor
    block: int

    @classmethod
    def for_layer(cls, n: int, seed: int, name: str, rotation_block: int | None = None) -> Rotation:
        return cls(random_signs(n, layer_seed(seed, name)), block_for(n, rotation_block, name))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """R x for row vectors x (..., n): the online input transform (fp32 inside, x's dtype out)."""
        s = self.signs.to(device=x.device, dtype=torch.float32)
        return hadamard(x.float() * s, self.block).to(x.dtype)

    def apply_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """R^T x for row vectors x (..., n)."""
        s = self.signs.to(device=x.device, dtype=torch.float32)
        return (hadamard(x.float(), self.block, transpose=True) * s).to(x.dtype)

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W' = W R^T (out x in): each row is rotated like an input."""
        return self.apply(w)

    def unrotate_weight(self, w_rotated: torch.Tensor) -> torch.Tensor:
        """W = W' R: the weight that acts on un-rotated inputs."""
        return self.apply_inverse(w_rotated)

    def rotate_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """R H R^T (symmetrized against rounding)."""
        rh = self.apply(self.apply(h).t())
        return 0.5 * (rh + rh.t())
