"""The cloud metrics an operator is told to watch are alarmed in both stacks (SAM and Terraform):
GcpZonesUnreachable (a reconcile that could not list some zones: their VMs are looked up by id and
fail closed after a bound, docs/deploy-gcp.md) and AzureEventsMalformed (an Event Grid event
skipped, docs/deploy-azure.md), each under its cloud's condition in SAM."""

from __future__ import annotations

from typing import Any

import pytest

from tests.aws.test_static import ROOT, hcl, template

ALARMED = {"GcpZonesUnreachable": "WithGcp", "AzureEventsMalformed": "WithAzure"}


@pytest.mark.parametrize("metric", sorted(ALARMED))
def test_cloud_metric_is_alarmed_in_sam_and_terraform(metric: str) -> None:
    res = template()["Resources"]
    sam = [
        r
        for r in res.values()
        if r["Type"] == "AWS::CloudWatch::Alarm"
        and r["Properties"]["Namespace"] == "Ringfence"
        and r["Properties"]["MetricName"] == metric
    ]
    assert len(sam) == 1, metric
    assert sam[0].get("Condition") == ALARMED[metric]
    assert sam[0]["Properties"]["Dimensions"] == [{"Name": "service", "Value": "ringfence"}]
    assert sam[0]["Properties"]["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    tf = hcl(ROOT / "infra/modules/ringfence/alarms.tf")
    loc: dict[str, Any] = {}
    for block in tf.get("locals", []):
        loc.update(block)
    found = [a for a in loc["alarms"].values() if a["metric"] == metric]
    assert len(found) == 1 and found[0]["ns"] == "Ringfence" and found[0]["dims"] == {"service": "ringfence"}, found
