"""Static checks of the deployment files: Dockerfile (hadolint), compose files (the Compose
Specification schema), Prometheus and Grafana provisioning, and the dashboard's PromQL against the
metrics of SPEC §6. No Docker engine and no network are needed; the whole module runs in seconds.

The dashboard helpers here (``dashboard_targets``, ``concrete_promql``) are shared with
``tests/test_deploy_live.py``, which evaluates the same queries against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
COMPOSE_SCHEMA = ROOT / "deploy" / "schema" / "compose-spec.json"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sortedserve.json"

# SPEC §6: name -> (type, labels). Label values are checked where the spec fixes them.
SPEC_METRICS: dict[str, tuple[str, frozenset[str]]] = {
    "sortedserve_requests_total": ("counter", frozenset({"route", "status"})),
    "sortedserve_request_duration_seconds": ("histogram", frozenset({"exit_layer"})),
    "sortedserve_time_to_first_token_seconds": ("histogram", frozenset({"exit_layer"})),
    "sortedserve_inter_token_latency_seconds": ("histogram", frozenset({"exit_layer"})),
    "sortedserve_queue_duration_seconds": ("histogram", frozenset()),
    "sortedserve_decode_step_seconds": ("histogram", frozenset({"exit_layer"})),
    "sortedserve_generated_tokens_total": ("counter", frozenset({"exit_layer"})),
    "sortedserve_prompt_tokens_total": ("counter", frozenset()),
    "sortedserve_budget_requests_total": ("counter", frozenset({"outcome"})),
    "sortedserve_budget_overrun_seconds": ("histogram", frozenset()),
    "sortedserve_depth_downgrades_total": ("counter", frozenset()),
    "sortedserve_prediction_error_ratio": ("histogram", frozenset()),
    "sortedserve_batch_size": ("histogram", frozenset()),
    "sortedserve_requests_running": ("gauge", frozenset()),
    "sortedserve_requests_waiting": ("gauge", frozenset()),
}
LABEL_VALUES: dict[str, frozenset[str]] = {"outcome": frozenset({"met", "missed", "none"})}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance", "service"})

PROMQL_WORDS = frozenset(
    {
        # aggregations and their modifiers
        "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "by", "without",
        # functions used on counters, gauges and histograms
        "rate", "irate", "increase", "histogram_quantile", "clamp_min", "clamp_max", "abs",
        "avg_over_time", "max_over_time", "min_over_time", "sum_over_time", "vector", "scalar",
        # binary operators and vector matching
        "and", "or", "unless", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    }
)  # fmt: skip
COUNTER_FUNCS = frozenset({"rate", "irate", "increase"})


# ---------------------------------------------------------------------------------------------
# Helpers shared with test_deploy_live.py
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    panel: str
    ref_id: str
    expr: str
    legend: str
    datasource_uid: str | None

    @property
    def name(self) -> str:
        return f"{self.panel!r}/{self.ref_id}"


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel, including those nested in collapsed rows."""
    out: list[dict] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_targets(dashboard: dict | None = None) -> list[Target]:
    dashboard = dashboard if dashboard is not None else load_dashboard()
    targets = []
    for panel in dashboard_panels(dashboard):
        for t in panel.get("targets", []):
            ds = t.get("datasource") or panel.get("datasource") or {}
            targets.append(
                Target(
                    panel["title"], t["refId"], t["expr"], t.get("legendFormat", ""), ds.get("uid")
                )
            )
    return targets


def concrete_promql(expr: str, rate_interval: str = "30s", range_: str = "5m") -> str:
    """Replace the Grafana variables the dashboard uses by concrete values, for Prometheus."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__range", range_)
    leftover = re.findall(r"\$\{?\w+", out)
    if leftover:
        raise ValueError(f"unsubstituted Grafana variables {leftover} in {expr!r}")
    return out


def provisioned_datasource_uid() -> str:
    (ds,) = _prometheus_datasources()
    return ds["uid"]


def _prometheus_datasources() -> list[dict]:
    found = []
    for path in sorted((GRAFANA_PROVISIONING / "datasources").glob("*.y*ml")):
        found += [
            d for d in yaml.safe_load(path.read_text())["datasources"] if d["type"] == "prometheus"
        ]
    return found


# ---------------------------------------------------------------------------------------------
# PromQL analysis: which series, labels and functions a query uses
# ---------------------------------------------------------------------------------------------


@dataclass
class QueryUse:
    series: set[str]  # identifiers used as series names (e.g. ..._bucket)
    matcher_labels: dict[str, set[str]]  # label -> values used in {..} matchers
    grouping_labels: set[str]  # labels in by (...)
    rated_series: set[str]  # series inside rate()/irate()/increase()
    quantile_groupings: list[set[str]]  # by-labels of each histogram_quantile's aggregation


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def analyse_promql(expr: str) -> QueryUse:
    use = QueryUse(set(), {}, set(), set(), [])
    for body in re.findall(r"\{([^}]*)\}", expr):
        for label, _op, value in re.findall(r"(\w+)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"", body):
            use.matcher_labels.setdefault(label, set()).update(value.split("|"))
    for labels in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        use.grouping_labels.update(x.strip() for x in labels.split(",") if x.strip())
    for series in re.findall(r"\b(?:rate|irate|increase)\s*\(\s*([A-Za-z_:][A-Za-z0-9_:]*)", expr):
        use.rated_series.add(series)
    for labels in re.findall(
        r"histogram_quantile\s*\(\s*[0-9.]+\s*,\s*\w+\s+by\s*\(([^)]*)\)", expr
    ):
        use.quantile_groupings.append({x.strip() for x in labels.split(",")})
    stripped = _STRING.sub("", expr)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    stripped = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", stripped
    )
    stripped = re.sub(r"\b\d+(\.\d+)?(e[+-]?\d+)?\b", "", stripped)  # numbers
    for ident in _IDENT.findall(stripped):
        if ident not in PROMQL_WORDS:
            use.series.add(ident)
    return use


def exported_series() -> dict[str, tuple[str, frozenset[str]]]:
    """Series names Prometheus stores for the SPEC metrics -> (base metric, labels)."""
    out: dict[str, tuple[str, frozenset[str]]] = {}
    for name, (kind, labels) in SPEC_METRICS.items():
        if kind == "histogram":
            out[f"{name}_bucket"] = (name, labels | {"le"})
            out[f"{name}_sum"] = (name, labels)
            out[f"{name}_count"] = (name, labels)
        else:
            out[name] = (name, labels)
    return out


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it is a dev dependency (pip install -e .[dev])")
    return found


def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_hadolint_passes_on_dockerfile() -> None:
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = _hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            keyword, _, args = current.partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def final_stage(text: str) -> list[tuple[str, str]]:
    instructions = dockerfile_instructions(text)
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    return instructions[last_from:]


def test_dockerfile_is_multi_stage_and_parametrised_for_cuda() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [args for k, args in instructions if k == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    args = {a.split("=")[0] for k, a in instructions if k == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX_URL", "TORCH_VERSION"} <= args
    assert all(f.startswith("${BASE_IMAGE}") for f in froms)
    base_default = next(a for k, a in instructions if k == "ARG" and a.startswith("BASE_IMAGE="))
    assert base_default.split("=", 1)[1].startswith("python:3.11-slim")
    torch_default = next(
        a for k, a in instructions if k == "ARG" and a.startswith("TORCH_INDEX_URL=")
    )
    assert torch_default.endswith("/whl/cpu"), "CPU torch by default"
    version = next(a for k, a in instructions if k == "ARG" and a.startswith("TORCH_VERSION="))
    makefile = (ROOT / "Makefile").read_text()
    assert f"TORCH_VERSION := {version.split('=', 1)[1]}" in makefile, "same torch as make install"


def test_dockerfile_runtime_stage_contract() -> None:
    stage = final_stage(DOCKERFILE.read_text())
    by_kind: dict[str, list[str]] = {}
    for keyword, args in stage:
        by_kind.setdefault(keyword, []).append(args)

    (user,) = by_kind["USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root user"
    (healthcheck,) = by_kind["HEALTHCHECK"]
    assert "/health'" in healthcheck and "urllib" in healthcheck and "curl" not in healthcheck
    (cmd,) = by_kind["CMD"]
    assert json.loads(cmd) == ["python", "-m", "app", "serve"], "exec form: uvicorn gets SIGTERM"
    assert by_kind["STOPSIGNAL"] == ["SIGTERM"]
    assert "ENTRYPOINT" not in by_kind
    assert by_kind["EXPOSE"] == ["8000"]
    (model_copy,) = [c for c in by_kind["COPY"] if "model_store/default" in c]
    assert "--chmod=0755" in model_copy, "the baked-in model is readable by the runtime user"
    env = " ".join(by_kind["ENV"])
    assert "SORTEDSERVE_PORT=8000" in env and "SORTEDSERVE_HOST=0.0.0.0" in env
    assert "SORTEDSERVE_MODEL=model_store/default" in env
    assert "/models" in " ".join(by_kind["RUN"]), "a /models folder the user can read"


def _sortedserve_env_names(text: str) -> set[str]:
    return set(re.findall(r"\b(SORTEDSERVE_[A-Z0-9_]+)\s*[=:]", text))


def test_every_sortedserve_variable_is_a_setting() -> None:
    """A misspelt SORTEDSERVE_* variable is silently ignored by pydantic-settings: catch it here."""
    fields = {f"SORTEDSERVE_{name.upper()}" for name in Settings.model_fields}
    compose = yaml.safe_load(COMPOSE.read_text())
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    used = _sortedserve_env_names(DOCKERFILE.read_text())
    for doc in (compose, gpu):
        used |= {k for k in doc["services"]["api"].get("environment", {}) if k.startswith("SORT")}
    assert used, "the files set SORTEDSERVE_* variables"
    assert used <= fields, f"not settings: {sorted(used - fields)}"


def test_dockerignore_lets_in_exactly_what_the_image_copies() -> None:
    patterns = [p.strip() for p in DOCKERIGNORE.read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    assert patterns[0] == "*", "an allow-list: nothing enters the context unless named"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = set()
    for keyword, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and "--from" not in args:
            sources.update(a.rstrip("/") for a in args.split()[:-1] if not a.startswith("--"))
    assert sources <= allowed, f"copied but ignored: {sorted(sources - allowed)}"
    for source in sources:
        assert (ROOT / source).exists() or source == "model_store/default", source


# ---------------------------------------------------------------------------------------------
# Compose
# ---------------------------------------------------------------------------------------------


def _check_jsonschema(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("check-jsonschema"), "--schemafile", str(COMPOSE_SCHEMA), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_files_match_the_compose_specification() -> None:
    result = _check_jsonschema(COMPOSE, COMPOSE_GPU)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_typo(tmp_path: Path) -> None:
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["api"]["healthchek"] = broken["services"]["api"].pop("healthcheck")
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = _check_jsonschema(path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "healthchek" in result.stdout


def test_compose_stack_wiring() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"api", "prometheus", "grafana"}
    api, prom, grafana = services["api"], services["prometheus"], services["grafana"]

    assert api["build"]["context"] == "."
    assert any(p.endswith(":8000") for p in api["ports"])
    assert any(p.endswith(":9090") for p in prom["ports"])
    assert any(p.endswith(":3000") for p in grafana["ports"])
    assert "healthcheck" in api and "/ready" in " ".join(api["healthcheck"]["test"])
    assert prom["depends_on"]["api"]["condition"] == "service_healthy"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    drain = Settings.model_fields["drain_timeout_s"].default
    assert _seconds(api["stop_grace_period"]) > drain, "SIGKILL only after the drain timeout"
    assert any(v["target"] == "/models" for v in api["volumes"] if isinstance(v, dict))

    # Named volumes: declared at the top and used.
    named = set(compose["volumes"])
    used = set()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                used.add(source)
    assert used == named and {"prometheus-data", "grafana-data"} <= named

    # Bind mounts of repository files point at files that exist.
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prom["volumes"] + grafana["volumes"]}
    for target, source in mounts.items():
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"{source} (mounted at {target}) is missing"
    assert mounts["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.yml"
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"

    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    home = env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    dash_dir = next(t for t, s in mounts.items() if s == "./deploy/grafana/dashboards")
    assert home == f"{dash_dir}/{DASHBOARD.name}"

    # The dashboard provider reads the folder the dashboards are mounted at.
    (provider_file,) = (GRAFANA_PROVISIONING / "dashboards").glob("*.y*ml")
    (provider,) = yaml.safe_load(provider_file.read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dash_dir


def test_gpu_override_reserves_an_nvidia_gpu() -> None:
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())
    api = gpu["services"]["api"]
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert api["environment"]["SORTEDSERVE_DEVICE"].endswith("cuda}")
    assert "TORCH_INDEX_URL" in api["build"]["args"]
    assert set(gpu["services"]) == {"api"}, "an override of the api service only"


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration):
        total += float(number) * units[unit]
    return total


# ---------------------------------------------------------------------------------------------
# Prometheus and Grafana provisioning
# ---------------------------------------------------------------------------------------------


def test_prometheus_scrapes_the_api_every_5s() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "sortedserve"]
    interval = job.get("scrape_interval", config["global"]["scrape_interval"])
    assert interval == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["api:8000"]


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); the YAML test still ran")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_datasource_has_a_fixed_uid_and_points_at_prometheus() -> None:
    (ds,) = _prometheus_datasources()
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", ds["uid"])
    compose = yaml.safe_load(COMPOSE.read_text())
    assert "prometheus" in compose["services"]
    assert ds["url"] == "http://prometheus:9090"
    assert ds["access"] == "proxy" and ds.get("isDefault") is True
    assert ds["jsonData"]["timeInterval"] == "5s", "Grafana's $__rate_interval follows the scrape"


# ---------------------------------------------------------------------------------------------
# Dashboard
# ---------------------------------------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']!r} overlaps another panel"
        cells |= mine
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), p["title"]
        if p["type"] != "row":
            assert refs, f"{p['title']!r} has no query"


def test_every_panel_uses_the_provisioned_datasource() -> None:
    uid = provisioned_datasource_uid()
    dashboard = load_dashboard()
    assert "__inputs" not in dashboard, "a provisioned dashboard cannot ask for a datasource"
    for panel in dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
    for target in dashboard_targets(dashboard):
        assert target.datasource_uid == uid, target.name


def test_dashboard_queries_name_only_exported_metrics() -> None:
    series = exported_series()
    for target in dashboard_targets():
        use = analyse_promql(target.expr)
        assert use.series, f"{target.name}: no metric in {target.expr!r}"
        unknown = use.series - set(series)
        assert not unknown, f"{target.name}: not exported (SPEC §6): {sorted(unknown)}"

        labels = set(TARGET_LABELS)
        for name in use.series:
            labels |= series[name][1]
        bad = (use.grouping_labels | set(use.matcher_labels)) - labels
        assert not bad, f"{target.name}: labels {sorted(bad)} not on {sorted(use.series)}"
        for label, values in use.matcher_labels.items():
            allowed = LABEL_VALUES.get(label)
            if allowed is not None:
                assert values <= allowed, f"{target.name}: {label}={sorted(values - allowed)}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.legend))
        assert legend <= use.grouping_labels, f"{target.name}: legend labels {legend} not kept"

        for name in use.rated_series:
            kind = SPEC_METRICS[series[name][0]][0]
            assert kind in ("counter", "histogram"), f"{target.name}: rate() over a {kind}"
        for grouping in use.quantile_groupings:
            assert "le" in grouping, f"{target.name}: histogram_quantile needs `by (le, ...)`"
        if "histogram_quantile" in target.expr:
            assert len(use.quantile_groupings) == target.expr.count("histogram_quantile")
            assert all(s.endswith("_bucket") for s in use.series)
        concrete_promql(target.expr)  # only variables the live test can substitute


def test_the_app_registers_the_spec_metrics() -> None:
    """The dashboard is checked against SPEC §6 above; here SPEC §6 against the app's registry."""
    from prometheus_client.metrics import MetricWrapperBase

    from app.api.metrics import Metrics

    registered = {}
    for collector in vars(Metrics()).values():
        if isinstance(collector, MetricWrapperBase):
            kind = collector._type  # prometheus-client keeps no public accessor for these
            name = collector._name + ("_total" if kind == "counter" else "")
            registered[name] = (kind, frozenset(collector._labelnames))
    for name, spec in SPEC_METRICS.items():
        assert registered.get(name) == spec, f"{name}: app has {registered.get(name)}, SPEC {spec}"


def test_dashboard_covers_every_spec_metric() -> None:
    used = set()
    series = exported_series()
    for target in dashboard_targets():
        used |= {series[s][0] for s in analyse_promql(target.expr).series if s in series}
    assert used == set(SPEC_METRICS), f"no panel for {sorted(set(SPEC_METRICS) - used)}"


@pytest.mark.parametrize(
    "metric",
    [
        "sortedserve_request_duration_seconds",
        "sortedserve_time_to_first_token_seconds",
        "sortedserve_inter_token_latency_seconds",
    ],
)
def test_dashboard_has_per_exit_latency_quantiles(metric: str) -> None:
    found = set()
    for target in dashboard_targets():
        m = re.fullmatch(
            rf"histogram_quantile\(([0-9.]+), sum by \(le, exit_layer\) "
            rf"\(rate\({metric}_bucket\[\$__rate_interval\]\)\)\)",
            target.expr,
        )
        if m:
            found.add(float(m.group(1)))
    assert found >= {0.5, 0.95, 0.99}


STEP = "sortedserve_decode_step_seconds"


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(http_requests_total[5m])", "not exported"),
        ("sum by (exit_layer) (rate(sortedserve_prompt_tokens_total[5m]))", "labels"),
        ("histogram_quantile(0.9, sum by (le) (rate(sortedserve_ttft_bucket[1m])))", "exported"),
        (f"histogram_quantile(0.9, sum by (exit_layer) (rate({STEP}_bucket[1m])))", "by (le"),
        ("rate(sortedserve_requests_running[1m])", "rate() over a gauge"),
        ('sum(sortedserve_budget_requests_total{outcome="late"})', "outcome"),
        ("sortedserve_generated_tokens", "not exported"),
    ],
)  # fmt: skip
def test_the_query_check_catches_mistakes(
    expr: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Target("fake", "A", expr, "", provisioned_datasource_uid())
    monkeypatch.setattr(sys.modules[__name__], "dashboard_targets", lambda: [fake])
    with pytest.raises(AssertionError, match=re.escape(problem)):
        test_dashboard_queries_name_only_exported_metrics()
