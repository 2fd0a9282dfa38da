"""Stage 2's advice table (``similarities.threshold_grid``) and ``--top N`` against brute force.

The pure case: random attributions, patch sums and filters of 4 classes and 6 channels; every cell's counts
are recounted by running stage 2's own candidate rule (``candidate_pairs``) at that cell, and ``--top N`` by
ranking every (channel, class pair) with its cosine computed one pair at a time. The script case: the tiny
ResNet's store, stage 2 with --top 3 and with a window wide enough for every pair.
"""
import json
import os

import pytest
import torch

from utils.method import similarities
from utils.stages import stage2_passes, stage2_advice

K, C, C_IN, N = 4, 6, 3, 48


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(N) % K
    y[5] = -1  # an unreadable row: left out of every count
    A = torch.randn(N, C, generator=g) + 0.8 * torch.rand(K, C, generator=g)[y.clamp_min(0)]
    P = torch.randn(N, C_IN, 2, 2, generator=g, dtype=torch.float64) + 2 * torch.rand(K, C_IN, 2, 2, generator=g,
                                                                                         dtype=torch.float64)[y.clamp_min(0)]
    W = torch.randn(C, C_IN, 2, 2, generator=g)
    counts = similarities.class_counts(y.numpy(), K)
    means = stage2_passes.class_mean_patch_sums(P.numpy(), y.numpy(), K, chunk_rows=7)
    return A, y, W, counts, means


def test_grid_counts_equal_stage2_rule_at_every_cell(layer):
    A, y, W, counts, means = layer
    taus, ps, low, high = (0.01, 0.05, 0.2), (0.25, 0.5, 0.75), 0.0, 0.5
    hists = stage2_passes.class_histograms(A.numpy(), y.numpy(), K, taus, chunk_rows=7)
    rows = similarities.threshold_grid(hists, counts, W, means, ps, low, high)
    assert [(r["tau"], r["p"]) for r in rows] == [(t, p) for t in taus for p in ps]
    seen = set()
    for r in rows:
        hist = stage2_passes.class_histogram(A.numpy(), y.numpy(), K, r["tau"], chunk_rows=N)
        assert torch.equal(hist, hists[r["tau"]])
        used = similarities.used_classes(hist, counts, r["p"])
        every = similarities.candidate_pairs(W, means, used, -2.0, 2.0)
        assert r["channels"] == len(similarities.polysemantic_channels(used))
        assert r["pairs"] == len(similarities.candidate_pairs(W, means, used, low, high))
        assert r["pairs_any_cosine"] == len(every)
        if every:
            assert r["lowest_cosine"] == pytest.approx(min(d["cosine_similarity"] for d in every), abs=1e-12)
        else:
            assert r["lowest_cosine"] is None
        seen.add((r["pairs"], r["pairs_any_cosine"]))
    assert len(seen) >= 3 and max(r["pairs_any_cosine"] for r in rows) > 0  # the case tells cells apart


def test_top_n_is_the_n_lowest_cosines_by_brute_force(layer):
    A, y, W, counts, means = layer
    used = similarities.used_classes(stage2_passes.class_histogram(A.numpy(), y.numpy(), K, 0.01), counts, 0.25)
    brute = []
    for c in range(C):
        for a in range(K):
            for b in range(a + 1, K):
                if used[a, c] and used[b, c]:
                    u = (W[c].double() * means[a]).sum(dim=(-2, -1))
                    v = (W[c].double() * means[b]).sum(dim=(-2, -1))
                    brute.append((float(u @ v / (u.norm() * v.norm())), c, a, b))
    brute.sort()
    assert len(brute) >= 6
    for n in (1, 3, len(brute) + 2):
        top = similarities.lowest_pairs(W, means, used, n)
        got = sorted((d["cosine_similarity"], d["channel"], d["class1"], d["class2"]) for d in top)
        assert [g[1:] for g in got] == [b[1:] for b in brute[:n]]
        assert [g[0] for g in got] == pytest.approx([b[0] for b in brute[:n]], abs=1e-12)
        assert [d["cosine_similarity"] for d in top] == sorted((d["cosine_similarity"] for d in top), reverse=True)


def row(tau, p, pairs, any_cos, lowest):
    return {"tau": tau, "p": p, "channels": 0, "pairs": pairs, "pairs_any_cosine": any_cos, "lowest_cosine": lowest}


def test_suggestion_prefers_the_strictest_cell_with_enough_pairs():
    rows = [row(0.01, 0.5, 9, 20, 0.1), row(0.03, 0.5, 6, 10, 0.2), row(0.03, 0.75, 2, 3, 0.3),
            row(0.05, 0.75, 0, 0, None)]
    assert stage2_advice.suggestion(rows, 0.0, 0.5) == (0.03, 0.5, 0.0, 0.5)
    # none in the window: the strictest cell with 5 pairs of any cosine, the window opened to 1 (to -1 below low)
    rows = [row(0.01, 0.5, 1, 8, -0.2), row(0.03, 0.5, 0, 6, 0.63), row(0.05, 0.75, 0, 1, 0.9)]
    assert stage2_advice.suggestion(rows, 0.0, 0.5) == (0.03, 0.5, 0.0, 1.0)
    rows[1]["pairs_any_cosine"] = 2
    assert stage2_advice.suggestion(rows, 0.0, 0.5) == (0.01, 0.5, -1.0, 1.0)
    assert stage2_advice.suggestion([row(0.01, 0.5, 0, 0, None)], 0.0, 0.5) is None
    assert stage2_advice.grid_values(0.02, 0.75) == ((0.01, 0.02, 0.03, 0.05), (0.5, 0.75))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny ResNet's store (stage 1 on 4 classes of 4 training images) and stage 2 at tau 0.01, p 0.5 with
    every pair listed (cosine window [-1, 1))."""
    import get_cosine_similarities
    import get_importances_for_classes
    from tests.conftest import make_image_folder
    from tests.test_candidates import MODEL, NAME, call
    from utils.files import names
    work = tmp_path_factory.mktemp("advice")
    data, store = make_image_folder(str(work / "data"), 4, 2), str(work / "store")
    s1 = ["--data_dir", data, "--store_dir", store, *MODEL]
    assert call(get_importances_for_classes, s1) == 0
    s2 = [*s1, "--out_dir", str(work), "--proportion_attribution_required", 0.01, "--p", 0.5]
    assert call(get_cosine_similarities, [*s2, "--cos_sim_low", -1, "--cos_sim_high", 1]) == 0
    every = json.load(open(names.candidates_json(store, names.candidates_base(NAME, 0.01, 0.5, -1.0, 1.0))))
    return dict(work=str(work), data=data, store=store, s1=s1, s2=s2, every=every["candidates"])


def test_stage2_script_top_and_advice(tiny, capsys):
    """--top 3 on the tiny ResNet's store lists the 3 lowest cosines of the full list, says so in its record and
    its file name; a run with fewer than 5 candidates prints the grid and a command line."""
    import get_cosine_similarities
    from tests.test_candidates import NAME, call
    from utils.files import names
    s2, every, store = tiny["s2"], tiny["every"], tiny["store"]
    assert len(every) > 3
    capsys.readouterr()
    assert call(get_cosine_similarities, [*s2, "--top", 3]) == 0
    out = capsys.readouterr().out
    doc = json.load(open(names.candidates_json(store, names.candidates_base(NAME, 0.01, 0.5, 0, 1, top=3))))
    assert doc["top"] == 3 and doc["cos_sim_low"] is None and "--top" in doc["selection"]
    key = lambda d: (d["cosine_similarity"], d["channel"], d["class1"], d["class2"])  # noqa: E731
    assert doc["candidates"] == sorted(sorted(every, key=key)[:3], key=lambda d: (-key(d)[0],) + key(d)[1:])
    assert "3 candidates (channel, class1, class2) of lowest cosine (--top 3" in out
    assert "fewer than 5 candidates" not in out  # --top 3 asked for 3
    # the paper's window [0, 0.5) at tau 0.01, p 0.5: fewer than 5 candidates, the grid and a command follow
    assert call(get_cosine_similarities, [*s2, "--cos_sim_high", 0.5]) == 0
    out = capsys.readouterr().out
    assert "fewer than 5 candidates" in out and "tau     p  channels" in out
    cell = next(line for line in out.splitlines() if line.endswith("<- this run"))
    in_window = sum(0 <= d["cosine_similarity"] < 0.5 for d in every)
    assert in_window < 5 and cell.split()[:5] == ["0.01", "0.5", str(len({d["channel"] for d in every})),
                                                  str(in_window), str(len(every))]
    assert "for a list: python get_cosine_similarities.py --store_dir" in out


def test_stage4_script_takes_stage2_tau(tiny, capsys):
    """Stage 4 without the flag on a store whose stage-2 records say tau 0.01 counts at 0.01 (its files say
    required0.01) and says so; with the flag, the flag's tau, nothing said."""
    import disentangle_channel
    import get_results
    from tests.test_candidates import MODEL, call
    data, store, out = tiny["data"], tiny["store"], os.path.join(tiny["work"], "o")
    pair = ["--classes_for_concept1", 0, "--classes_for_concept2", 1]
    assert call(disentangle_channel, [*tiny["s1"], "--channel_disentangle", 2, *pair]) == 0
    s4 = ["--data_dir", data, "--model_dir", store, *MODEL, "--channel_of_interest", 2, *pair, "--get_quantitative"]
    capsys.readouterr()
    assert call(get_results, [*s4, "--out_dir", out]) == 0
    assert "relative attribution >= tau=0.01 (p=0.5) from stage 2's record" in capsys.readouterr().out
    found = [f for f in os.listdir(os.path.join(out, "results_quantitative")) if "required" in f]
    assert found and all("required0.01" in f for f in found)
    assert call(get_results, [*s4, "--out_dir", out + "2", "--proportion_attribution_required", 0.03]) == 0
    assert "from stage 2's record" not in capsys.readouterr().out
    found = [f for f in os.listdir(os.path.join(out + "2", "results_quantitative")) if "required" in f]
    assert found and all("required0.03" in f for f in found)


def test_top_with_label_free_is_one_line():
    import get_cosine_similarities
    from tests.test_candidates import call
    assert call(get_cosine_similarities, ["--store_dir", "S", "--label_free", "--top", 3]) == 2
