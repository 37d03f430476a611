"""mlic_dist.metrics against references: scikit-learn, hand-computed cases, and the seed repo's
(hellowangqian/multi-label-image-classification) `cemap_cal` / `prf_cal`, re-implemented below."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from mlic_dist import metrics


# ----------------------------------------------------------------------------- fixtures
def random_case(seed: int, n: int = 60, c: int = 7, ties: bool = False, ignore: float = 0.1):
    """(scores (N, C), targets (N, C) in {1, 0, -1}); every class has positives."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, c)) < 0.3).astype(np.int8)
    targets[0] = 1  # every class has a positive
    targets[rng.random((n, c)) < ignore] = -1
    targets[0] = 1
    scores = rng.random((n, c)) * 0.6 + 0.4 * (targets == 1)
    if ties:
        scores = np.round(scores, 1)  # many exact ties
    return scores, targets


def to_voc(targets: np.ndarray) -> np.ndarray:
    """Our coding (1 / 0 / -1 ignore) -> the seed repo's VOC coding (1 / -1 / 0 difficult)."""
    return np.where(targets == 1, 1, np.where(targets == 0, -1, 0))


# ----------------------------------------------------------------------------- seed repo (from the notes)
def seed_cemap_cal(y_pred, y_true):
    """VOC2007/evaluation_metrics.py cemap_cal: y_true 1 pos / -1 neg / 0 difficult (excluded).
    Non-interpolated AP with `>=` ties; nanmean over classes (cmap) and images (emap)."""
    n, c = y_true.shape

    def ap_of(scores, labels):
        num_pos = np.sum(labels == 1)
        total = 0.0
        for j in np.flatnonzero(labels == 1):
            r = np.sum(scores[labels != 0] >= scores[j])
            rb = np.sum(scores[labels == 1] >= scores[j])
            total += rb / r
        return total / num_pos if num_pos else np.nan

    emap = np.nanmean([ap_of(y_pred[i], y_true[i]) for i in range(n)])
    cmap = np.nanmean([ap_of(y_pred[:, i], y_true[:, i]) for i in range(c)])
    return cmap, emap


def seed_prf_cal(y_pred, y_true, k):
    """evaluation_metrics.py prf_cal: top-k slots per image, no threshold, OP = TP / (N k)."""
    gt = np.sum(y_true == 1)
    order = np.argsort(y_pred, axis=1)[:, ::-1]
    top = np.take_along_axis(y_true, order, axis=1)[:, :k]
    tp = np.sum(top == 1)
    recall, precision = tp / gt, tp / (y_true.shape[0] * k)
    return precision, recall, 2 * recall * precision / (recall + precision)


# ----------------------------------------------------------------------------- AP / mAP
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_sklearn_per_class_on_non_ignored_rows(seed, ties):
    scores, targets = random_case(seed, ties=ties)
    ap = metrics.average_precision(scores, targets)
    for c in range(targets.shape[1]):
        keep = targets[:, c] != -1
        assert ap[c] == pytest.approx(average_precision_score(targets[keep, c] == 1, scores[keep, c]))
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(ap.mean())


def test_ap_hand_cases_ties_and_ignore():
    # Ranking 1 0 1 0: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2.
    s = np.array([[0.9], [0.8], [0.7], [0.6]])
    assert metrics.average_precision(s, np.array([[1], [0], [1], [0]]))[0] == pytest.approx(5 / 6)
    # Tie: a positive tied with a negative gets the tie group's precision (pessimistic): 1/3.
    s = np.array([[0.9], [0.5], [0.5]])
    assert metrics.average_precision(s, np.array([[0], [1], [0]]))[0] == pytest.approx(1 / 3)
    # The ignored top entry is out of the ranking: AP 1, not 1/2.
    s = np.array([[0.9], [0.5], [0.1]])
    assert metrics.average_precision(s, np.array([[-1], [1], [0]]))[0] == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", range(6))
def test_fast_ap_equals_sklearn_with_ties_and_ignores(seed, dtype):
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(20, 400)), int(rng.integers(1, 9))
    targets = (rng.random((n, c)) < rng.uniform(0.05, 0.6)).astype(np.int8)
    targets[rng.random((n, c)) < 0.15] = -1
    targets[:, 0] = np.where(targets[:, 0] == 1, 0, targets[:, 0])   # a class without positives
    # Coarse grids give many exact ties (within and across positives / negatives / ignores).
    scores = np.round(rng.random((n, c)) * 0.7 + 0.3 * (targets == 1), int(rng.integers(1, 3))).astype(dtype)
    fast = metrics.average_precision_fast(scores, targets)
    assert np.isnan(fast[0])
    for k in range(1, c):
        keep = targets[:, k] != -1
        y = targets[keep, k] == 1
        if y.any():
            assert abs(fast[k] - average_precision_score(y, scores[keep, k])) < 1e-9
        else:
            assert np.isnan(fast[k])


def test_fast_ap_reused_for_many_matrices_in_place_and_with_threads():
    scores, targets = random_case(7, n=500, c=9, ties=True)
    ap = metrics.FastAP(targets, threads=3)
    for seed in range(3):
        s = np.random.default_rng(seed).permutation(scores)          # (N, C): new rankings
        expected = metrics.average_precision(s, targets)
        work = np.ascontiguousarray(s.T).astype(np.float32)           # (C, N), sorted in place
        assert np.allclose(ap(work, overwrite=True), metrics.average_precision(s.astype(np.float32), targets),
                           atol=1e-12)
        assert np.allclose(metrics.FastAP(targets, threads=1)(s.T), expected, atol=1e-12)
    with pytest.raises(ValueError, match="class-major"):
        ap(scores)


def test_class_without_positives_is_nan_and_left_out_of_map():
    scores, targets = random_case(3)
    targets[:, 2] = np.where(targets[:, 2] == 1, 0, targets[:, 2])  # no positives (some ignored)
    ap = metrics.average_precision(scores, targets)
    assert np.isnan(ap[2]) and not np.isnan(np.delete(ap, 2)).any()
    assert metrics.mean_average_precision(scores, targets) == pytest.approx(np.delete(ap, 2).mean())
    result = metrics.evaluate(scores, targets, classes=list("abcdefg"))
    assert result["classes_without_positives"] == ["c"]
    assert result["per_class"][2]["AP"] is None and result["per_class"][2]["R"] is None
    assert result["mAP"] == pytest.approx(np.delete(ap, 2).mean())


def test_no_positives_at_all_gives_none_not_nan():
    scores = np.random.default_rng(0).random((5, 3))
    result = metrics.evaluate(scores, np.zeros((5, 3), dtype=np.int8))
    assert result["mAP"] is None and result["eAP"] is None and result["thresh"]["CP"] is None
    json.dumps(result, allow_nan=False)


@pytest.mark.parametrize("ties", [False, True])
def test_eap_matches_sklearn_per_image(ties):
    scores, targets = random_case(4, n=30, c=9, ties=ties)
    targets[5] = np.where(targets[5] == 1, 0, targets[5])  # an image without positives
    per_image = metrics.example_average_precision(scores, targets)
    assert np.isnan(per_image[5])
    for i in range(targets.shape[0]):
        keep = targets[i] != -1
        if (targets[i] == 1).any():
            ref = average_precision_score(targets[i, keep] == 1, scores[i, keep])
            assert per_image[i] == pytest.approx(ref)
    assert metrics.evaluate(scores, targets)["eAP"] == pytest.approx(np.nanmean(per_image))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [5, 6])
def test_map_and_eap_equal_seed_cemap_cal(seed, ties):
    scores, targets = random_case(seed, n=40, c=6, ties=ties, ignore=0.15)
    cmap, emap = seed_cemap_cal(scores, to_voc(targets))
    result = metrics.evaluate(scores, targets)
    assert result["mAP"] == pytest.approx(cmap) and result["eAP"] == pytest.approx(emap)


# ----------------------------------------------------------------------------- top-k
def test_topk_ties_go_to_lower_class_index():
    scores = np.array([[0.1, 0.5, 0.5, 0.5, 0.9]])
    pred = metrics.topk_predictions(scores, np.zeros((1, 5)), k=3)
    assert pred.tolist() == [[False, True, True, False, True]]  # exactly k, classes 1 and 2 win


def test_topk_exclude_skips_ignored_entries_slot_counts_them():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.1],
                       [0.9, 0.8, 0.7, 0.6, 0.5]])
    targets = np.array([[-1, 1, 0, 1, 0],
                        [-1, -1, -1, -1, 1]])
    pred = metrics.topk_predictions(scores, targets, k=3)
    assert pred.tolist() == [[False, True, True, True, False],
                             [False, False, False, False, True]]  # only 1 non-ignored class
    res = metrics.precision_recall_f1(pred, targets)
    # TP 3 (row 0: classes 1, 3; row 1: class 4), predictions 4, positives 3.
    assert (res["OP"], res["OR"]) == pytest.approx((3 / 4, 1.0))
    slot = metrics.topk_predictions(scores, targets, k=3, topk_ignore="slot")
    res = metrics.precision_recall_f1(slot, targets, count_ignored_predictions=True)
    # Row 0 top-3 = classes 0 (ignored), 1, 2 -> TP 1; row 1 = classes 0..2 all ignored -> TP 0.
    assert (res["OP"], res["OR"]) == pytest.approx((1 / 6, 1 / 3))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_op_is_tp_over_kn_and_equals_seed_prf_cal(k):
    scores, targets = random_case(7, n=50, c=10, ignore=0.0)
    result = metrics.evaluate(scores, targets, k=k)[f"top{k}"]
    pred = metrics.topk_predictions(scores, targets, k=k)
    tp = np.sum(pred & (targets == 1))
    assert result["OP"] == pytest.approx(tp / (k * len(scores)))
    p, r, f = seed_prf_cal(scores, targets, k)
    assert (result["OP"], result["OR"], result["OF1"]) == pytest.approx((p, r, f))


def test_topk_slot_mode_equals_seed_prf_cal_with_ignore_entries():
    scores, targets = random_case(8, n=50, c=10, ignore=0.2)
    result = metrics.evaluate(scores, targets, topk_ignore="slot")["top3"]
    # The seed's VOC prf_cal counts only 1 as positive: difficult (0) slots are wasted.
    assert (result["OP"], result["OR"], result["OF1"]) == pytest.approx(
        seed_prf_cal(scores, to_voc(targets), 3))


# ----------------------------------------------------------------------------- P / R / F1
def test_prf_hand_case():
    # 4 images x 4 classes; predictions given directly.
    pred = np.array([[1, 0, 0, 1],
                     [1, 1, 0, 0],
                     [0, 0, 0, 1],
                     [1, 0, 0, 0]], dtype=bool)
    targets = np.array([[1, 0, 1, 0],
                        [0, 1, -1, 0],
                        [1, -1, 1, 0],
                        [-1, 1, 0, 0]])
    res = metrics.precision_recall_f1(pred, targets)
    # class 0: predicted rows 0, 1 (row 3 is ignored) -> TP 1, Np 2, Ng 2: P 1/2, R 1/2.
    # class 1: predicted row 1 -> TP 1, Np 1, Ng 2: P 1, R 1/2.
    # class 2: no predictions -> P 0 (convention), R 0/2 = 0, F1 0.
    # class 3: no positives -> P 0/2 = 0, R, F1 undefined; left out of CP/CR/CF1_mean.
    np.testing.assert_allclose(res["P"], [0.5, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(res["R"], [0.5, 0.5, 0.0, np.nan])
    np.testing.assert_allclose(res["F1"], [0.5, 2 / 3, 0.0, np.nan])
    cp, cr = (0.5 + 1 + 0) / 3, (0.5 + 0.5 + 0) / 3
    assert res["CP"] == pytest.approx(cp) and res["CR"] == pytest.approx(cr)
    assert res["CF1"] == pytest.approx(2 * cp * cr / (cp + cr))          # ML-GCN
    assert res["CF1_mean"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)       # ASL / mmpretrain
    # Overall: TP 2; predictions 2 + 1 + 0 + 2 = 5 (class 3's are false positives); positives 6.
    assert (res["OP"], res["OR"]) == pytest.approx((2 / 5, 2 / 6))
    assert res["OF1"] == pytest.approx(2 * 0.4 * (1 / 3) / (0.4 + 1 / 3))


def test_nothing_predicted_gives_zero_precision_not_nan():
    res = metrics.precision_recall_f1(np.zeros((3, 2), bool), np.array([[1, 0], [0, 1], [1, 1]]))
    assert (res["CP"], res["CR"], res["CF1"], res["CF1_mean"]) == (0.0, 0.0, 0.0, 0.0)
    assert (res["OP"], res["OR"], res["OF1"]) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("seed", [9, 10])
def test_thresh_prf_matches_sklearn(seed):
    scores, targets = random_case(seed, n=80, c=6, ties=True)
    targets[:, 4] = np.where(targets[:, 4] == 1, 0, targets[:, 4])  # a class without positives
    result = metrics.evaluate(scores, targets, threshold=0.6)
    keep, pred = targets != -1, scores >= 0.6
    per = [(precision_score(targets[keep[:, c], c] == 1, pred[keep[:, c], c], zero_division=0),
            recall_score(targets[keep[:, c], c] == 1, pred[keep[:, c], c]),
            f1_score(targets[keep[:, c], c] == 1, pred[keep[:, c], c], zero_division=0))
           for c in range(6) if c != 4]
    p, r, f = np.array(per).T
    th = result["thresh"]
    assert (th["CP"], th["CR"], th["CF1_mean"]) == pytest.approx((p.mean(), r.mean(), f.mean()))
    assert th["CF1"] == pytest.approx(2 * p.mean() * r.mean() / (p.mean() + r.mean()))
    y, yhat = targets[keep] == 1, pred[keep]  # micro over all non-ignored pairs
    assert (th["OP"], th["OR"], th["OF1"]) == pytest.approx(
        (precision_score(y, yhat), recall_score(y, yhat), f1_score(y, yhat)))
    for c, ref in zip([0, 1, 2, 3, 5], per):
        row = result["per_class"][c]
        assert (row["P"], row["R"], row["F1"]) == pytest.approx(ref)


def test_threshold_is_inclusive_and_per_class():
    scores = np.array([[0.5, 0.5], [0.4, 0.7]])
    assert metrics.threshold_predictions(scores, 0.5).tolist() == [[True, True], [False, True]]
    assert metrics.threshold_predictions(scores, thresholds=[0.4, 0.6]).tolist() == [
        [True, False], [True, True]]


# ----------------------------------------------------------------------------- thresholds
def brute_force_best_f1(scores, y):
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & y)
        best = max(best, 2 * tp / (pred.sum() + y.sum()))
    return best


@pytest.mark.parametrize("ties", [False, True])
def test_tuned_thresholds_maximise_f1(ties):
    scores, targets = random_case(11, n=70, c=6, ties=ties)
    targets[:, 5] = np.where(targets[:, 5] == 1, 0, targets[:, 5])
    tuned = metrics.tune_thresholds(scores, targets)
    assert tuned[5] == 0.5  # fallback for the class without positives
    for c in range(5):
        keep = targets[:, c] != -1
        s, y = scores[keep, c], targets[keep, c] == 1
        pred = s >= tuned[c]
        achieved = 2 * np.sum(pred & y) / (pred.sum() + y.sum())
        assert achieved == pytest.approx(brute_force_best_f1(s, y))
        assert tuned[c] in s  # a real score, reproducible with >=
        # The lowest of the equally good thresholds.
        lower = s[s < tuned[c]]
        if lower.size:
            pred = s >= lower.max()
            assert 2 * np.sum(pred & y) / (pred.sum() + y.sum()) < achieved - 1e-12
    result = metrics.evaluate(scores, targets, thresholds=tuned)
    assert result["settings"]["threshold"] == "per-class"
    assert [row["threshold"] for row in result["per_class"]] == pytest.approx(tuned.tolist())


def test_tuned_threshold_hand_case():
    scores = np.array([[0.9], [0.8], [0.3], [0.2], [0.1]])
    targets = np.array([[1], [0], [1], [0], [-1]])  # the ignored 0.1 is not a candidate
    # t=0.9: F1 2/3; t=0.8: 1/2; t=0.3: 4/5; t=0.2: 2/3 -> 0.3.
    assert metrics.tune_thresholds(scores, targets)[0] == pytest.approx(0.3)
    assert metrics.tune_thresholds(scores, np.zeros((5, 1)), fallback=0.7)[0] == 0.7


def test_save_load_thresholds_round_trip(tmp_path):
    path = tmp_path / "thresholds.json"
    values = np.array([0.1, 1 / 3, np.float32(0.7)])
    metrics.save_thresholds(path, values, ["cat", "dog", "car"])
    assert json.loads(path.read_text()) == {"cat": 0.1, "dog": 1 / 3, "car": float(np.float32(0.7))}
    loaded = metrics.load_thresholds(path, ["car", "cat", "dog"])  # by name, not by position
    assert loaded.tolist() == [values[2], values[0], values[1]]
    with pytest.raises(ValueError, match=r"missing \['bus'\]"):
        metrics.load_thresholds(path, ["cat", "dog", "car", "bus"])
    with pytest.raises(ValueError, match=r"unknown \['car'\]"):
        metrics.load_thresholds(path, ["cat", "dog"])
    path.write_text(json.dumps({"cat": "high"}))
    with pytest.raises(ValueError, match="'cat'.*not a finite number"):
        metrics.load_thresholds(path, ["cat"])
    with pytest.raises(ValueError, match="2 class names for 3"):
        metrics.save_thresholds(path, values, ["cat", "dog"])


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("scores, targets, match", [
    (np.zeros((3, 2)), np.zeros((3, 3)), r"scores shape \(3, 2\) != targets shape \(3, 3\)"),
    (np.zeros(3), np.zeros(3), "2-D"),
    (np.zeros((0, 3)), np.zeros((0, 3)), "empty"),
    (np.array([[0.1, 0.2], [0.3, np.nan]]), np.zeros((2, 2)), r"\(row 1, col 1\) = nan"),
    (np.array([[0.1, np.inf], [0.3, 0.4]]), np.zeros((2, 2)), r"\(row 0, col 1\) = inf"),
    (np.zeros((2, 2)), np.array([[0, 1], [2, -1]]), r"\(row 1, col 0\) = 2"),
    (np.zeros((2, 2)), np.array([[0, 0.5], [1, 1]]), r"\(row 0, col 1\) = 0.5"),
])
def test_validation_errors_name_the_problem(scores, targets, match):
    with pytest.raises(ValueError, match=match):
        metrics.evaluate(scores, targets)


def test_argument_errors():
    scores, targets = random_case(12, n=10, c=4)
    with pytest.raises(ValueError, match="k=5 must be an integer in 1..4"):
        metrics.evaluate(scores, targets, k=5)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        metrics.evaluate(scores, targets, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match="3 class names for 4"):
        metrics.evaluate(scores, targets, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="repeated"):
        metrics.evaluate(scores, targets, classes=["a", "b", "c", "a"])
    with pytest.raises(ValueError, match="topk_ignore"):
        metrics.evaluate(scores, targets, topk_ignore="maybe")


def test_evaluate_layout_is_json_ready():
    scores, targets = random_case(13, n=20, c=5)
    result = metrics.evaluate(scores.astype(np.float32), targets, k=2)
    assert set(result) >= {"mAP", "eAP", "top2", "thresh", "per_class", "classes_without_positives"}
    assert set(result["top2"]) == set(metrics.SUMMARY_KEYS) == set(result["thresh"])
    assert set(result["per_class"][0]) >= {"name", "AP", "P", "R", "F1", "threshold", "num_positives"}
    assert result["per_class"][0]["name"] == "class_0"
    assert result["per_class"][0]["num_positives"] == int((targets[:, 0] == 1).sum())
    text = json.dumps(result, allow_nan=False)
    assert all(isinstance(v, float) and 0 <= v <= 1 and not math.isnan(v)
               for v in json.loads(text)["thresh"].values())


def test_chance_ap_is_the_mean_ap_of_random_scores():
    """The exact expected AP of random scores, against sklearn's AP averaged over many random
    rankings of the same labels (ignore rows dropped, a class without positives undefined)."""
    from sklearn.metrics import average_precision_score

    from mlic_dist.metrics import chance_average_precision

    rng = np.random.default_rng(0)
    targets = (rng.random((40, 4)) < [0.05, 0.3, 0.8, 0.0]).astype(np.int8)
    targets[rng.random((40, 4)) < 0.1] = -1
    targets[0, 0] = 1
    chance = chance_average_precision(targets)
    assert np.isnan(chance[3]) and not np.isnan(chance[:3]).any()
    for c in range(3):
        keep = targets[:, c] != -1
        y = targets[keep, c] == 1
        sim = np.mean([average_precision_score(y, rng.random(y.size)) for _ in range(3000)])
        assert abs(chance[c] - sim) < 0.02, (c, chance[c], sim, y.mean())
    assert chance_average_precision(np.ones((5, 1)))[0] == 1.0
