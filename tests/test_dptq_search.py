"""The headline criteria and the seed search of notebook 09 (lecturelib.dptq_search)."""

from pathlib import Path

import pytest
import torch

from lecturelib import dptq
from lecturelib import dptq_search as S

ROW = {"R_fp": 98.0, "R_drop": 0.5, "D_fp": 97.5, "D_drop": 80.0, "D_random_drop": 20.0,
       "distinct_allocations_R": 5, "distinct_allocations_D": 3}


def test_goals_pass_and_each_criterion_can_fail():
    assert all(S.goals(ROW).values()) and list(S.goals(ROW)) == list(S.GOALS)
    fails = {
        "D loses >= 25 points": {"D_drop": 24.9, "D_random_drop": 5.0},
        "R loses <= 2 points": {"R_drop": 2.1},
        "|R_fp - D_fp| <= 1 point": {"D_fp": 96.9},
        "D's own-policy drop >= 2x its random-policy drop": {"D_random_drop": 40.1},
        "several allocations used (R and D)": {"distinct_allocations_D": 1},
    }
    for goal, change in fails.items():
        g = S.goals({**ROW, **change})
        assert not g[goal] and sum(g.values()) == len(S.GOALS) - 1, goal
    assert S.goals({**ROW, "D_random_drop": -5.0})["D's own-policy drop >= 2x its random-policy drop"]
    with pytest.raises(ValueError, match="D_drop"):
        S.goals({"R_fp": 1.0})


def test_d_trained_ignores_the_random_policy_and_val_score_ranks():
    assert S.d_trained(ROW) and S.d_trained({**ROW, "D_random_drop": 70.0})
    assert not S.d_trained({**ROW, "D_fp": 20.0, "D_drop": 5.0})  # D wrong in full precision too
    assert not S.d_trained({**ROW, "D_drop": 10.0})
    assert S.val_score(ROW) == pytest.approx(80 - 40)
    assert S.val_score({**ROW, "D_fp": 95.0}) == pytest.approx(80 - 40 - 10 * 2)
    assert S.val_score({**ROW, "R_drop": 3.0}) == pytest.approx(80 - 40 - 10)


def _jobs(tmp_path, n_jobs=2, attempts=2):
    torch.manual_seed(0)
    wb, names = dptq.make_model("cnn4")
    o = [3, 4, 5]
    jobs = []
    for j in range(n_jobs):
        budget = 15 + j
        mk = lambda seed: dptq.PairConfig(options=o, budget=budget, epochs=1, batch_size=16, seed=seed)
        jobs.append(S.PairSearch("cnn4", wb.state_dict(), mk(0), [mk(s) for s in range(attempts)],
                                 str(tmp_path / f"R{j}.pt"), [str(tmp_path / f"D{j}_{s}.pt") for s in range(attempts)]))
    g = torch.Generator().manual_seed(0)
    return jobs, torch.rand(32, 1, 8, 8, generator=g), torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_search_tries_every_seed_until_d_trained_and_reloads(tmp_path, monkeypatch):
    jobs, X, Xv, yv = _jobs(tmp_path)
    torch.set_num_threads(1)
    pairs = S.run_pair_searches(jobs, X, Xv, yv, workers=1)
    for j, (R, D) in zip(jobs, pairs):
        assert [a["seed"] for a in j.attempts] == [0, 1]  # a 1-epoch D never meets d_trained: both seeds tried
        assert all(not a["d_trained"] for a in j.attempts) and D.cfg.seed in (0, 1) and R.cfg.budget == j.cfg_R.budget
    first = [j.attempts for j in jobs]
    assert all((tmp_path / f"D{j}_{s}.pt").exists() for j in range(2) for s in range(2))
    jobs2, *_ = _jobs(tmp_path)
    S.run_pair_searches(jobs2, X, Xv, yv, workers=1)  # checkpoints exist: loads, same numbers
    assert [j.attempts for j in jobs2] == first
    monkeypatch.setattr(S, "d_trained", lambda row: True)
    jobs3, *_ = _jobs(tmp_path / "new")
    S.run_pair_searches(jobs3, X, Xv, yv, workers=1)
    assert [len(j.attempts) for j in jobs3] == [1, 1]  # stops at the first D that worked


def test_worker_processes_give_the_same_result_as_inline(tmp_path):
    jobs, X, Xv, yv = _jobs(tmp_path / "inline", attempts=1)
    torch.set_num_threads(1)  # workers use one thread
    S.run_pair_searches(jobs, X, Xv, yv, workers=1)
    jobs_p, *_ = _jobs(tmp_path / "pool", attempts=1)
    S.run_pair_searches(jobs_p, X, Xv, yv, workers=2)
    assert [j.attempts for j in jobs_p] == [j.attempts for j in jobs]
    sd_a = torch.load(tmp_path / "inline" / "D1_0.pt", weights_only=True)["net"]
    sd_b = torch.load(tmp_path / "pool" / "D1_0.pt", weights_only=True)["net"]
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def test_bad_arguments():
    jobs, X, Xv, yv = _jobs(Path("/nonexistent"), n_jobs=1, attempts=1)
    with pytest.raises(ValueError, match="workers"):
        S.run_pair_searches(jobs, X, Xv, yv, workers=0)
    with pytest.raises(ValueError, match="device"):
        S.run_pair_searches(jobs * 2, X, Xv, yv, workers=2, device="cuda")
    jobs[0].paths_D = []
    with pytest.raises(ValueError, match="paths_D"):
        S.run_pair_searches(jobs, X, Xv, yv, workers=1)
