"""Tests of bct.model.glue: TSV loading (tiny files and real GLUE rows), errors, metrics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bct.model.glue import (
    ENV_VAR,
    TASKS,
    GlueError,
    accuracy,
    compute_metrics,
    f1,
    load_task,
    pearson,
    spearman,
    task_spec,
)

TINY = {
    "SST-2": "sentence\tlabel\nit 's a \"charming\" film \t1\ndull , dull , dull \t0\nfine\t1\n",
    "STS-B": (
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane takes off.\tA plane is taking off.\t5.000\n"
        "1\tmain-news\theadlines\t2013\t0002\tnone\tnone\tHe said \"no.\tShe said yes.\t0.400\n"
    ),
    "MRPC": (
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
        "1\t1\t2\tHe called it \"the witness\".\tIt was \"the witness\", he said.\n"
        "0\t3\t4\tShares rose.\tShares fell.\n"
        "1\t5\t6\tA cat.\tA feline.\n"
    ),
    "RTE": (
        "index\tsentence1\tsentence2\tlabel\n"
        "0\tThe pope died.\tA pope died.\tentailment\n"
        "1\tIt rained.\tIt was sunny.\tnot_entailment\n"
    ),
}


@pytest.fixture
def tiny_dir(tmp_path):
    for task, text in TINY.items():
        (tmp_path / task).mkdir()
        (tmp_path / task / "train.tsv").write_text(text, encoding="utf-8")
        (tmp_path / task / "dev.tsv").write_text(text, encoding="utf-8")
    return tmp_path


def test_tasks_table():
    assert list(TASKS) == ["SST-2", "STS-B", "MRPC", "RTE"]
    assert TASKS["STS-B"].num_labels == 1 and TASKS["STS-B"].is_regression
    assert TASKS["STS-B"].metrics == ("pearson", "spearman")
    assert TASKS["MRPC"].metrics == ("accuracy", "f1") and TASKS["MRPC"].main_metric == "f1"
    assert TASKS["SST-2"].text_columns == ("sentence",) and not TASKS["SST-2"].is_pair
    assert TASKS["RTE"].label_names == ("entailment", "not_entailment")
    for spec in TASKS.values():
        assert spec.main_metric in spec.metrics
    assert task_spec("sst2") is TASKS["SST-2"] and task_spec("sts_b") is TASKS["STS-B"]


def test_sst2_tiny(tiny_dir):
    d = load_task("SST-2", "train", tiny_dir)
    assert d.task == "SST-2" and d.split == "train" and len(d) == 3
    assert d.text_a[0] == 'it \'s a "charming" film '  # quotes and trailing space kept literally
    assert d.text_b is None
    assert d.labels.dtype == np.int64 and d.labels.tolist() == [1, 0, 1]


def test_stsb_tiny(tiny_dir):
    d = load_task("STS-B", "dev", tiny_dir)
    assert d.text_a == ["A plane takes off.", 'He said "no.']
    assert d.text_b == ["A plane is taking off.", "She said yes."]
    assert d.labels.dtype == np.float64 and d.labels.tolist() == [5.0, 0.4]


def test_mrpc_and_rte_tiny(tiny_dir):
    m = load_task("MRPC", "train", tiny_dir)
    assert m.text_a[0] == 'He called it "the witness".'
    assert m.text_b[1] == "Shares fell."
    assert m.labels.tolist() == [1, 0, 1]
    r = load_task("rte", "train", tiny_dir)
    assert r.labels.tolist() == [0, 1]
    assert r.text_b == ["A pope died.", "It was sunny."]


def test_limit_and_env_var(tiny_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tiny_dir))
    d = load_task("MRPC", "train", limit=2)
    assert len(d) == 2 and d.labels.tolist() == [1, 0]
    assert len(load_task("MRPC", "train", limit=0)) == 0


def test_no_data_dir(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(GlueError) as e:
        load_task("SST-2", "train")
    assert str(e.value) == "no GLUE data directory: pass data_dir or set BCT_GLUE_DIR"


def test_missing_dir_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(GlueError) as e:
        load_task("SST-2", "train", missing)
    assert str(e.value) == f"GLUE data directory does not exist: {missing}"
    with pytest.raises(GlueError) as e:
        load_task("RTE", "dev", tmp_path)
    assert str(e.value) == f"no dev.tsv for RTE: {tmp_path / 'RTE' / 'dev.tsv'} does not exist"


def test_unknown_task_and_split(tiny_dir):
    with pytest.raises(GlueError) as e:
        load_task("CoLA", "train", tiny_dir)
    assert str(e.value) == "unknown GLUE task 'CoLA': expected one of SST-2, STS-B, MRPC, RTE"
    with pytest.raises(GlueError) as e:
        load_task("SST-2", "test", tiny_dir)
    assert str(e.value) == "unknown split 'test': expected one of train, dev"
    with pytest.raises(GlueError, match="limit must be a non-negative integer"):
        load_task("SST-2", "dev", tiny_dir, limit=-1)


def _write(tmp_path, task, text) -> Path:
    (tmp_path / task).mkdir(exist_ok=True)
    path = tmp_path / task / "train.tsv"
    path.write_text(text, encoding="utf-8")
    return path


def test_malformed_row(tmp_path):
    path = _write(tmp_path, "SST-2", "sentence\tlabel\ngood\t1\nbad\tmovie\t0\n")
    with pytest.raises(GlueError) as e:
        load_task("SST-2", "train", tmp_path)
    assert str(e.value) == f"{path}:3: expected 2 tab-separated fields, got 3"


def test_bad_labels(tmp_path):
    path = _write(tmp_path, "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(GlueError) as e:
        load_task("RTE", "train", tmp_path)
    assert str(e.value) == f"{path}:2: bad label 'maybe' (expected one of entailment, not_entailment)"
    path = _write(tmp_path, "STS-B", TINY["STS-B"].replace("5.000", "high"))
    with pytest.raises(GlueError) as e:
        load_task("STS-B", "train", tmp_path)
    assert str(e.value) == f"{path}:2: bad score 'high' (expected a number)"


def test_missing_header_column(tmp_path):
    path = _write(tmp_path, "MRPC", "Quality\t#1 String\tsecond\n1\ta\tb\n")
    with pytest.raises(GlueError) as e:
        load_task("MRPC", "train", tmp_path)
    assert str(e.value) == f"{path}: header lacks column '#2 String'"


def test_metrics_values():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    # tp=2, fp=1, fn=1 -> F1 = 4 / 6
    assert f1([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(2 / 3)
    assert f1([0, 0], [0, 0]) == 0.0
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # monotone but non-linear: Spearman 1, Pearson < 1
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert pearson(x, x**3) < 0.99
    with pytest.raises(GlueError, match="constant input"):
        pearson([1, 1, 1], [1, 2, 3])
    with pytest.raises(GlueError, match="must be equal 1-D shapes"):
        accuracy([1, 0], [1])


def test_spearman_with_ties_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, size=200).astype(float)
    b = a + rng.normal(0, 2.0, size=200).round()
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)


def test_compute_metrics():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    m = compute_metrics("MRPC", logits, np.array([0, 1, 0, 0]))
    assert list(m) == ["accuracy", "f1"]
    assert m["accuracy"] == 0.75 and m["f1"] == pytest.approx(2 / 3)
    s = compute_metrics("STS-B", np.array([[0.1], [2.0], [4.0]]), np.array([0.0, 2.5, 5.0]))
    assert s["spearman"] == pytest.approx(1.0) and 0.99 < s["pearson"] < 1.0
    assert compute_metrics("SST-2", [1, 1, 0], [1, 0, 0]) == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(GlueError, match="logits have 3 columns, expected 2"):
        compute_metrics("RTE", np.zeros((2, 3)), [0, 1])


REAL = os.environ.get(ENV_VAR)


@pytest.mark.skipif(not REAL, reason=f"{ENV_VAR} not set")
@pytest.mark.parametrize("task", list(TASKS))
def test_real_rows(task):
    spec = TASKS[task]
    for split in ("train", "dev"):
        d = load_task(task, split, limit=50)
        assert len(d) == 50
        assert all(isinstance(s, str) and s.strip() for s in d.text_a)
        assert (d.text_b is not None) == spec.is_pair
        if spec.is_regression:
            assert d.labels.min() >= 0.0 and d.labels.max() <= 5.0
        else:
            assert set(d.labels.tolist()) <= set(range(spec.num_labels))


@pytest.mark.skipif(not REAL, reason=f"{ENV_VAR} not set")
def test_real_known_first_rows():
    sts = load_task("STS-B", "train", limit=2)
    assert sts.text_a == ["A plane is taking off.", "A man is playing a large flute."]
    assert sts.labels.tolist() == [5.0, 3.8]
    mrpc = load_task("MRPC", "train", limit=1)
    assert mrpc.text_a[0].startswith('Amrozi accused his brother, whom he called "the witness"')
    assert mrpc.labels.tolist() == [1]
    rte = load_task("RTE", "train", limit=2)
    assert rte.labels.tolist() == [0, 1]
    assert rte.text_b[0] == "Pope Benedict XVI is the new leader of the Roman Catholic Church."


@pytest.mark.skipif(not REAL, reason=f"{ENV_VAR} not set")
def test_real_full_files_parse():
    """Every row of every real file parses under QUOTE_NONE (no row has stray fields)."""
    sizes = {t: (len(load_task(t, "train")), len(load_task(t, "dev"))) for t in TASKS}
    assert all(tr > 1000 and dv > 100 for tr, dv in sizes.values()), sizes
