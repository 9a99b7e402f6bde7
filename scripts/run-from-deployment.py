"""Print, as JSON, how to run a Deployment's first container as a local
process: {"args": [...], "env": {...}}. Environment comes from the
container's envFrom ConfigMaps and Secrets (with prefixes), its env values,
secretKeyRef/configMapKeyRef and the downward API (namespace, pod name):
exactly what the pod would get. Used by `make demo`, where there is no
kubelet to run the pods the operator builds.

Usage: run-from-deployment.py KUBECONFIG NAMESPACE DEPLOYMENT
"""
import base64, json, subprocess, sys

kubeconfig, ns, name = sys.argv[1:4]


def get(kind, obj):
    out = subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "-n", ns, "get", kind, obj, "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def secret_data(secret):
    return {k: base64.b64decode(v).decode() for k, v in get("secret", secret).get("data", {}).items()}


d = get("deployment", name)
c = d["spec"]["template"]["spec"]["containers"][0]
env = {}
for source in c.get("envFrom", []):
    prefix = source.get("prefix", "")
    if "configMapRef" in source:
        data = get("configmap", source["configMapRef"]["name"]).get("data", {})
    else:
        data = secret_data(source["secretRef"]["name"])
    env.update({prefix + k: v for k, v in data.items()})
for e in c.get("env", []):
    if "value" in e:
        env[e["name"]] = e["value"]
        continue
    ref = e["valueFrom"]
    if "secretKeyRef" in ref:
        env[e["name"]] = secret_data(ref["secretKeyRef"]["name"])[ref["secretKeyRef"]["key"]]
    elif "configMapKeyRef" in ref:
        env[e["name"]] = get("configmap", ref["configMapKeyRef"]["name"])["data"][ref["configMapKeyRef"]["key"]]
    elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
        env[e["name"]] = ns
env["HOSTNAME"] = f"{name}-local"
print(json.dumps({"args": c.get("args", []), "env": env}))
