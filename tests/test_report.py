"""Metrics and files of the report stage."""
import torch

from certssb.report.certificates import read_certificates_csv, write_certificates_csv
from certssb.report.metrics import certified_accuracy, split_metrics
from certssb.report.table import format_table


def test_certified_accuracy_definition():
    correct = torch.tensor([True, True, True, False, True])
    abstain = torch.tensor([False, False, False, False, True])
    radius = torch.tensor([0.0, 0.3, 0.6, 0.9, 0.0], dtype=torch.float64)
    curve = certified_accuracy(correct, abstain, radius, [0.0, 0.3, 0.5, 1.0])
    # r = 0: not abstained and correct; r > 0: also radius > r (strict: a ball of radius r is open)
    assert curve == {"0.0": 3 / 5, "0.3": 1 / 5, "0.5": 1 / 5, "1.0": 0.0}


def test_split_metrics_triggered_and_update_variants():
    rows = {"label": torch.tensor([1, 1, 1, 1]), "target": torch.tensor([0, 0, 0, 0]),
            "predict": torch.tensor([1, 0, 0, 1]), "predict_raw": torch.tensor([1, 1, 0, 1]),
            "radius": torch.tensor([0.5, 0.1, 0.2, 0.0], dtype=torch.float64),
            "radius_raw": torch.tensor([0.6, 0.2, 0.2, 0.0], dtype=torch.float64),
            "abstain": torch.tensor([False, False, False, True]),
            "radius_conservative": torch.tensor([0.3, 0.1, 0.1, 0.0], dtype=torch.float64)}
    upd = split_metrics(rows, [0.0, 0.25], triggered=True, use_update=True, conservative=True)
    raw = split_metrics(rows, [0.0, 0.25], triggered=True, use_update=False, conservative=False)
    assert upd["robust_accuracy"] == 0.25 and upd["attack_success_rate"] == 0.5
    assert raw["robust_accuracy"] == 0.5 and raw["attack_success_rate"] == 0.25
    assert upd["abstain_rate"] == 0.25
    # the conservative curve never applies the update: predict_raw with its own conservative radius
    assert upd["certified_accuracy_conservative"] == {"0.0": 0.5, "0.25": 0.25}
    assert "certified_accuracy_conservative" not in raw


def test_csv_round_trip(tmp_path):
    rows = {"idx": torch.arange(3), "label": torch.tensor([0, 1, 1]), "predict": torch.tensor([0, 0, 1]),
            "predict_raw": torch.tensor([0, 1, 1]), "radius": torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64),
            "radius_raw": torch.tensor([0.5, 0.1, 0.25], dtype=torch.float64),
            "sigma": torch.tensor([0.25, 0.3, 0.2], dtype=torch.float64),
            "pA_lower": torch.tensor([0.9, 0.6, 0.7], dtype=torch.float64),
            "pB_upper": torch.tensor([0.1, 0.4, 0.3], dtype=torch.float64),
            "abstain": torch.tensor([False, False, False]),
            "radius_conservative": torch.tensor([0.4, 0.0, 0.2], dtype=torch.float64),
            "poison_budget": torch.tensor([-1, -1, -1]), "query_order": torch.tensor([2, 0, 1])}
    path = tmp_path / "c.csv"
    write_certificates_csv(path, rows, ["none", "align", "trim"])
    back, kinds = read_certificates_csv(path)
    assert kinds == ["none", "align", "trim"]
    for k, v in rows.items():
        assert torch.allclose(back[k].double(), v.double(), atol=1e-6), k
    header = path.read_text().splitlines()[0].split(",")
    assert header[:12] == ["idx", "label", "predict", "radius", "correct", "sigma", "pA_lower", "pB_upper",
                           "abstain", "radius_conservative", "poison_budget", "region_update"]
    assert [line.split(",")[4] for line in path.read_text().splitlines()[1:]] == ["1", "0", "1"]


def test_table_mentions_every_method_and_split():
    curve = {"0.0": 0.9, "0.25": 0.5}
    m = {"models": 8, "bound": "hoeffding", "mode": "rab", "clean": {"accuracy": 0.9, "abstain_rate": 0.1,
                                                                        "certified_accuracy": curve},
         "triggered": {"robust_accuracy": 0.8, "attack_success_rate": 0.0, "certified_accuracy": curve}}
    text = format_table({"methods": {"rab": m}, "no_defense": {"clean_accuracy": 0.99, "attack_success_rate": 0.97}})
    assert "rab clean" in text and "rab triggered" in text and "90.0%" in text and "97.0%" in text
