"""Hadamard matrices of the sizes LLaMA-family models use, and the randomized orthogonal rotations built on them.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``; ``H / √n`` is orthogonal and spreads
every coordinate's mass evenly over all coordinates, which is what incoherence processing wants: a weight
outlier along one input channel becomes n small ones (QuaRot, Ashkboos et al. 2024, arXiv:2404.00456, §3;
QuIP#, Tseng et al. 2024, arXiv:2402.04396, on randomized Hadamard transforms).

Orders are built as ``H_{2^k} ⊗ H_m``: Sylvester's construction for powers of two, and Paley's two
constructions for the odd part (R. E. A. C. Paley, "On orthogonal matrices", J. Math. Phys. 12, 1933):

- Paley I, ``m = q + 1`` for a prime ``q ≡ 3 (mod 4)`` (12, 20, 24, 32, 44, ...);
- Paley II, ``m = 2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (12, 28, 36, 60, ...).

That covers 576 (SmolLM2-135M: 16 · 36), 5120 (LLaMA-2-13B: 256 · 20), every power of two (LLaMA-2-7B, LLaMA-3-8B
hidden sizes and head dimensions), and most others; an order none of them reaches is refused by name.

>>> H = hadamard(576); bool(((H @ H.T) == 576 * torch.eye(576, dtype=H.dtype)).all())
True
"""

from __future__ import annotations

import functools

import torch

from almak.errors import AlmakError

__all__ = ["hadamard", "random_hadamard"]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) over GF(q): +1 for a non-zero square, −1 for a non-square, 0 on the diagonal."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley_core(q: int, sign: int) -> torch.Tensor:
    """The (q+1)-square conference-type matrix [[0, 1ᵀ], [sign·1, Q]]."""
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = sign
    S[1:, 1:] = _jacobsthal(q)
    return S


def _odd_part(m: int) -> torch.Tensor | None:
    """A Hadamard matrix of order m from Paley I or II, or None when neither reaches m."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:  # Paley I: I + S with S skew-symmetric
        return torch.eye(m, dtype=torch.float64) + _paley_core(m - 1, -1)
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:  # Paley II: S symmetric
        S = _paley_core(m // 2 - 1, 1)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(S, one) + torch.kron(torch.eye(m // 2, dtype=torch.float64), zero)
    return None


@functools.lru_cache(maxsize=8)
def _hadamard(n: int) -> torch.Tensor:
    if n < 1:
        raise AlmakError(f"a Hadamard matrix needs a positive order, got {n}")
    two = n & -n  # the largest power of two dividing n
    for k in range(two.bit_length() - 1, -1, -1):  # the largest power-of-two factor that leaves a Paley order
        core = _odd_part(n >> k)
        if core is not None:
            H = core
            for _ in range(k):
                H = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), H)
            if not torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64)):  # a wrong construction, never data
                raise AssertionError(f"Hadamard construction of order {n} is not orthogonal")
            return H
    raise AlmakError(f"no Hadamard matrix of order {n} is built here (orders 2^k · m with m = 1, a prime ≡ 3 mod 4 "
                     f"plus 1, or twice a prime ≡ 1 mod 4 plus 2); the rotation cannot be applied to size {n}")


def hadamard(n: int) -> torch.Tensor:
    """A Hadamard matrix of order ``n`` (float64, entries ±1, ``H Hᵀ = n I``); AlmakError where none is built."""
    return _hadamard(n).clone()


def random_hadamard(n: int, generator: torch.Generator) -> torch.Tensor:
    """The orthogonal ``diag(s) H / √n`` with random signs ``s`` (float64): a randomized Hadamard rotation.

    >>> Q = random_hadamard(64, torch.Generator().manual_seed(0)); torch.allclose(Q @ Q.T, torch.eye(64, dtype=Q.dtype))
    True
    """
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return signs[:, None] * _hadamard(n) / n**0.5
