"""Prometheus file_sd targets for the stack's pods, refreshed every 2 s.

Debian's prometheus package is built without Kubernetes service discovery,
so this does its part for the local stack: every running pod with a
container port named `metrics` (the operator's, relays' and consumers'), or
annotated `prometheus.io/scrape: "true"` (with `prometheus.io/port` and
optionally `prometheus.io/path`, like the demo's session API pod), becomes a
target labelled with its namespace, pod and service (the pod's
`app.kubernetes.io/name` or `app` label).

    python pod_targets.py KUBECONFIG OUT.json
"""
import json
import os
import subprocess
import sys
import time


def targets(pods):
    out = []
    for pod in pods:
        meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
        ip = status.get("podIP")
        if status.get("phase") != "Running" or not ip:
            continue
        labels = meta.get("labels", {})
        notes = meta.get("annotations", {})
        common = {
            "namespace": meta["namespace"],
            "pod": meta["name"],
            "service": labels.get("app.kubernetes.io/name") or labels.get("app") or meta["name"],
        }
        if notes.get("prometheus.io/scrape") == "true" and notes.get("prometheus.io/port"):
            extra = {"__metrics_path__": notes["prometheus.io/path"]} if notes.get("prometheus.io/path") else {}
            out.append({"targets": [f"{ip}:{notes['prometheus.io/port']}"], "labels": {**common, **extra}})
            continue
        for container in spec.get("containers", []):
            for port in container.get("ports", []):
                if port.get("name") == "metrics":
                    out.append({"targets": [f"{ip}:{port['containerPort']}"], "labels": common})
    return out


def main():
    kubeconfig, path = sys.argv[1], sys.argv[2]
    last = None
    while True:
        run = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "get", "pods", "--all-namespaces", "-o", "json"],
                             capture_output=True, text=True)
        if run.returncode == 0:
            text = json.dumps(targets(json.loads(run.stdout)["items"]), indent=1, sort_keys=True)
            if text != last:
                with open(path + ".tmp", "w") as f:
                    f.write(text)
                os.replace(path + ".tmp", path)
                last = text
        else:
            sys.stderr.write(f"kubectl get pods: {run.stderr.strip()}\n")
        time.sleep(2)


if __name__ == "__main__":
    main()
