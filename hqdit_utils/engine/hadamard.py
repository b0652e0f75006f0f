"""Hadamard matrices and the (random) Hadamard rotation used to spread activation outliers.

The identity behind the rotation (book/choices.md#choices-rotation)
-------------------------------------------------------------------
For a linear layer ``y = x Wᵀ + b`` (``x`` [..., in], ``W`` [out, in]) and any orthogonal ``Q`` [in, in]
(``Q Qᵀ = I``)::

    y = x Wᵀ + b = (x Q)(W Q)ᵀ + b          because  (x Q)(W Q)ᵀ = x Q Qᵀ Wᵀ = x Wᵀ.

So the weight is rotated once, offline (:func:`rotate_weight`: ``W → W Q``), and the activation is
rotated online at the layer input (:func:`rotate_input`: ``x → x Q``); in full precision the output is
unchanged, while the quantizers see tensors whose outlier channels have been spread over all channels.
HQ-DiT uses a *random* Hadamard matrix; here ``Q = diag(±1) · H / √n`` (:func:`random_hadamard`): for row
vectors ``x Q`` flips the signs of the input channels first and then mixes them. (With the signs on the
other side, ``|x H D| = |x H|`` element for element and a sign-symmetric grid ignores them.)

Which orders exist here
-----------------------
A Hadamard matrix ``H`` (entries ±1, ``H Hᵀ = n I``) can only have order 1, 2 or a multiple of 4. This
module builds, in code (no pasted tables):

* **Sylvester** matrices of order ``2^k``: ``H_1 = [1]``, ``H_2m = [[H_m, H_m], [H_m, -H_m]]``,
  i.e. ``H[i, j] = (-1)^popcount(i & j)``;
* **Paley I** matrices of order ``q + 1`` for a prime power ``q ≡ 3 (mod 4)`` (q = 3, 7, 11, 19, 23, 27, …);
* **Paley II** matrices of order ``2 (q + 1)`` for a prime power ``q ≡ 1 (mod 4)`` (q = 5, 9, 13, 17,
  25, 29, …) — e.g. **36 = 2·(17 + 1)**, which DiT needs;
* **Kronecker products** ``H_n = H_{2^k} ⊗ B`` of a Sylvester matrix and one Paley "base" ``B`` of order
  ``b ≤ MAX_BASE_ORDER``. For a given ``n = 2^a · m`` (``m`` odd) the base is the *smallest* constructible
  ``b = m · 2^j`` (so the cheap butterfly factor is as large as possible); Paley I is preferred to
  Paley II when both give ``b``.

DiT-XL/2 needs 1152 = 36·32 and 4608 = 36·128 (and 72 = 36·2); the embedded model 144 = 36·4 and
576 = 36·16. A size with no construction raises :class:`ValueError` that lists the supported sizes
near ``n`` and the nearest block-diagonal alternative (:func:`block_diagonal_hadamard`).

Fast transform
--------------
Because ``H_n = S ⊗ B`` (``S`` Sylvester of order ``p = 2^k``, ``B`` of order ``b``), ``x H_n`` for
``x`` [..., n] is computed by viewing ``x`` as [..., p, b], multiplying the last axis by ``B`` (dense,
``O(b)`` per element) and running a Walsh–Hadamard butterfly over the ``p`` axis (``log2 p`` add/subtract
passes). :func:`fast_hadamard_transform` equals ``x @ Q`` for the ``Q`` the dense functions return.

Choices that are ours, not the paper's (book/choices.md#choices-rotation): the full-order matrix built as
``Sylvester ⊗ order-36`` (rather than block-diagonal power-of-two blocks, kept as an option); one
length-``n`` sign vector drawn from a ``torch.Generator`` seeded with ``seed``; the order of the
Kronecker factors; the cap ``MAX_BASE_ORDER``. The paper's summaries state only that a random Hadamard
matrix is used; how it builds orders 1152 and 4608 is unknown.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Union

import numpy as np
import torch

__all__ = [
    "MAX_BASE_ORDER",
    "HadamardSpec",
    "hadamard_matrix",
    "random_hadamard",
    "block_diagonal_hadamard",
    "hadamard_signs",
    "hadamard_factors",
    "base_hadamard",
    "is_supported",
    "supported_sizes",
    "fast_hadamard_transform",
    "rotate_weight",
    "rotate_input",
    "rotate_output",
]

#: Largest order of the dense (non-power-of-two) Kronecker factor. Larger bases would exist (Paley works
#: for any prime power), but a dense factor above a few hundred makes the "fast" transform slow and the
#: exactness test expensive; every size DiT needs uses b = 36. Our choice.
MAX_BASE_ORDER = 256


# --------------------------------------------------------------------------------------------------
# Finite fields GF(p^k) (just enough for the quadratic character)
# --------------------------------------------------------------------------------------------------
def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k`` and ``p`` prime, or ``None``."""
    if q < 2:
        return None
    for p in range(2, q + 1):
        if q % p == 0:  # smallest prime factor
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 else None
    return None


def _poly_mulmod(a: list[int], b: list[int], mod: list[int], p: int) -> list[int]:
    """(a·b) mod ``mod`` over GF(p); polynomials are coefficient lists, lowest degree first; ``mod`` monic."""
    k = len(mod) - 1
    prod = [0] * (2 * k - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                prod[i + j] = (prod[i + j] + ai * bj) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce: x^k = -(mod[0] + … + mod[k-1] x^(k-1))
        c = prod[d]
        if c:
            for t in range(k + 1):
                prod[d - k + t] = (prod[d - k + t] - c * mod[t]) % p
    return prod[:k]


def _poly_divides(g: list[int], f: list[int], p: int) -> bool:
    """Whether the monic polynomial ``g`` divides ``f`` over GF(p)."""
    r = list(f)
    dg = len(g) - 1
    for d in range(len(r) - 1, dg - 1, -1):
        c = r[d]
        if c:
            for t in range(dg + 1):
                r[d - dg + t] = (r[d - dg + t] - c * g[t]) % p
    return not any(r[:dg])


def _irreducible_poly(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree ``k`` over GF(p) (brute force; p^k is small)."""
    def monic(deg: int):
        for idx in range(p ** deg):
            coeffs = [(idx // p ** t) % p for t in range(deg)]
            yield coeffs + [1]

    for f in monic(k):
        if f[0] == 0:
            continue
        if not any(_poly_divides(g, f, p) for d in range(1, k // 2 + 1) for g in monic(d)):
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _quadratic_character_table(q: int) -> tuple[np.ndarray, np.ndarray]:
    """For GF(q), q = p^k odd: ``(chi, sub)`` where ``chi[a]`` ∈ {0, 1, -1} is the quadratic character of
    element ``a`` and ``sub[a, c]`` the index of ``a - c``. Elements are indexed by their base-p digits
    (the coefficients of a polynomial modulo an irreducible one)."""
    p, k = _prime_power(q)  # type: ignore[misc]
    digits = np.array([[(a // p ** t) % p for t in range(k)] for a in range(q)], dtype=np.int64)
    weights = p ** np.arange(k, dtype=np.int64)
    sub = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    if k == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        mod = _irreducible_poly(p, k)
        squares = set()
        for a in range(1, q):
            sq = _poly_mulmod(list(digits[a]), list(digits[a]), mod, p)
            squares.add(int(np.dot(sq, weights)))
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int64)
    assert len(squares) == (q - 1) // 2
    return chi, sub


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix ``Q[i, j] = χ(a_i - a_j)`` of GF(q) (antisymmetric for q ≡ 3, symmetric for q ≡ 1 mod 4)."""
    chi, sub = _quadratic_character_table(q)
    return chi[sub]


def _paley1(q: int) -> np.ndarray:
    """Paley I, order q + 1 (q ≡ 3 mod 4): ``H = I + S`` with ``S = [[0, 1ᵀ], [-1, Q]]`` antisymmetric,
    ``S Sᵀ = q I``, hence ``H Hᵀ = I + S + Sᵀ + S Sᵀ = (q + 1) I``."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(n, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Paley II, order 2 (q + 1) (q ≡ 1 mod 4): from the symmetric conference matrix
    ``C = [[0, 1ᵀ], [1, Q]]`` (``C Cᵀ = q I``), ``H = C ⊗ [[1, -1], [-1, -1]] + I ⊗ [[1, 1], [1, -1]]``
    (every 0 of C becomes the first 2×2 block, every ±1 becomes ± the second)."""
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    b = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(c, a) + np.kron(np.eye(n, dtype=np.int64), b)


def _base_construction(b: int) -> str | None:
    """Name of the Paley construction of order ``b`` (not a power of two), or ``None``."""
    if b % 4 or b > MAX_BASE_ORDER:
        return None
    q = b - 1
    if q % 4 == 3 and _prime_power(q):
        return f"paley1(q={q})"
    if b % 2 == 0:
        q = b // 2 - 1
        if q % 4 == 1 and _prime_power(q):
            return f"paley2(q={q})"
    return None


@lru_cache(maxsize=None)
def base_hadamard(b: int) -> torch.Tensor:
    """The ±1 Paley Hadamard matrix of order ``b`` used as the dense Kronecker factor (int8, cached;
    do not modify in place)."""
    name = _base_construction(b)
    if name is None:
        raise ValueError(f"no Paley construction of order {b} (with b <= MAX_BASE_ORDER={MAX_BASE_ORDER})")
    q = int(name.split("=")[1].rstrip(")"))
    h = _paley1(q) if name.startswith("paley1") else _paley2(q)
    return torch.from_numpy(h.astype(np.int8))


# --------------------------------------------------------------------------------------------------
# Which sizes are supported
# --------------------------------------------------------------------------------------------------
def hadamard_factors(n: int) -> tuple[int, int, str]:
    """``(p, b, construction)`` with ``n = p · b``, ``H_n = Sylvester(p) ⊗ base(b)``.

    ``b = 1`` and construction ``"sylvester"`` for powers of two. Raises :class:`ValueError` (with
    the supported sizes near ``n`` and the nearest block-diagonal alternative) when no construction
    is available.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n!r}")
    found = _factors(int(n))
    if found is None:
        raise ValueError(_unsupported_message(int(n)))
    return found


_FACTORS: dict = {}  # n -> (p, b, construction) or None: a plain dict (a compiled graph reads it without tracing)


def _factors(n: int) -> tuple[int, int, str] | None:
    if n not in _FACTORS:
        _FACTORS[n] = _find_factors(n)
    return _FACTORS[n]


def _find_factors(n: int) -> tuple[int, int, str] | None:
    a, m = 0, n
    while m % 2 == 0:
        m //= 2
        a += 1
    if m == 1:
        return n, 1, "sylvester"
    for j in range(2, a + 1):
        b = m << j
        name = _base_construction(b)
        if name is not None:
            return n // b, b, name
    return None


def is_supported(n: int) -> bool:
    """Whether :func:`hadamard_matrix` can build order ``n``."""
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 and _factors(int(n)) is not None


def supported_sizes(upto: int, start: int = 1) -> list[int]:
    """Every supported order in ``[start, upto]``."""
    return [n for n in range(max(start, 1), upto + 1) if is_supported(n)]


def _unsupported_message(n: int) -> str:
    below = [k for k in range(n - 1, max(n - 400, 0), -1) if is_supported(k)][:3][::-1]
    above = [k for k in range(n + 1, n + 400) if is_supported(k)][:3]
    blocks = [d for d in range(n - 1, 1, -1) if n % d == 0 and is_supported(d)]
    if n % 4 and n > 2:
        why = "a Hadamard matrix has order 1, 2 or a multiple of 4"
    else:
        why = (f"no Sylvester ⊗ Paley construction (base order <= MAX_BASE_ORDER={MAX_BASE_ORDER}; "
               "Paley I needs q+1 with q ≡ 3 mod 4 a prime power, Paley II 2(q+1) with q ≡ 1 mod 4)")
    msg = f"no Hadamard matrix of order {n}: {why}. Supported sizes near {n}: {below + above}."
    if blocks:
        bl = blocks[0]
        msg += (f" Nearest block-diagonal alternative: block_diagonal_hadamard({n}, block={bl}) "
                f"({n // bl} blocks of order {bl}).")
    else:
        msg += f" No block-diagonal alternative with blocks larger than 1 exists ({n} is odd); pad the dimension."
    return msg


# --------------------------------------------------------------------------------------------------
# Dense matrices
# --------------------------------------------------------------------------------------------------
_SYLVESTER: dict = {}  # p -> int8 [p, p]: a plain dict (a compiled graph may build or read one)


def _sylvester(p: int) -> torch.Tensor:
    """Sylvester ±1 matrix of order ``p = 2^k`` as int8: ``H[i, j] = (-1)^popcount(i & j)`` (shared: do not modify)."""
    h = _SYLVESTER.get(p)
    if h is None:
        h = torch.ones(1, 1, dtype=torch.int8)
        two = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
        while h.shape[0] < p:
            h = torch.kron(two, h)
        if len(_SYLVESTER) >= 8:
            _SYLVESTER.clear()
        _SYLVESTER[p] = h
    return h


@lru_cache(maxsize=4)
def _integer_hadamard(n: int) -> torch.Tensor:
    p, b, _ = hadamard_factors(n)
    if b == 1:
        return _sylvester(p)
    return torch.kron(_sylvester(p), base_hadamard(b))


def hadamard_matrix(n: int, normalized: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Hadamard matrix of order ``n``: ``H`` (±1, ``H Hᵀ = n I``) or ``H / √n`` (orthogonal).

    ``H = Sylvester(p) ⊗ B`` with ``(p, b) = hadamard_factors(n)``. ``normalized=False`` with an integer
    ``dtype`` (e.g. ``torch.int64``) gives the exact ±1 matrix. A new tensor each call (built from a
    cached int8 copy).
    """
    h = _integer_hadamard(n).to(dtype)
    if normalized:
        if not dtype.is_floating_point:
            raise ValueError("normalized=True needs a floating dtype")
        h = h * (1.0 / math.sqrt(n))
    return h


_SIGNS: dict = {}  # (n, seed) -> int8 signs [n]: a plain dict, so torch.compile reads a drawn vector as a constant


def _signs_cached(n: int, seed: int) -> torch.Tensor:
    """The int8 signs [n] of ``seed`` (shared: do not modify). Drawn once per ``(n, seed)`` in eager code; a
    compiled forward finds them here (the rotated weights drew them), since a generator cannot be created inside
    a compiled graph."""
    signs = _SIGNS.get((n, seed))
    if signs is None:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        signs = (torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1).to(torch.int8)
        if len(_SIGNS) >= 64:
            _SIGNS.clear()
        _SIGNS[(n, seed)] = signs
    return signs


def hadamard_signs(n: int, seed: int | None) -> torch.Tensor:
    """The diagonal of ``D``: ``n`` random ±1 (int8) from ``torch.Generator().manual_seed(seed)``; all +1
    for ``seed=None``. Deterministic across runs and machines (CPU generator)."""
    if seed is None:
        return torch.ones(n, dtype=torch.int8)
    return _signs_cached(int(n), int(seed)).clone()


@lru_cache(maxsize=8)
def _random_hadamard_cached(n: int, seed: int | None, block: int | None, dtype: torch.dtype) -> torch.Tensor:
    k = n if block is None else block
    hk = hadamard_matrix(k, normalized=False, dtype=dtype)
    h = hk if block is None else torch.block_diag(*([hk] * (n // k)))
    d = (hadamard_signs(n, seed).to(torch.float64) / math.sqrt(k)).to(dtype)  # ±fl(1/√k), exact sign
    return h.mul_(d[:, None])  # diag(s) · H: the signs act on the input channels, before the mixing


def random_hadamard(n: int, seed: int | None = 0, *, block: int | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random orthogonal Hadamard rotation ``Q = diag(s) · H / √n`` of order ``n`` (``s`` = ±1 signs from
    ``seed``; ``seed=None``: no sign flips). With ``block=k``: ``Q = diag(s) · blockdiag(H_k, …, H_k) / √k``.
    ``x Q`` flips input-channel signs, then mixes (the randomised Hadamard transform of QuIP#/QuaRot).

    Cached on ``(n, seed, block, dtype)`` (an LRU of 8 matrices): the returned tensor is shared, so
    do not modify it in place (``.clone()`` first).
    """
    _check_block(n, block)
    return _random_hadamard_cached(int(n), None if seed is None else int(seed),
                                   None if block is None else int(block), dtype)


def block_diagonal_hadamard(n: int, block: int, seed: int | None = None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthogonal block-diagonal Hadamard ``diag(s) · blockdiag(H_block, …) / √block`` of order ``n``
    (``block`` must divide ``n`` and be supported). The option for sizes without a full-order
    construction, or to rotate only within groups of channels (``QuantRecipe.rotation_block``)."""
    if block is None:
        raise ValueError("block_diagonal_hadamard needs a block size")
    return random_hadamard(n, seed, block=block, dtype=dtype)


def _check_block(n: int, block: int | None) -> None:
    if block is None:
        hadamard_factors(n)
        return
    if block < 1 or n % block:
        raise ValueError(f"block size {block} must divide n = {n}")
    hadamard_factors(block)


# --------------------------------------------------------------------------------------------------
# A rotation as a value, and the fast transform
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HadamardSpec:
    """A rotation ``Q`` described by its recipe instead of its n×n entries.

    ``Q = diag(s) · H_n / √n`` (``block=None``) or ``diag(s) · blockdiag(H_block, …) / √block``,
    ``s = hadamard_signs(n, seed)`` (``seed=None``: no sign flips). ``normalized=False`` drops the
    ``1/√·`` factor (then ``Q`` is not orthogonal). Hashable, so it can key caches and be stored on a module.
    """

    n: int
    seed: int | None = 0
    block: int | None = None
    normalized: bool = True

    def __post_init__(self) -> None:
        _check_block(self.n, self.block)

    @property
    def order(self) -> int:
        """Order of each Hadamard block (``n`` for the full-order rotation)."""
        return self.n if self.block is None else self.block

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``Q`` [n, n] (a new tensor)."""
        if self.normalized:
            return random_hadamard(self.n, self.seed, block=self.block, dtype=dtype).clone()
        hk = hadamard_matrix(self.order, normalized=False, dtype=torch.float64)
        h = hk if self.block is None else torch.block_diag(*([hk] * (self.n // self.order)))
        return (h * hadamard_signs(self.n, self.seed).to(torch.float64)[:, None]).to(dtype)


_DENSE_CACHE: dict = {}


def _dense_factor(b: int, dtype: torch.dtype, device: torch.device, transpose: bool, sylvester: bool = False
                  ) -> torch.Tensor:
    """The Paley base of order ``b`` (or the Sylvester matrix of order ``b`` with ``sylvester=True``) in ``dtype`` on
    ``device``, from a plain dict (a compiled graph reads it as a constant)."""
    key = (b, dtype, str(device), transpose, sylvester)
    t = _DENSE_CACHE.get(key)
    if t is None:
        h = _sylvester(b) if sylvester else base_hadamard(b)
        t = (h.t() if transpose else h).to(dtype=dtype, device=device).contiguous()
        if len(_DENSE_CACHE) > 32:
            _DENSE_CACHE.clear()
        _DENSE_CACHE[key] = t
    return t


def _sylvester_butterfly_(y: torch.Tensor, p: int, buf: torch.Tensor | None = None) -> torch.Tensor:
    """``y`` [p, L] contiguous: multiply the leading ``p`` axis by the Sylvester matrix of order ``p``, with
    ``log2 p`` add/subtract passes ping-ponging between two buffers. The ``p`` axis is the *outer* one, so
    every add/subtract runs over contiguous stretches of at least ``L`` elements (with ``p`` inner, the
    stretches were as short as the dense factor, 36 floats, and the passes several times slower). May reuse
    ``y``'s storage and that of ``buf`` (a scratch tensor of ``y``'s shape); returns the result."""
    L = y.shape[1]
    if (y.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():  # no out= ops: same sums, new tensors
        h = 1
        while h < p:
            src = y.view(p // (2 * h), 2, h * L)
            a, c = src[:, 0], src[:, 1]
            y = torch.stack([a + c, a - c], dim=1).view(p, L)
            h *= 2
        return y
    buf = torch.empty_like(y) if buf is None else buf.view(y.shape)
    h = 1
    while h < p:
        src = y.view(p // (2 * h), 2, h * L)
        dst = buf.view(p // (2 * h), 2, h * L)
        a, c = src[:, 0], src[:, 1]
        torch.add(a, c, out=dst[:, 0])
        torch.sub(a, c, out=dst[:, 1])
        y, buf = buf, y
        h *= 2
    return y


def _integer_transform(x4: torch.Tensor, signs: torch.Tensor | None, k: int, transpose: bool) -> torch.Tensor:
    """``x4`` [R, nb, p, b] (``k = p·b``; ``nb`` blocks of order ``k`` per row) → ``(x4 · signs) @ H_k`` (or
    ``@ H_kᵀ``) per block, unnormalised, laid out as [p, R, nb, b]; ``signs`` [nb, p, b] or ``None``.

    The first pass (sign flips, or a copy) also moves the ``p`` axis to the front; the dense factor then
    multiplies the contiguous last axis and the butterfly runs over the leading axis."""
    R, nb, p, b = x4.shape
    src = x4.permute(2, 0, 1, 3)
    # autograd records no out= ops, and torch.compile mis-lays out= results: both take the same products here
    if (x4.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        xt = (src * signs.permute(1, 0, 2).unsqueeze(1) if signs is not None else src).contiguous()
    elif signs is not None:
        xt = torch.empty((p, R, nb, b), dtype=x4.dtype, device=x4.device)
        torch.mul(src, signs.permute(1, 0, 2).unsqueeze(1), out=xt)
    else:
        xt = src.contiguous()
    y, spare = xt.view(-1, b), None
    if b > 1:
        y = torch.matmul(y, _dense_factor(b, x4.dtype, x4.device, transpose))  # dense factor on the last axis
        spare = xt  # no longer needed: the butterfly's second buffer
    if p > 1:
        y = _sylvester_butterfly_(y.view(p, -1), p, spare)
    return y.view(p, R, nb, b)


#: Largest Sylvester factor :func:`_compiled_transform` applies as one dense product (larger ones are split).
_COMPILED_FACTOR = 16


def _compiled_transform(x4: torch.Tensor, signs: torch.Tensor | None, scale: float, transpose: bool) -> torch.Tensor:
    """The rotation as a compiled graph computes it: ``x4`` [R, nb, p, b] → ``(x4 · signs) H_k · scale`` (or
    ``(x4 H_kᵀ) · signs · scale``) per block, contiguous, as a chain of small dense products, one per Kronecker
    factor (``H_k = S_p ⊗ B``, and ``S_p = S_q1 ⊗ S_q2 ⊗ …`` with ``q ≤ 16`` since ``S_2a ⊗ S_2b = S_2(a+b)``):
    ``B`` on the last axis, each ``S_q`` (symmetric) from the left on its axis, so that every product writes the
    caller's layout. A graph compiler fuses the sign flips and the scale into the surrounding element-wise work,
    which the butterfly's many passes prevent. Equal to the eager transform up to float rounding (its sums run
    in another order)."""
    R, nb, p, b = x4.shape
    y = x4
    if signs is not None and not transpose:
        y = y * (signs * scale if scale != 1.0 else signs).view(nb, p, b)
    elif scale != 1.0 and signs is None:
        y = y * scale
    if b > 1:
        y = y @ _dense_factor(b, y.dtype, y.device, transpose)
    outer, rest = R * nb, p * b
    while rest > b:  # the Sylvester factor, split into factors of order <= _COMPILED_FACTOR (high bits first)
        q = min(rest // b, _COMPILED_FACTOR)
        rest //= q
        y = _dense_factor(q, y.dtype, y.device, False, sylvester=True) @ y.reshape(outer, q, rest)
        outer *= q
    y = y.reshape(R, nb, p, b)
    if signs is not None and transpose:
        y = y * (signs * scale if scale != 1.0 else signs).view(nb, p, b)
    return y


def fast_hadamard_transform(
    x: torch.Tensor,
    spec: "HadamardSpec | int | None" = None,
    *,
    seed: int | None = None,
    block: int | None = None,
    normalized: bool = True,
    transpose: bool = False,
) -> torch.Tensor:
    """Apply a Hadamard rotation to the last dimension: ``x @ Q`` (or ``x @ Qᵀ`` with ``transpose=True``).

    Args:
        x: [..., n] floating tensor, any device. float16/bfloat16 are computed in float32 and cast back.
        spec: a :class:`HadamardSpec`, or the order ``n`` (then ``seed``/``block``/``normalized`` describe
            ``Q``), or ``None`` for ``n = x.shape[-1]``. With an int/None, ``seed=None`` means no sign flips
            (plain ``H/√n``); pass the same seed as to :func:`random_hadamard` to get its ``Q``.
        transpose: apply ``Qᵀ = Q⁻¹`` instead (undo a rotation).

    Returns the same shape and dtype as ``x``; equals ``x @ spec.matrix()`` up to float rounding.
    Cost per row: ``n·b`` multiply-adds for the dense factor plus ``n·log2(p)`` adds (``n = p·b``),
    against ``n²`` for the dense product.
    """
    if not isinstance(spec, HadamardSpec):
        n = x.shape[-1] if spec is None else int(spec)
        spec = HadamardSpec(n, seed=seed, block=block, normalized=normalized)
    n = spec.n
    if x.shape[-1] != n:
        raise ValueError(f"last dimension of x is {x.shape[-1]}, the rotation has order {n}")
    if not torch.is_floating_point(x):
        raise ValueError(f"fast_hadamard_transform needs a floating tensor, got {x.dtype}")
    dtype = x.dtype
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    k = spec.order
    p, b, _ = hadamard_factors(k)
    x4 = x.reshape(-1, n // k, p, b).to(work)
    signs = None
    if spec.seed is not None:
        signs = _signs_cached(n, int(spec.seed)).to(device=x.device, dtype=work)
    scale = 1.0 / math.sqrt(k) if spec.normalized else 1.0
    if torch.compiler.is_compiling():
        return _compiled_transform(x4, signs, scale, transpose).reshape(x.shape).to(dtype)
    # x Q = ((x · s) H) / √k: the signs act in the first pass of the transform
    yt = _integer_transform(x4, None if transpose else signs.view(-1, p, b) if signs is not None else None,
                            k, transpose)
    yp = yt.permute(1, 2, 0, 3)  # back to [R, nb, p, b]: the last pass writes the caller's layout
    if (yp.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():  # no out= ops: same products
        if transpose and signs is not None:
            y = yp * (signs * scale if scale != 1.0 else signs).view(-1, p, b)
        else:
            y = yp * scale if scale != 1.0 else yp
        return y.contiguous().reshape(x.shape).to(dtype)
    y = torch.empty_like(x4)
    if transpose and signs is not None:  # x Qᵀ = (x Hᵀ) · s / √k
        torch.mul(yp, (signs * scale if scale != 1.0 else signs).view(-1, p, b), out=y)
    elif scale != 1.0:
        torch.mul(yp, scale, out=y)
    else:
        y.copy_(yp)
    return y.reshape(x.shape).to(dtype)


RotationLike = Union[torch.Tensor, HadamardSpec]


def _apply(t: torch.Tensor, q: RotationLike, transpose: bool) -> torch.Tensor:
    if isinstance(q, HadamardSpec):
        return fast_hadamard_transform(t, q, transpose=transpose)
    if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[0] != q.shape[1]:
        raise TypeError("the rotation must be a square tensor Q [n, n] or a HadamardSpec")
    if t.shape[-1] != q.shape[0]:
        raise ValueError(f"last dimension {t.shape[-1]} does not match the rotation's order {q.shape[0]}")
    qq = q.to(device=t.device, dtype=t.dtype)
    return t @ (qq.t() if transpose else qq)


def rotate_weight(weight: torch.Tensor, q: RotationLike, *, transpose: bool = False) -> torch.Tensor:
    """Offline side of the rotation: ``W`` [out, in] → ``W Q`` [out, in].

    With :func:`rotate_input` this keeps a linear layer's output unchanged::

        y = x Wᵀ + b = (x Q)(W Q)ᵀ + b        (Q Qᵀ = I)

    ``q`` is a dense ``Q`` [in, in] or a :class:`HadamardSpec` (then the fast transform runs on the rows
    of ``W``). The bias is untouched. Call it on the full-precision weight, *before* format selection,
    clipping and GPTQ (our default order, book/choices.md#choices-order).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    return _apply(weight, q, transpose)


def rotate_input(x: torch.Tensor, q: RotationLike, *, transpose: bool = False) -> torch.Tensor:
    """Online side of the rotation: ``x`` [..., in] → ``x Q`` [..., in] (see :func:`rotate_weight` for the
    identity). A :class:`HadamardSpec` uses :func:`fast_hadamard_transform`; a dense ``Q`` a matmul.
    ``transpose=True`` applies ``Qᵀ`` (undoes the rotation)."""
    return _apply(x, q, transpose)


def rotate_output(weight: torch.Tensor, bias: torch.Tensor | None, q: RotationLike
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a rotation into the layer that *produces* the activation: for ``y = x Wᵀ + b``,
    ``y Q = x (Qᵀ W)ᵀ + b Q``, so returns ``(Qᵀ W, b Q)`` (``W`` [out, in], ``Q`` [out, out]).

    This is the "fused where the graph allows it" option (book/choices.md#choices-rotation): it is valid only when
    nothing non-linear or sample-dependent sits between the producer and the consumer. In a DiT block
    that excludes ``qkv`` and ``fc1`` (adaLN modulation in between) and ``fc2`` (GELU); for ``attn.proj``
    a *head-wise* rotation (block-diagonal with one block per head, e.g. ``HadamardSpec(1152, block=72)``
    for DiT-XL/2's 16 heads of 72) commutes with the attention weights and can be folded into the value
    rows of ``qkv`` — a full-order rotation cannot. Our default stays the online rotation.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
    w_rot = _apply(weight.t(), q, False).t().contiguous()  # (Wᵀ Q)ᵀ = Qᵀ W
    b_rot = None if bias is None else _apply(bias.reshape(1, -1), q, False).reshape(-1)
    return w_rot, b_rot
