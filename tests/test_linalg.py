"""The small dense algebra every rule shares."""

from __future__ import annotations

import torch
from helpers import make_pair

from lowrank_opt import linalg
from lowrank_opt.views import view_of


def _spd(r: int, seed: int) -> torch.Tensor:
    x = torch.randn(r, 2 * r, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return x @ x.T


def test_packed_blocks_round_trip_and_congruence():
    r, l = 4, 7
    triu = linalg.triu_indices(r)
    blocks = torch.stack([_spd(r, j) for j in range(l)])
    packed = linalg.pack_blocks(blocks, triu)
    assert packed.shape == (l, r * (r + 1) // 2)
    assert torch.equal(linalg.unpack_blocks(packed, triu, r), blocks)
    t = torch.randn(2, r, r, dtype=torch.float64)  # a group of two members, each with its own T
    stacked = torch.stack([packed, 2 * packed])
    linalg.congruence_packed_(stacked, t, triu, block_cols=3)
    for member, factor in enumerate((1, 2)):
        expected = factor * t[member] @ blocks @ t[member].T
        assert torch.allclose(linalg.unpack_blocks(stacked[member], triu, r), expected, rtol=1e-12)


def test_quadratic_form_rows_give_f_q_f_in_one_gemm():
    r, k, l = 3, 6, 5
    f = torch.randn(k, r, dtype=torch.float64)
    triu = linalg.triu_indices(r)
    blocks = torch.stack([_spd(r, j) for j in range(l)])
    expected = torch.einsum("ia,jab,ib->ij", f, blocks, f)
    got = linalg.quadratic_form_rows(f, triu) @ linalg.pack_blocks(blocks, triu).T
    assert torch.allclose(got, expected, rtol=1e-12)
    g = torch.randn(r, l, dtype=torch.float64)
    assert torch.allclose(linalg.unpack_blocks(linalg.pack_outer(g, triu), triu, r), torch.einsum("aj,bj->jab", g, g))


def test_damped_solve_is_exact_at_full_rank_and_zero_on_a_zero_gram():
    gram = _spd(5, 0)
    rhs = torch.randn(5, 3, dtype=torch.float64)
    solved = linalg.damped_inverse(gram) @ rhs
    assert torch.allclose(gram @ solved, rhs, rtol=1e-12, atol=1e-12)
    for dtype in (torch.float32, torch.float64):
        inverse = linalg.damped_inverse(torch.zeros(3, 4, 4, dtype=dtype))  # a batch of zero Grams
        assert torch.isfinite(inverse).all()
        out = inverse @ torch.zeros(3, 4, 2, dtype=dtype)
        assert torch.equal(out, torch.zeros_like(out))


def test_zero_factor_gives_zero_coefficient_gradient():
    pair = make_pair(6, 5, 2, zero_b=True)
    view = view_of(pair, "a")  # basis b = 0
    g_hat = view.rescale(torch.zeros(1, 2, 5, dtype=torch.float64))
    assert torch.equal(g_hat, torch.zeros_like(g_hat))
    assert view.full_sq_norm(g_hat) == 0


def test_rescaled_gradient_is_the_projected_full_gradient():
    m, n, r, s = 7, 6, 3, 2.5
    pair = make_pair(m, n, r, scale=s, seed=4)
    grad_w = torch.randn(m, n, dtype=torch.float64)
    for side, grad, full in (("a", s * pair.b.T @ grad_w, grad_w), ("b", s * grad_w @ pair.a.T, grad_w.T)):
        view = view_of(pair, side)
        f = view.basis[0]
        projector = f @ torch.linalg.solve(f.T @ f, f.T)
        g_hat = view.rescale(grad.detach()[None])
        assert torch.allclose(s * f @ g_hat[0], projector @ full, rtol=1e-10)
        assert torch.allclose(view.full_sq_norm(g_hat)[0], (projector @ full).pow(2).sum(), rtol=1e-10)
        assert linalg.compute_dtype(torch.bfloat16) == torch.float32


def test_transport_is_identity_when_the_basis_did_not_move():
    c = torch.randn(3, 8, dtype=torch.float64)
    gram = c @ c.T
    t = linalg.transport(gram, gram)
    assert torch.allclose(t, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_transient_blocks_are_a_multiple_of_the_factors_within_the_device_bounds():
    for device, (floor, ceiling) in (
        (torch.device("cpu"), linalg.CPU_TRANSIENT_BOUNDS),
        (torch.device("cuda"), linalg.ACCELERATOR_TRANSIENT_BOUNDS),
    ):
        assert linalg.transient_elements(10, device) == floor  # tiny pairs: the floor
        served = floor  # four times this lies between the floor and the ceiling
        assert linalg.transient_elements(served, device) == linalg.TRANSIENT_MULTIPLE * served
        assert linalg.transient_elements(2**30, device) == ceiling
