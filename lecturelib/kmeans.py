"""K-means (codebook) weight quantization with centroid fine-tuning, and storage accounting.

Scope: the "K-Means-based Quantization" column of the lecture's storage/computation table.
Weights are replaced by an N-bit index into a floating-point codebook of 2^N centroids;
arithmetic stays in floating point. Fine-tuning groups the weight gradients by index and
moves each centroid by the summed gradient of its group:

    c_k <- c_k - lr * sum_{i : label_i = k} dL/dW_i

Paper: Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding", ICLR 2016 (arXiv:1510.00149).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .quantizers import check_bits, check_tensor

Tensor = torch.Tensor


@dataclass(frozen=True)
class KMeansResult:
    """A codebook quantization of one weight tensor."""

    codebook: Tensor
    """float32 centroids, shape (2^num_bits,), sorted ascending."""
    labels: Tensor
    """int64 index of each weight's centroid, same shape as the weights."""
    iterations: int
    """Lloyd iterations run until the labels stopped changing (or the cap)."""

    @property
    def W_q(self) -> Tensor:
        """The reconstructed weights: W_q = codebook[labels]."""
        return self.codebook[self.labels]


def kmeans_quantize(W: Tensor, num_bits: int = 2, max_iter: int = 100) -> KMeansResult:
    """Cluster the weights into 2^N centroids with Lloyd's algorithm (deterministic).

    Initialization is linear: centroids evenly spaced over [min W, max W], which Deep Compression
    found best because it keeps the rare large weights. Then repeat until labels are stable:
        label_i = argmin_k |W_i - c_k|,     c_k = mean{W_i : label_i = k}
    An empty cluster keeps its previous centroid.
    Paper: Han et al. 2016, section 3.1-3.2.
    Used in: 01_linear_quantization.
    """
    check_tensor(W, "W")
    check_bits(num_bits, 1, 8)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    w = W.detach().float().flatten()
    k = 2**num_bits
    codebook = torch.linspace(float(w.min()), float(w.max()), k)
    labels = torch.full_like(w, -1, dtype=torch.int64)
    it = 0
    for it in range(1, max_iter + 1):
        new_labels = (w[:, None] - codebook[None, :]).abs().argmin(dim=1)  # (n,)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
        sums = torch.zeros(k).index_add_(0, labels, w)
        counts = torch.bincount(labels, minlength=k).float()
        codebook = torch.where(counts > 0, sums / counts.clamp(min=1), codebook)
    order = torch.argsort(codebook)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    return KMeansResult(codebook[order], rank[labels].reshape(W.shape), it)


def centroid_gradient(labels: Tensor, grad_W: Tensor, num_centroids: int) -> Tensor:
    """Group the weight gradients by centroid and sum each group.

    g_k = sum_{i : label_i = k} dL/dW_i      (the "group by, reduce" step of the fine-tuning slide)
    Paper: Han et al. 2016, section 3.3 (eq. 3).
    Used in: 01_linear_quantization.
    """
    check_tensor(grad_W, "grad_W")
    if labels.shape != grad_W.shape:
        raise ValueError(f"labels and grad_W must have the same shape, got {tuple(labels.shape)} and {tuple(grad_W.shape)}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if int(labels.min()) < 0 or int(labels.max()) >= num_centroids:
        raise ValueError(f"labels must lie in 0..{num_centroids - 1}, got {int(labels.min())}..{int(labels.max())}")
    return torch.zeros(num_centroids).index_add_(0, labels.flatten().long(), grad_W.detach().flatten().float())


def finetune_step(result: KMeansResult, grad_W: Tensor, lr: float) -> KMeansResult:
    """One centroid fine-tuning step: c <- c - lr * g, with g from ``centroid_gradient``.

    The labels (which weight uses which centroid) stay fixed; only the codebook trains.
    Paper: Han et al. 2016, section 3.3.
    Used in: 01_linear_quantization.
    """
    if not lr > 0 or lr != lr or lr == float("inf"):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    g = centroid_gradient(result.labels, grad_W, result.codebook.numel())
    return KMeansResult(result.codebook - lr * g, result.labels, result.iterations)


def kmeans_storage_bits(num_weights: int, num_bits: int, codebook_bits: int = 32) -> int:
    """Bits to store a k-means quantized tensor: n * N (indices) + 2^N * codebook_bits (codebook).

    The lecture's 4x4 example at 2 bits: 16 * 2 + 4 * 32 = 160 bits = 20 bytes, vs 512 bits in fp32.
    Paper: Han et al. 2016.
    Used in: 01_linear_quantization.
    """
    check_bits(num_bits, 1, 32)
    return num_weights * num_bits + 2**num_bits * codebook_bits


def linear_storage_bits(num_weights: int, num_bits: int, num_scales: int = 1, scale_bits: int = 32,
                        zero_point_bits: int = 0) -> int:
    """Bits to store a linearly quantized tensor: n * N + num_scales * (scale_bits + zero_point_bits).

    Symmetric quantization stores no zero point (zero_point_bits = 0).
    Paper: Jacob et al. 2018.
    Used in: 01_linear_quantization, 02_granularity.
    """
    check_bits(num_bits, 1, 32)
    return num_weights * num_bits + num_scales * (scale_bits + zero_point_bits)


@dataclass(frozen=True)
class CodebookFinetuneResult:
    """A model whose weight matrices were k-means quantized, then had their centroids trained."""

    model: torch.nn.Module
    """A copy of the input model holding the final codebook[labels] weights (biases unchanged)."""
    codebooks: dict[str, KMeansResult]
    """Final codebook and labels of every quantized weight, by parameter name."""
    loss_history: list[float]
    """Training loss at each step."""
    eval_history: list[tuple[int, float]]
    """(step, accuracy on the eval set), step 0 being before any fine-tuning."""


def kmeans_finetune(model: torch.nn.Module, X: Tensor, y: Tensor, X_eval: Tensor, y_eval: Tensor,
                    num_bits: int = 2, steps: int = 100, lr: float = 1e-3, batch_size: int = 128,
                    eval_every: int = 10, seed: int = 0) -> CodebookFinetuneResult:
    """K-means quantize every ``*.weight`` of ``model``, then train only the centroids with SGD.

    W_q = c[labels];  c <- c - lr * sum_{i: label_i = k} dL/dW_q,i  (autograd through the gather
    c[labels] produces exactly this grouped sum). Labels never change; biases stay float and frozen.
    The input model is not modified.
    Paper: Han et al. 2016, section 3.3 ("trained quantization").
    Used in: 01_linear_quantization.
    """
    import copy

    from torch.func import functional_call

    if steps < 0 or batch_size < 1 or eval_every < 1:
        raise ValueError(f"steps must be >= 0, batch_size and eval_every >= 1, got {steps}, {batch_size}, {eval_every}")
    base = {n: p.detach() for n, p in model.named_parameters()}
    names = [n for n in base if n.endswith("weight")]
    km = {n: kmeans_quantize(base[n], num_bits) for n in names}
    books = {n: km[n].codebook.clone().requires_grad_(True) for n in names}
    opt = torch.optim.SGD(list(books.values()), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)

    def params() -> dict[str, Tensor]:
        return {**base, **{n: books[n][km[n].labels] for n in names}}

    def evaluate() -> float:
        with torch.no_grad():
            return float((functional_call(model, params(), (X_eval,)).argmax(1) == y_eval).float().mean())

    losses, evals = [], [(0, evaluate())]
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(X), (batch_size,), generator=g)
        opt.zero_grad()
        loss = loss_fn(functional_call(model, params(), (X[idx],)), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            evals.append((step, evaluate()))
    out = copy.deepcopy(model)
    final = {n: KMeansResult(books[n].detach().clone(), km[n].labels, km[n].iterations) for n in names}
    out.load_state_dict({**base, **{n: final[n].W_q for n in names}})
    return CodebookFinetuneResult(out, final, losses, evals)
