"""Tests of hqdit_utils.engine.hadamard: exact Hadamard matrices, random rotations, the fast transform."""
from __future__ import annotations

import math

import pytest
import torch

from hqdit_utils.engine.hadamard import (
    HadamardSpec,
    base_hadamard,
    block_diagonal_hadamard,
    fast_hadamard_transform,
    hadamard_factors,
    hadamard_matrix,
    hadamard_signs,
    is_supported,
    random_hadamard,
    rotate_input,
    rotate_output,
    rotate_weight,
    supported_sizes,
)

DIT_SIZES = [72, 144, 576, 1152, 4608]  # DiT-XL/2 (72, 1152, 4608) and the embedded model (144, 576)
SUPPORTED = supported_sizes(4608)


def _eye(n, dtype):
    return torch.eye(n, dtype=dtype)


# --- which sizes exist ------------------------------------------------------------------------------
def test_required_sizes_are_supported_and_built_by_paley():
    for b in (12, 20, 28, 36, 44, 52, 60):
        assert is_supported(b)
        p, base, name = hadamard_factors(b)
        assert (p, base) == (1, b) and name.startswith("paley")
    assert hadamard_factors(36) == (1, 36, "paley2(q=17)")
    for n in DIT_SIZES:
        p, b, _ = hadamard_factors(n)
        assert b == 36 and p * b == n and p & (p - 1) == 0
    assert hadamard_factors(1024) == (1024, 1, "sylvester")
    assert {n for n in SUPPORTED if n & (n - 1) == 0} == {2 ** k for k in range(13)}  # 1 … 4096


def test_every_base_factor_is_exactly_hadamard_int64():
    """B Bᵀ = b I in int64 for every dense factor any supported size ≤ 4608 uses (Paley I and II,
    prime and prime-power q)."""
    bases = sorted({hadamard_factors(n)[1] for n in SUPPORTED} - {1})
    assert {12, 20, 28, 36, 44, 52, 60} <= set(bases)
    for b in bases:
        h = base_hadamard(b)
        assert set(h.unique().tolist()) == {-1, 1}
        if b <= 60:  # int64 (slow, non-BLAS) for the small ones …
            h64 = h.to(torch.int64)
            assert torch.equal(h64 @ h64.t(), b * _eye(b, torch.int64)), b
        hf = h.to(torch.float64)  # … float64 for all: exact, since every sum is an integer ≤ b < 2^53
        assert torch.equal(hf @ hf.t(), b * _eye(b, torch.float64)), b


def test_dense_product_exact_small_and_dit_sizes():
    """H Hᵀ = n I exactly for every supported n ≤ 512 and for 576 and 1152. float32 products of ±1
    matrices are exact here: every partial sum is an integer of magnitude ≤ n < 2^24."""
    for n in [k for k in SUPPORTED if k <= 512] + [576, 1152]:  # includes Sylvester p ≤ 512
        h = hadamard_matrix(n, normalized=False, dtype=torch.float32)
        assert torch.equal(h @ h.t(), n * _eye(n, torch.float32)), n


def _freivalds_exact(h8: torch.Tensor, n: int, g: torch.Generator) -> bool:
    """Exact probe of ``H Hᵀ = n I`` on a ±1 matrix: ``H (Hᵀ V) == n V`` for random ±1 ``V``, in float32.
    Exact because every entry of ``Hᵀ V`` is an integer ≤ n < 2^24, and the second product is only
    trusted when ``n · max|Hᵀ V| < 2^24`` (asserted), so no partial sum is ever rounded. If
    ``E = H Hᵀ - n I`` has a non-zero row, one random ±1 vector misses it with probability ≤ 1/2
    (Freivalds), so 16 independent columns let a wrong matrix pass with probability ≤ 2^-16."""
    h = h8.to(torch.float32)
    v = (torch.randint(0, 2, (n, 16), generator=g) * 2 - 1).to(torch.float32)
    y = h.t() @ v
    assert float(y.abs().max()) * n < 2 ** 24
    return torch.equal(h @ y, n * v)


def test_every_supported_size_up_to_4608_exact():
    """H Hᵀ = n I exactly for every supported n ≤ 4608, by the Kronecker identity
    ``(S ⊗ B)(S ⊗ B)ᵀ = (S Sᵀ) ⊗ (B Bᵀ) = p I ⊗ b I = n I``: every n is ``Sylvester(p) ⊗ B`` with B an
    exactly checked base (int64, test above) and p ≤ 4096 a Sylvester order checked exactly (dense for
    p ≤ 512 in the test above, exact probes for 1024, 2048, 4096 here); the assembled integer matrix equals
    ``kron(S_p, B)`` for every n ≤ 1152; and the assembled matrices of the largest sizes (4096, 4608)
    get an exact probe of ``H Hᵀ = n I`` themselves."""
    assert 4608 in SUPPORTED
    g = torch.Generator().manual_seed(0)
    bases = {b for b in {hadamard_factors(n)[1] for n in SUPPORTED} if b > 1}
    for p in (1024, 2048):  # (4096 is probed below)
        assert _freivalds_exact(hadamard_matrix(p, normalized=False, dtype=torch.int8), p, g), p
    for n in SUPPORTED:
        p, b, _ = hadamard_factors(n)
        assert p * b == n and p & (p - 1) == 0 and p <= 4096 and (b == 1 or b in bases)
        if n <= 1152:
            h8 = hadamard_matrix(n, normalized=False, dtype=torch.int8)
            s = hadamard_matrix(p, normalized=False, dtype=torch.int8)
            assert torch.equal(h8, s if b == 1 else torch.kron(s, base_hadamard(b))), n
    for n in (4096, 4608):
        assert n in SUPPORTED
        assert _freivalds_exact(hadamard_matrix(n, normalized=False, dtype=torch.int8), n, g), n


# --- random rotation --------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [12, 36, 72, 144, 576, 1152])
def test_random_hadamard_orthonormal(n):
    q = random_hadamard(n, seed=7).to(torch.float64)  # the float32 matrix, checked in float64
    assert (q @ q.t() - _eye(n, torch.float64)).abs().max() < 1e-6
    assert (q.abs() - 1 / math.sqrt(n)).abs().max() < 1e-7


def test_random_hadamard_4608_orthonormal_rows():
    q = random_hadamard(4608, seed=7).to(torch.float64)  # seed 7: cached by the test below
    rows = q[::48]  # 96 rows spread over the matrix, against all rows
    gram = rows @ q.t()
    ref = _eye(4608, torch.float64)[::48]
    assert (gram - ref).abs().max() < 1e-6


def test_block_diagonal_orthonormal_and_structure():
    q = block_diagonal_hadamard(1152, 128, seed=1).to(torch.float64)
    assert (q @ q.t() - _eye(1152, torch.float64)).abs().max() < 1e-6
    assert torch.count_nonzero(q) == 1152 * 128
    assert q[:128, 128:].abs().sum() == 0


def test_seeds_deterministic_distinct_and_cached():
    a = random_hadamard(144, seed=5)
    assert random_hadamard(144, seed=5) is a  # lru cache
    assert torch.equal(a, HadamardSpec(144, seed=5).matrix())
    assert not torch.equal(a, random_hadamard(144, seed=6))
    s = hadamard_signs(144, 5)
    assert set(s.unique().tolist()) == {-1, 1}
    h = hadamard_matrix(144, normalized=True)
    torch.testing.assert_close(a, s.float()[:, None] * h, rtol=0, atol=1e-7)  # Q = diag(s) H / √n
    assert torch.equal(random_hadamard(144, seed=None), hadamard_matrix(144))


# --- fast transform ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    HadamardSpec(12, seed=0), HadamardSpec(20, seed=1), HadamardSpec(36, seed=None), HadamardSpec(64, seed=2),
    HadamardSpec(72, seed=3), HadamardSpec(144, seed=4), HadamardSpec(576, seed=5),
    HadamardSpec(1152, seed=6), HadamardSpec(4608, seed=7), HadamardSpec(1152, seed=8, block=128),
    HadamardSpec(576, seed=9, block=36), HadamardSpec(144, seed=1, normalized=False),
], ids=lambda s: f"n{s.n}-b{s.block}-s{s.seed}-{'norm' if s.normalized else 'int'}")
def test_fast_transform_equals_dense(spec):
    g = torch.Generator().manual_seed(spec.n)
    x = torch.randn(3, 5, spec.n, generator=g, dtype=torch.float64)
    if spec.n <= 1152:
        q, tol = spec.matrix(torch.float64), 1e-10
    else:  # the float32 matrix (cached, cheaper to build): its entries carry a 6e-8 relative rounding
        q, tol = spec.matrix(torch.float32).double(), 1e-6
    torch.testing.assert_close(fast_hadamard_transform(x, spec), x @ q, rtol=tol, atol=tol)
    torch.testing.assert_close(fast_hadamard_transform(x, spec, transpose=True), x @ q.t(), rtol=tol, atol=tol)
    x32 = x.float()
    torch.testing.assert_close(rotate_input(x32, spec), x32 @ q.float(), rtol=1e-5, atol=1e-5)


def test_fast_transform_keyword_form_and_dtypes():
    x = torch.randn(4, 1152, dtype=torch.float32)
    q = random_hadamard(1152, seed=11)
    torch.testing.assert_close(fast_hadamard_transform(x, 1152, seed=11), x @ q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_hadamard_transform(x, seed=11), x @ q, rtol=1e-5, atol=1e-5)
    xb = x.to(torch.bfloat16)
    yb = fast_hadamard_transform(xb, 1152, seed=11)
    assert yb.dtype == torch.bfloat16 and yb.shape == xb.shape
    with pytest.raises(ValueError):
        fast_hadamard_transform(x, 576)


def test_rotation_inverts():
    spec = HadamardSpec(4608, seed=2)
    x = torch.randn(8, 4608)
    back = rotate_input(rotate_input(x, spec), spec, transpose=True)
    torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


# --- the identity y = (xQ)(WQ)ᵀ + b -----------------------------------------------------------------
@pytest.mark.parametrize("n_in,n_out,use_spec", [(144, 576, True), (1152, 384, True), (1152, 384, False),
                                                 (576, 144, False)])
def test_rotation_leaves_linear_output_unchanged(n_in, n_out, use_spec):
    g = torch.Generator().manual_seed(n_in + n_out)
    lin = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=g) / math.sqrt(n_in))
        lin.bias.copy_(torch.randn(n_out, generator=g))
    x = torch.randn(2, 16, n_in, generator=g)
    x[..., 3] *= 40.0  # an outlier channel
    q = HadamardSpec(n_in, seed=0) if use_spec else random_hadamard(n_in, seed=0)
    y = lin(x)
    y_rot = torch.nn.functional.linear(rotate_input(x, q), rotate_weight(lin.weight.detach(), q), lin.bias)
    y = y.detach()
    torch.testing.assert_close(y_rot, y, rtol=1e-5, atol=1e-5 * float(y.abs().max()))


def test_rotation_folded_into_producer():
    """y Q = x (Qᵀ W)ᵀ + b Q; with a head-wise (block = head dim) rotation this is the fusable case."""
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(1152, 144, generator=g), torch.randn(1152, generator=g)
    x = torch.randn(7, 144, generator=g)
    for q in (HadamardSpec(1152, seed=3, block=72), random_hadamard(1152, seed=3)):
        w2, b2 = rotate_output(w, b, q)
        y = rotate_input(x @ w.t() + b, q)
        torch.testing.assert_close(x @ w2.t() + b2, y, rtol=1e-5, atol=1e-4)
    assert rotate_output(w, None, HadamardSpec(1152, seed=3))[1] is None


def _crest(t: torch.Tensor) -> torch.Tensor:
    """max|x| / RMS(x) per token (last dim)."""
    return t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()


@pytest.mark.parametrize("n,block", [(1152, None), (144, None), (1152, 128)])
def test_rotation_reduces_crest_factor_with_outlier_channels(n, block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, n, generator=g)
    outliers = torch.randperm(n, generator=g)[:6]
    x[:, outliers] *= 60.0
    spec = HadamardSpec(n, seed=1, block=block)
    xr = rotate_input(x, spec)
    before, after = _crest(x), _crest(xr)
    assert float(after.median()) < 0.35 * float(before.median())
    assert float(xr.abs().max() / xr.pow(2).mean().sqrt()) < 0.35 * float(x.abs().max() / x.pow(2).mean().sqrt())


# --- errors -----------------------------------------------------------------------------------------
def test_unsupported_size_lists_suggestions():
    with pytest.raises(ValueError) as e:
        hadamard_matrix(92)
    msg = str(e.value)
    assert "Supported sizes near 92" in msg and "88" in msg and "96" in msg
    assert "block_diagonal_hadamard(92, block=4)" in msg
    with pytest.raises(ValueError, match="multiple of 4"):
        random_hadamard(6, seed=0)
    with pytest.raises(ValueError, match="odd"):
        HadamardSpec(7)
    with pytest.raises(ValueError):
        hadamard_factors(0)
    with pytest.raises(ValueError, match="divide"):
        block_diagonal_hadamard(1152, 100)
    with pytest.raises(ValueError):
        rotate_weight(torch.zeros(4, 12), random_hadamard(36, seed=0))


def test_random_signs_act_before_the_mixing():
    """x Q must flip input signs *then* mix: with the signs after the mixing, |x Q| = |x H| and a
    sign-symmetric quantizer would ignore them. A constant offset shows the difference: H alone maps it
    onto a few output channels (one for a Sylvester order), D·H spreads it over all of them."""
    n = 144
    x = torch.ones(1, n)
    plain = (x @ hadamard_matrix(n, normalized=True)).abs()
    rotated = (x @ random_hadamard(n, seed=0)).abs()
    assert plain.max() > 0.75 * n ** 0.5 and int((plain > 1e-3).sum()) <= n // 4
    assert rotated.max() < plain.max() / 3 and int((rotated > 1e-3).sum()) > n // 2
    torch.testing.assert_close(fast_hadamard_transform(x, HadamardSpec(n, seed=0)), x @ random_hadamard(n, seed=0))


@pytest.mark.parametrize("n,seed,transpose", [(144, 3, False), (144, 3, True), (128, None, False), (576, 1, False)])
def test_fast_transform_under_autograd_gives_the_same_values_and_gradients(n, seed, transpose):
    """A rotated model must run outside torch.no_grad(): the transform records no out= ops when its input
    needs a gradient, and gives bit-identical values (same sums and products) and the exact gradient."""
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = HadamardSpec(n, seed=seed)
    ref = fast_hadamard_transform(x, spec, transpose=transpose)
    xg = x.clone().requires_grad_(True)
    y = fast_hadamard_transform(xg, spec, transpose=transpose)
    assert torch.equal(y.detach(), ref)
    g = torch.randn_like(y)
    y.backward(g)
    q = spec.matrix().to(torch.float64)
    expected = g @ (q if transpose else q.t())  # d(x Q)/dx applied to g is g Qᵀ
    assert torch.allclose(xg.grad, expected, atol=1e-10)


@pytest.mark.parametrize("n, transpose", [(128, False), (144, False), (4608, True)])
def test_rotation_compiles_with_torch_compile(n, transpose):
    """torch.compile (inductor) of the online rotation gives the eager result up to float rounding: compiled, the
    transform is a chain of small dense products (Sylvester factors of order ≤ 16: 128 = 16·8, 4608 = 16·8·36),
    not the butterfly. (It once failed on the out= fast path: "Cannot view a tensor with shape …".)"""
    x = torch.randn(32, n, generator=torch.Generator().manual_seed(0))
    eager = fast_hadamard_transform(x, n, seed=3, transpose=transpose)
    compiled = torch.compile(lambda t: fast_hadamard_transform(t, n, seed=3, transpose=transpose), dynamic=False)(x)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(compiled, fast_hadamard_transform(x, n, seed=4, transpose=transpose), atol=1e-3)
