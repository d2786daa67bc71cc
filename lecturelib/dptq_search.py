"""Finding a detrimental pair: the headline criteria, the seed search and a process pool for it.

D's training is fragile (see ``dptq``'s module docstring): with the same recipe, some seeds give a D
that keeps its full-precision accuracy and collapses under its own policy, others a D that is wrong in
full precision too. Notebook 09 therefore trains, per budget, R once and D with seeds s, s + 1, ...
until D's own training worked on the *validation* split (``d_trained``), at most a fixed number of
times. The budgets are independent searches, so ``run_pair_searches`` runs them in worker processes
(one thread each: on 2 cores two 1-thread trainings finish sooner than one 2-thread training).
Every trained network is a checkpoint; a search whose checkpoints exist only loads and evaluates them.
Used in: 09_dptq_catastrophic_failure
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from . import dptq

Tensor = torch.Tensor

GOALS = (
    "D loses >= 25 points",
    "R loses <= 2 points",
    "|R_fp - D_fp| <= 1 point",
    "D's own-policy drop >= 2x its random-policy drop",
    "several allocations used (R and D)",
)
"""The issue's headline criteria for one row of Table 1 (accuracies in points)."""


def _check_row(row: dict[str, Any]) -> None:
    need = ("R_fp", "R_drop", "D_fp", "D_drop", "D_random_drop", "distinct_allocations_R", "distinct_allocations_D")
    missing = [k for k in need if k not in row]
    if missing:
        raise ValueError(f"row must be a dptq.pair_row result with keys {need}; missing {missing}")


def goals(row: dict[str, Any]) -> dict[str, bool]:
    """Which headline criteria a Table-1 row meets: D drop >= 25, R drop <= 2, |R_fp - D_fp| <= 1,
    D drop >= 2 x max(random-policy drop, 0) (and > 0), more than one allocation used by each policy.

    Paper: Table 1 / Table 3 (D 24.4 vs random 5.6, R 0.2 in the paper's ResNet18).
    Used in: 09_dptq_catastrophic_failure
    """
    _check_row(row)
    flags = (
        row["D_drop"] >= 25,
        row["R_drop"] <= 2,
        abs(row["R_fp"] - row["D_fp"]) <= 1,
        row["D_drop"] > 0 and row["D_drop"] >= 2 * max(row["D_random_drop"], 0.0),
        min(row["distinct_allocations_R"], row["distinct_allocations_D"]) > 1,
    )
    return dict(zip(GOALS, flags))


def d_trained(row: dict[str, Any]) -> bool:
    """D's own training worked: full precision within 1 point of R's (or better) and a drop of >= 25
    points under its own policy. (The random-policy comparison is a property of the budget, so it does
    not make a search try another seed.)

    Used in: 09_dptq_catastrophic_failure
    """
    _check_row(row)
    return row["D_fp"] >= row["R_fp"] - 1 and row["D_drop"] >= 25


def val_score(row: dict[str, Any]) -> float:
    """Ranks rows on the validation split: D_drop - 2 max(D_random_drop, 0) - 10 max(R_drop - 2, 0)
    - 10 max(|R_fp - D_fp| - 1, 0). Higher is closer to the headline.

    Used in: 09_dptq_catastrophic_failure
    """
    _check_row(row)
    return float(row["D_drop"] - 2 * max(row["D_random_drop"], 0.0) - 10 * max(row["R_drop"] - 2, 0.0)
                 - 10 * max(abs(row["R_fp"] - row["D_fp"]) - 1, 0.0))


@dataclass
class PairSearch:
    """One budget's search: R once, D with each config in turn until ``d_trained`` on val."""

    model_name: str
    """A dptq.make_model name (the white box's architecture)."""
    white_box_state: dict[str, Tensor]
    """The white box's state_dict."""
    cfg_R: dptq.PairConfig
    """R's configuration."""
    cfg_Ds: list[dptq.PairConfig]
    """D's configurations, one per attempt (they differ in seed)."""
    path_R: str
    """R's checkpoint."""
    paths_D: list[str]
    """D's checkpoints, one per attempt."""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """Filled by run_pair_searches: per D attempt {'seed', 'val' (pair_row on val), 'd_trained'}."""


def _white_box(job: PairSearch, device: str = "cpu") -> tuple[torch.nn.Module, list[str]]:
    wb, names = dptq.make_model(job.model_name)
    wb.load_state_dict(job.white_box_state)
    return wb.to(device).eval(), names


def _search(job: PairSearch, X: Tensor, Xval: Tensor, yval: Tensor, seed: int,
            device: str = "cpu") -> list[dict[str, Any]]:
    wb, names = _white_box(job, device)
    R, _ = dptq.train_or_load_pair(wb, names, X, "robust", job.cfg_R, job.path_R)
    out = []
    for cfg, path in zip(job.cfg_Ds, job.paths_D):
        D, _ = dptq.train_or_load_pair(wb, names, X, "detrimental", cfg, path)
        val = dptq.pair_row(R, D, Xval, yval, seed=seed)
        out.append({"seed": cfg.seed, "val": val, "d_trained": d_trained(val)})
        if out[-1]["d_trained"]:
            break
    return out


def _search_in_worker(job: PairSearch, X: Tensor, Xval: Tensor, yval: Tensor, seed: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    return _search(job, X, Xval, yval, seed)


def run_pair_searches(jobs: list[PairSearch], X: Tensor, Xval: Tensor, yval: Tensor, workers: int = 2,
                      seed: int = 0, device: str = "cpu") -> list[tuple[dptq.PairResult, dptq.PairResult]]:
    """Run every search (in ``workers`` spawned processes, one thread each, when workers > 1; inline
    otherwise) and return, per job, R and the chosen D: the first attempt with d_trained, else the
    one with the best val_score. Each job's ``attempts`` is filled in.

    Workers are CPU only (the white box's state and the data travel by pickling); with device='cuda'
    use workers=1, and everything runs inline on the GPU.
    Results do not depend on ``workers`` beyond the thread count of the arithmetic (1 in a worker).
    Used in: 09_dptq_catastrophic_failure
    """
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if workers > 1 and str(device) != "cpu":
        raise ValueError(f"workers > 1 needs device='cpu' (got device={device!r}); use workers=1 on a GPU")
    for j in jobs:
        if len(j.cfg_Ds) != len(j.paths_D) or not j.cfg_Ds:
            raise ValueError(f"job {j.model_name}: cfg_Ds and paths_D must be non-empty and of equal length")
    if workers == 1 or len(jobs) == 1:
        logs = [_search(j, X, Xval, yval, seed, device) for j in jobs]
    else:
        ctx = multiprocessing.get_context("spawn")  # fork after OpenMP has run can hang the child
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx) as ex:
            futs = [ex.submit(_search_in_worker, j, X, Xval, yval, seed) for j in jobs]
            logs = [f.result() for f in futs]
    pairs = []
    for j, log in zip(jobs, logs):
        j.attempts = log
        best = max(range(len(log)), key=lambda i: (log[i]["d_trained"], val_score(log[i]["val"])))
        wb, names = _white_box(j, device)
        R, _ = dptq.train_or_load_pair(wb, names, X, "robust", j.cfg_R, j.path_R)
        D, _ = dptq.train_or_load_pair(wb, names, X, "detrimental", j.cfg_Ds[best], j.paths_D[best])
        pairs.append((R, D))
    return pairs
