import numpy as np
import pandas as pd
import pytest

from wbc_spark.splits import assign_folds, split_groups, train_val_test


def synthetic_meta(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(["A", "B", "C"], size=n, p=[0.6, 0.3, 0.1])
    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "label": labels,
                         "group": [f"i{i}" for i in range(n)],
                         "sha256": [f"h{i}" for i in range(n)]})
    # Known near-duplicates share a group; byte-identical files share a hash.
    for a, b in [(0, 1), (2, 3), (10, 50)]:
        meta.loc[b, "group"] = meta.loc[a, "group"]
        meta.loc[b, "label"] = meta.loc[a, "label"]
    meta.loc[7, "sha256"] = meta.loc[90, "sha256"]
    meta.loc[7, "label"] = meta.loc[90, "label"]
    return meta


def test_groups_join_on_group_and_hash():
    g = split_groups(synthetic_meta())
    assert g[0] == g[1] and g[2] == g[3] and g[10] == g[50] and g[7] == g[90]
    assert g[0] != g[2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_folds_keep_groups_together_and_stratify(seed):
    meta = synthetic_meta(seed=seed)
    folds = assign_folds(meta, 5, seed)
    assert set(folds) == set(range(5))
    for a, b in [(0, 1), (2, 3), (10, 50), (7, 90)]:
        assert folds[a] == folds[b]
    for label in "ABC":  # every fold holds every class
        assert all(((folds == k) & (meta.label == label)).any() for k in range(5))


def test_roles_are_disjoint_and_grouped():
    meta = synthetic_meta()
    roles = train_val_test(meta, folds=5, test_fold=2, val_fraction=0.2, seed=0)
    assert set(roles) == {"train", "val", "test"}
    assert 0.15 < (roles == "test").mean() < 0.25
    assert 0.1 < (roles == "val").mean() < 0.25
    for a, b in [(0, 1), (2, 3), (10, 50), (7, 90)]:
        assert roles[a] == roles[b]
    test_ids = set(meta.image_id[roles == "test"])
    outer = assign_folds(meta, 5, 0)
    assert test_ids == set(meta.image_id[outer == 2])


def test_too_few_examples_refused():
    meta = synthetic_meta(100)
    meta.loc[:, "label"] = "A"
    meta.loc[0, "label"] = "Z"
    with pytest.raises(ValueError, match="'Z' has 1 images"):
        assign_folds(meta, 5, 0)


def two_lab_meta():
    rng = np.random.default_rng(3)
    rows = []
    for lab, n, p in (("KRD", 300, [0.6, 0.35, 0.05]), ("PBC", 600, [0.2, 0.3, 0.5])):
        for i, label in enumerate(rng.choice(["A", "B", "C"], size=n, p=p)):
            rows.append({"image_id": f"{lab}/{i}", "label": label, "group": f"{lab}/{i}",
                         "sha256": f"{lab}{i}", "source": lab})
    return pd.DataFrame(rows)


def test_folds_stratify_by_lab_and_class():
    meta = two_lab_meta()
    fold = assign_folds(meta, 5, seed=0)
    for (lab, label), part in meta.groupby(["source", "label"]):
        per_fold = np.bincount(fold[part.index], minlength=5)
        # Each lab's class is spread evenly: no fold gets one lab's class and not the other's.
        assert per_fold.max() - per_fold.min() <= 2, (lab, label, per_fold)


def test_a_lab_class_smaller_than_the_folds_falls_back_to_the_class():
    from wbc_spark.splits import strata

    meta = two_lab_meta()
    few = meta.index[(meta.source == "PBC") & (meta.label == "A")][3:]
    meta = meta.drop(few).reset_index(drop=True)  # three PBC "A" cells, as when adapting
    s = strata(meta, 5)
    assert set(s[(meta.source == "PBC") & (meta.label == "A")]) == {"A"}
    assert set(s[(meta.source == "KRD") & (meta.label == "A")]) == {"KRD/A"}
    roles = train_val_test(meta, folds=5, test_fold=0, val_fraction=0.2, seed=0)
    assert set(roles) == {"train", "val", "test"}
