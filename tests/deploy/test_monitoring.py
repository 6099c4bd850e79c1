"""The `monitoring` profile: Prometheus config and rules pass promtool, the rules are the ones
docs/OPERATIONS.md shows, and every metric the rules and the Grafana dashboard use is one the
service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from app.serving.metrics import ServingMetrics
from tests.compose import COMPOSE_FILE
from tests.deploy.test_compose import published, render

REPO = COMPOSE_FILE.parent
PROM = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "skqk-serve.json"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip("promtool not installed (Debian package `prometheus`; .ci/run installs it when it can)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def test_promtool_accepts_the_config_and_the_rules() -> None:
    out = _promtool("check", "config", str(PROM / "prometheus.yml"))  # checks the rule file it names too
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 1 rule files found" in out.stdout
    out = _promtool("check", "rules", str(PROM / "skqk.rules.yml"))
    assert out.returncode == 0 and "SUCCESS: 2 rules found" in out.stdout, out.stdout + out.stderr


def test_the_rules_are_those_of_operations_md() -> None:
    doc = (REPO / "docs" / "OPERATIONS.md").read_text()
    block = re.search(r"Alert rules \(Prometheus[^\n]*\n+```yaml\n(.*?)```", doc, re.S)
    assert block, "docs/OPERATIONS.md lost its alert rules block"
    assert yaml.safe_load(block.group(1)) == yaml.safe_load((PROM / "skqk.rules.yml").read_text())


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def _exported_names() -> set[str]:
    """The sample names /metrics can show (labelled families too, before their first child)."""
    metrics = ServingMetrics()
    return {family.name + suffix for registry in (metrics.registry, metrics.scrape_registry)
            for family in registry.collect() for suffix in SUFFIXES[family.type]}


def _queried_names() -> set[str]:
    exprs = [rule["expr"] for group in yaml.safe_load((PROM / "skqk.rules.yml").read_text())["groups"]
             for rule in group["rules"]]
    dash = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    return {name for e in exprs for name in re.findall(r"\bskqk_\w+", e)}


def test_dashboard_and_rules_query_only_exported_metrics() -> None:
    queried, exported = _queried_names(), _exported_names()
    assert queried - exported == set()
    # the dashboard covers what the issue asks for: predict latency/throughput, retrain jobs
    # and outcomes, drift, sample counts
    for needed in ("skqk_request_latency_seconds_bucket", "skqk_request_latency_seconds_count",
                   "skqk_retrain_jobs_total", "skqk_structural_drift", "skqk_drift_recommend_full",
                   "skqk_samples_total", "skqk_http_ingest_samples_total"):
        assert needed in queried


def test_dashboard_is_provisioned_from_its_prometheus() -> None:
    dash = json.loads(DASHBOARD.read_text())
    source = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = source["datasources"]
    assert ds["url"] == "http://prometheus:9090"
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds["uid"]}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_monitoring_profile_scrapes_every_replica(tmp_path: Path) -> None:
    services = render(profiles=("monitoring",), secrets_dir=tmp_path)["services"]
    prom, grafana = services["prometheus"], services["grafana"]
    mounts = {}
    for v in prom["volumes"]:  # v1 renders "source:target:mode", v2 a mapping
        source, target = (v["source"], v["target"]) if isinstance(v, dict) else v.split(":")[:2]
        mounts[target] = Path(source)
    assert mounts["/etc/prometheus"] == PROM
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    api_port = services["api"]["command"][services["api"]["command"].index("--port") + 1]
    assert sd["names"] == ["api"] and str(sd["port"]) == api_port  # each replica, not the proxy
    for svc, port in ((prom, "9090"), (grafana, "3000")):
        assert published(svc["ports"][0])[0] == "127.0.0.1" and published(svc["ports"][0])[2] == port
    assert prom["profiles"] == grafana["profiles"] == ["monitoring"]  # opt-in
