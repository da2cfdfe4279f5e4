"""The metrics tables of docs/operations.md and docs/cloud.md name every metric leafwire exports, and only
those, with their labels (operations.md) — an operator writes alerts from them."""

from __future__ import annotations

import re

from prometheus_client.metrics import MetricWrapperBase

from shared import metrics
from tests.support import ROOT

ROW = re.compile(r"^\| ((?:`leafwire_[a-z_*]+`(?:, )?)+) \|\s*(\w*)\s*\|\s*([^|]*?)\s*\|$", re.MULTILINE)


def exported() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every leafwire metric: its name (as documented: counters with ``_total``), type and labels."""
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = (value._type, tuple(value._labelnames))
    return found


def documented(doc: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for names, kind, labels in ROW.findall((ROOT / "docs" / doc).read_text()):
        for name in re.findall(r"`(leafwire_[a-z_*]+)`", names):
            rows[name] = (kind, labels)
    return rows


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    ops, cloud = documented("operations.md"), documented("cloud.md")
    named = {n for n in ops | cloud if "*" not in n}
    assert named == set(exported())


def test_operations_table_gives_each_metrics_type_and_labels() -> None:
    for name, (kind, labels) in documented("operations.md").items():
        if "*" in name or not kind:  # the row that points to cloud.md's table
            continue
        real_kind, real_labels = exported()[name]
        assert kind == real_kind, name
        plain = labels
        while (shorter := re.sub(r"\([^()]*\)", "", plain)) != plain:  # what a label means, in (nested) parentheses
            plain = shorter
        listed = tuple(part.strip() for part in plain.split(",") if part.strip())
        assert listed == real_labels, name
