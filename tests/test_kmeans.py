"""Tests for lecturelib.kmeans: Lloyd's algorithm against brute force, fine-tuning, storage."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lecturelib.kmeans import (
    centroid_gradient,
    finetune_step,
    kmeans_quantize,
    kmeans_storage_bits,
    linear_storage_bits,
)
from lecturelib.lecture import W_LECTURE


def test_lecture_matrix_2bit_codebook_is_a_local_optimum():
    res = kmeans_quantize(W_LECTURE, num_bits=2)
    assert res.codebook.shape == (4,) and torch.all(res.codebook[1:] > res.codebook[:-1])
    # Every weight sits with its nearest centroid, and every centroid is its cluster's mean.
    nearest = (W_LECTURE[..., None] - res.codebook).abs().argmin(-1)
    assert torch.equal(nearest, res.labels)
    for k in range(4):
        assert res.codebook[k].item() == pytest.approx(W_LECTURE[res.labels == k].mean().item(), abs=1e-6)


def _best_1d_partition_sse(values, k):
    # 1-D optimal k-means partitions are contiguous in sorted order: brute force the cut points.
    v = sorted(values)
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(v)), k - 1):
        parts = [v[a:b] for a, b in zip((0,) + cuts, cuts + (len(v),))]
        best = min(best, sum(sum((x - sum(p) / len(p)) ** 2 for x in p) for p in parts))
    return best


@settings(max_examples=30, deadline=None, derandomize=True)
@given(vals=st.lists(st.floats(-5, 5, allow_nan=False), min_size=5, max_size=10, unique=True))
def test_kmeans_sse_close_to_optimal(vals):
    W = torch.tensor(vals)
    res = kmeans_quantize(W, num_bits=1)
    sse = float(((W - res.W_q) ** 2).sum())
    assert sse <= _best_1d_partition_sse(vals, 2) * 1.5 + 1e-5


def test_kmeans_beats_linear_on_lecture_matrix():
    from lecturelib.quantizers import choose_qparams, quantization_error

    km = kmeans_quantize(W_LECTURE, 2)
    lin = quantization_error(W_LECTURE, choose_qparams(W_LECTURE, 2)).item()
    assert torch.linalg.vector_norm(W_LECTURE - km.W_q).item() < lin


def test_centroid_gradient_groups_and_sums():
    labels = torch.tensor([[0, 1], [1, 2]])
    grad = torch.tensor([[0.5, -1.0], [2.0, 3.0]])
    assert centroid_gradient(labels, grad, 4).tolist() == [0.5, 1.0, 3.0, 0.0]


def test_finetune_reduces_reconstruction_loss():
    torch.manual_seed(0)
    W = torch.randn(16, 16)
    X = torch.randn(16, 64)
    target = W @ X
    res = kmeans_quantize(W, 2)
    losses = []
    for _ in range(20):
        cb = res.codebook.clone().requires_grad_(True)
        W_q = cb[res.labels]
        W_q.retain_grad()
        loss = ((W_q @ X - target) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        res = finetune_step(res, W_q.grad, lr=0.01)
    assert losses[-1] < losses[0]


def test_storage_numbers_from_the_lecture():
    assert kmeans_storage_bits(16, 2) == 160  # 4 B indices + 16 B codebook
    assert linear_storage_bits(16, 2) == 64
    assert 16 * 32 / kmeans_storage_bits(16, 2) == pytest.approx(3.2)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_bits must be an integer in 1..8"):
        kmeans_quantize(W_LECTURE, 0)
    with pytest.raises(ValueError, match="W must be non-empty"):
        kmeans_quantize(torch.empty(0))
    with pytest.raises(ValueError, match="W must contain only finite"):
        kmeans_quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="labels and grad_W must have the same shape"):
        centroid_gradient(torch.zeros(3, dtype=torch.long), torch.zeros(4), 2)
    with pytest.raises(ValueError, match=r"labels must lie in 0..1"):
        centroid_gradient(torch.tensor([0, 2]), torch.zeros(2), 2)
    with pytest.raises(ValueError, match="lr must be a positive finite"):
        finetune_step(kmeans_quantize(W_LECTURE), torch.zeros(4, 4), lr=-1.0)
