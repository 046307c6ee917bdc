"""Metrics over the accuracy matrix: hand-computed values, edge cases, CSV format."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from continual_lora import metrics as M
from continual_lora.metrics import MatrixFormatError

# Row j = scores after training task j; column i = task i (both in training order).
R3 = [
    [80.0, 30.0, 10.0],  # after task 1
    [85.0, 90.0, 40.0],  # after task 2 (task 1 went *up*, so Forgetting != -BWT)
    [60.0, 85.0, 95.0],  # after task 3
]
# per-task transfer: task1 None; task2 mean(R[1,2]) = 30; task3 mean(10, 40) = 25
# Transfer   = (30 + 25) / 2                                   = 27.5
# per-task average: (80+85+60)/3 = 75, (30+90+85)/3 = 205/3, (10+40+95)/3 = 145/3
# Average    = (75 + 205/3 + 145/3) / 3 = 575 / 9               = 63.888...
# Last = AP  = (60 + 85 + 95) / 3 = 240 / 3                      = 80
# BWT        = ((60 - 80) + (85 - 90)) / 2 = -25 / 2             = -12.5
# Forgetting = ((max(80, 85) - 60) + (max(90) - 85)) / 2 = (25 + 5) / 2 = 15
# MAP        = (80 + mean(85, 90) + mean(60, 85, 95)) / 3 = (80 + 87.5 + 80) / 3 = 82.5
EXPECTED = {
    "transfer": 27.5,
    "average": 575 / 9,
    "last": 80.0,
    "bwt": -12.5,
    "forgetting": 15.0,
    "ap": 80.0,
    "map": 82.5,
}

# Zero-shot CLIP ViT-B/16, MTIL Order I (docs/protocols.md).
ZERO_SHOT = [24.3, 88.4, 68.2, 44.6, 54.9, 71.0, 88.5, 59.4, 89.0, 64.7, 65.2]
MTIL_NAMES = ["Aircraft", "Caltech101", "CIFAR100", "DTD", "EuroSAT", "Flowers", "Food",
              "MNIST", "OxfordPet", "StanfordCars", "SUN397"]


def test_scalar_metrics_match_hand_computation():
    assert M.transfer(R3) == pytest.approx(EXPECTED["transfer"])
    assert M.average(R3) == pytest.approx(EXPECTED["average"])
    assert M.last(R3) == pytest.approx(EXPECTED["last"])
    assert M.bwt(R3) == pytest.approx(EXPECTED["bwt"])
    assert M.forgetting(R3) == pytest.approx(EXPECTED["forgetting"])
    assert M.ap(R3) == pytest.approx(EXPECTED["ap"])
    assert M.mean_average_performance(R3) == pytest.approx(EXPECTED["map"])
    assert M.map_score is M.mean_average_performance


def test_per_task_columns():
    assert M.per_task_transfer(R3) == [None, pytest.approx(30.0), pytest.approx(25.0)]
    assert M.per_task_average(R3) == pytest.approx([75.0, 205 / 3, 145 / 3])
    assert M.per_task_last(R3) == pytest.approx([60.0, 85.0, 95.0])


def test_protocol_dicts_have_exact_keys_and_python_floats():
    mtil = M.mtil_metrics(R3)
    cvit = M.cvit_metrics(np.array(R3))
    assert list(mtil) == ["transfer", "average", "last", "bwt", "forgetting"]
    assert list(cvit) == ["ap", "map", "bwt"]
    for key, value in {**mtil, **cvit}.items():
        assert type(value) is float
        assert value == pytest.approx(EXPECTED[key])
    assert all(type(v) is float for v in M.per_task_average(R3) + M.per_task_last(R3))


def test_one_task_edge_case_is_zero_not_nan():
    R = [[50.0]]
    assert M.mtil_metrics(R) == {"transfer": 0.0, "average": 50.0, "last": 50.0,
                                 "bwt": 0.0, "forgetting": 0.0}
    assert M.cvit_metrics(R) == {"ap": 50.0, "map": 50.0, "bwt": 0.0}
    assert M.per_task_transfer(R) == [None]
    json.loads(json.dumps(M.mtil_metrics(R), allow_nan=False))


@pytest.mark.parametrize("make", [lambda: copy.deepcopy(R3), lambda: np.array(R3)])
def test_input_not_mutated(make):
    R = make()
    before = copy.deepcopy(R)
    for fn in (M.transfer, M.average, M.last, M.bwt, M.forgetting, M.ap, M.map_score,
               M.per_task_transfer, M.per_task_average, M.per_task_last,
               M.mtil_metrics, M.cvit_metrics):
        fn(R)
    np.testing.assert_array_equal(np.array(R), np.array(before))
    assert type(R) is type(before)


@pytest.mark.parametrize(
    "bad", [[], [[1.0, 2.0]], [[1.0, 2.0], [3.0]], [[1.0, float("nan")], [1.0, 2.0]]]
)
def test_bad_matrix_rejected(bad):
    with pytest.raises(ValueError):
        M.average(bad)


def test_mtil_zero_shot_reference():
    # Every row = the zero-shot row, so every column mean is the zero-shot score.
    # Average = Last = 718.2 / 11 = 65.29; Transfer skips column 1 (Aircraft, 24.3, the
    # lowest score): 693.9 / 10 = 69.39 -> protocols.md's 69.4 / 65.3 / 65.3.
    R = [list(ZERO_SHOT) for _ in ZERO_SHOT]
    out = M.mtil_metrics(R)
    assert round(out["transfer"], 1) == 69.4
    assert round(out["average"], 1) == 65.3
    assert round(out["last"], 1) == 65.3
    assert out["bwt"] == pytest.approx(0.0) and out["forgetting"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- CSV

def test_csv_round_trip_with_after_column(tmp_path):
    R = np.array([list(ZERO_SHOT) for _ in ZERO_SHOT]) + np.arange(11)[:, None] / 3
    path = tmp_path / "R.csv"
    M.write_matrix_csv(path, MTIL_NAMES, R)
    lines = path.read_text().splitlines()
    assert lines[0] == "after," + ",".join(MTIL_NAMES)
    assert [line.split(",")[0] for line in lines[1:]] == MTIL_NAMES
    names, R2 = M.read_matrix_csv(path)
    assert names == MTIL_NAMES
    np.testing.assert_array_equal(R2, R)  # exact: floats written with repr


def test_csv_without_after_column(tmp_path):
    path = tmp_path / "R.csv"
    path.write_text("a,b,c\n80,30,10\n85,90,40\n60,85,95\n")
    names, R = M.read_matrix_csv(path)
    assert names == ["a", "b", "c"]
    np.testing.assert_array_equal(R, np.array(R3))
    out = tmp_path / "again.csv"
    M.write_matrix_csv(out, names, R)
    names2, R2 = M.read_matrix_csv(out)
    assert names2 == names
    np.testing.assert_array_equal(R2, R)


def test_zero_shot_goes_to_sidecar(tmp_path):
    path = tmp_path / "R.csv"
    M.write_matrix_csv(path, ["a", "b", "c"], R3, zero_shot=[1.0, 2.0, 3.0])
    names, R = M.read_matrix_csv(path)  # main file stays strict T x T
    np.testing.assert_array_equal(R, np.array(R3))
    z_names, z = M.read_zero_shot_csv(M.zero_shot_path(path))
    assert z_names == names and z.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty file"),
        ("\n  \n", "empty file"),
        ("after,a,b\na,1,2\n", "not square"),
        ("after,a,b\na,1,2\nb,3,4\nc,5,6\n", "not square"),
        ("after,a,b\na,1,2\nb,3,oops\n", "'oops' at row 'b', column 'b'"),
        ("a,b\n1,2\nx,4\n", "'x' at row 'line 3', column 'a'"),
        ("after,a,b\na,1,2\nb,3\n", "ragged row at line 3"),
        ("after,a,b,a\na,1,2,3\nb,1,2,3\na,1,2,3\n", "duplicate task names in header: a"),
        ("after,a,b\na,1,nan\nb,3,4\n", "non-finite"),
    ],
)
def test_malformed_csv_raises(tmp_path, text, fragment):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(MatrixFormatError) as info:
        M.read_matrix_csv(path)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_metrics_command(tmp_path):
    path = tmp_path / "R.csv"
    M.write_matrix_csv(path, ["a", "b", "c"], R3)
    assert M.metrics_command(path) == {"transfer": 27.5, "average": 63.8889, "last": 80.0,
                                       "bwt": -12.5, "forgetting": 15.0}
    assert M.metrics_command(path, protocol="cvit") == {"ap": 80.0, "map": 82.5, "bwt": -12.5}
    with pytest.raises(ValueError, match="unknown protocol"):
        M.metrics_command(path, protocol="nope")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(MatrixFormatError):
        M.metrics_command(bad)


def test_format_metrics_table():
    table = M.format_metrics_table(
        {"seq_lora": {"transfer": 27.5, "last": 80.0},
         "lilora": {"transfer": (68.123, 0.456), "last": 85}},
        ["transfer", "last", "bwt"],
    )
    assert table.splitlines() == [
        "| method | transfer | last | bwt |",
        "|---|---:|---:|---:|",
        "| seq_lora | 27.50 | 80.00 | - |",
        "| lilora | 68.12 ± 0.46 | 85.00 | - |",
    ]
