#!/usr/bin/env python3
"""The local demo's steps that talk to the pipeline (run by scripts/demo.sh):

  demo.py drive ...: Create, refresh and end sessions through the session API pod, with a progress bar.
  demo.py wait ...: Wait until the relays have published and the consumer has processed every outbox row.
  demo.py summary ...: The summary table: written, published, consumed, lag and latencies.
  demo.py prometheus ...: Figures queried from the stack's Prometheus.
"""

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request


def drive(argv):
    """Create, refresh and end sessions through the session API pod, with a progress bar."""
    base, n = argv[0], int(argv[1])
    def call(method, path, body=None, headers=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
        with urllib.request.urlopen(req) as r:
            return json.load(r)
    start = time.time()
    for i in range(n):
        s = call("POST", "/sessions", {"userId": f"user-{i % 20}", "ttlSeconds": 900, "device": "demo"},
                 {"idempotency-key": f"demo-{i}", "x-correlation-id": f"demo-corr-{i}"})
        call("POST", f"/sessions/{s['id']}/refresh", {"ttlSeconds": 1800})
        if i % 2 == 0:
            call("DELETE", f"/sessions/{s['id']}?reason=logout")
        done = int(40 * (i + 1) / n)
        sys.stderr.write(f"\r  [{'#' * done}{'.' * (40 - done)}] {i + 1}/{n} sessions")
    sys.stderr.write(f"  ({time.time() - start:.1f}s)\n")


def wait(argv):
    """Wait until the relays have published and the consumer has processed every outbox row."""
    import pymongo
    db, group = pymongo.MongoClient(argv[0])[argv[1]], argv[2]
    total, start = db.outbox.count_documents({}), time.time()
    while True:
        # The relay writes no row per published event: its checkpoints (one per
        # bucket range) count them.
        ranges = db.outbox_relay_checkpoints.find({"_id": {"$regex": r"^outbox(#r[0-9]+of[0-9]+)?$"}})
        published = sum(c.get("published", 0) for c in ranges)
        consumed = db.processed_events.count_documents({"group": group})
        def bar(k):
            return "#" * min(20, int(20 * k / total)) + "." * max(0, 20 - int(20 * k / total))
        sys.stderr.write(f"\r  published [{bar(published)}] {published}/{total}   consumed [{bar(consumed)}] {consumed}/{total}")
        if published >= total and consumed >= total:
            break
        if time.time() - start > 180:
            sys.stderr.write("\n")
            sys.exit("the pipeline did not finish within 180 s; see kubectl logs in the demo namespace")
        time.sleep(0.3)
    sys.stderr.write("\n")


def summary(argv):
    """The summary table: written, published, consumed, lag and latencies."""
    import pymongo
    uri, dbname, group, kubeconfig, ns, relay_ips = argv[0:6]
    db = pymongo.MongoClient(uri)[dbname]
    rows = {r["_id"]: r for r in db.outbox.find({}, {"occurredOn": 1, "status": 1})}
    processed = {p["eventId"]: p["processedAt"] for p in db.processed_events.find({"group": group})}
    def pct(values, p):
        values = sorted(values)
        return values[min(len(values) - 1, int(round((len(values) - 1) * p)))] if values else float("nan")
    def histogram_pct(ips, name, p):
        # The upper bound of the bucket holding the p-quantile of a Prometheus
        # histogram summed over every relay pod and range, in ms.
        counts = {}
        for ip in filter(None, ips.split(",")):
            try:
                text = urllib.request.urlopen(f"http://{ip}:9090/metrics", timeout=5).read().decode()
            except OSError:
                return float("nan")
            for line in text.splitlines():
                if line.startswith(name + "_bucket{"):
                    le = line.split('le="')[1].split('"')[0]
                    le = float("inf") if le == "+Inf" else float(le)
                    counts[le] = counts.get(le, 0) + float(line.rsplit(" ", 1)[1])
        buckets = sorted(counts.items())
        total = buckets[-1][1] if buckets else 0
        return next((le * 1000 for le, n in buckets if total and n >= p * total), float("nan"))
    # One checkpoint per bucket range of the outbox.
    checkpoints = list(db.outbox_relay_checkpoints.find({"_id": {"$regex": r"^outbox(#r[0-9]+of[0-9]+)?$"}}))
    consume = [(processed[i] - r["occurredOn"]).total_seconds() * 1000 for i, r in rows.items() if i in processed]
    status = json.loads(subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "-n", ns, "get", "eventconsumer", "readmodel", "-o", "json"],
                                       check=True, capture_output=True, text=True).stdout).get("status", {})
    model = list(db.session_projection.find())
    print(f"  {'written (outbox rows)':<34} {len(rows):>8}")
    print(f"  {'published to Kafka (checkpoints)':<34} {sum(c.get('published', 0) for c in checkpoints):>8}")
    print(f"  {'rows written by the relay':<34} {sum(1 for r in rows.values() if 'status' in r):>8}")
    print(f"  {'consumed (projection, exactly once)':<34} {len(processed):>8}")
    print(f"  {'consumer lag (operator status)':<34} {status.get('lag', '?'):>8}")
    print(f"  {'commit -> acked p50 / p99 ms (<=)':<34} {histogram_pct(relay_ips, 'outbox_relay_commit_to_ack_seconds', .5):>8.0f} / "
          f"{histogram_pct(relay_ips, 'outbox_relay_commit_to_ack_seconds', .99):.0f}")
    print(f"  {'commit -> consumed p50 / p99 ms':<34} {pct(consume, .5):>8.0f} / {pct(consume, .99):.0f}")
    print(f"  {'read model: users / active sessions':<34} {len(model):>8} / {sum(m.get('activeSessions', 0) for m in model)}")
    print("  (latencies include the wait of events written before the relay and consumer were ready)")


def prometheus(argv):
    """Figures queried from the stack's Prometheus."""
    url, ns = argv[0:2]
    def query(q):
        with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": q}), timeout=10) as r:
            result = json.load(r)["data"]["result"]
        return float(result[0]["value"][1]) if result else float("nan")
    sel = f'namespace="{ns}"'
    # Wait (up to 20 s) for a scrape after the last event: the published counter
    # of the relay pods must reach the outbox's count.
    want = query(f'sum(outbox_session_outbox_rows_written_total{{{sel}}})')
    for _ in range(40):
        if query(f'sum(outbox_relay_published_total{{{sel}}})') >= want:
            break
        time.sleep(0.5)
    rows = [
        ("targets up (session API, relays, consumer, operator, registry)",
         f'count(up{{namespace=~"{ns}|outbox-system"}} == 1) + count(up{{job="registry"}} == 1)', "{:.0f}"),
        ("outbox rows written (session API)", f'sum(outbox_session_outbox_rows_written_total{{{sel}}})', "{:.0f}"),
        ("published (relays)", f'sum(outbox_relay_published_total{{{sel}}})', "{:.0f}"),
        ("peak published rate, events/s (10 s windows)",
         f'max_over_time(sum(rate(outbox_relay_published_total{{{sel}}}[10s]))[5m:2s])', "{:.0f}"),
        ("processed (consumer)", f'sum(outbox_consumer_processed_total{{{sel}}})', "{:.0f}"),
        ("consumer lag now", f'sum(outbox_consumer_lag{{{sel}}})', "{:.0f}"),
        ("commit -> acked p99 ms (over the run)",
         f'1000 * histogram_quantile(0.99, sum by (le) (increase(outbox_relay_commit_to_ack_seconds_bucket{{{sel}}}[5m])))', "{:.0f}"),
        ("relay ranges published (outbox_relay_leader)", f'sum(outbox_relay_leader{{{sel}}})', "{:.0f}"),
    ]
    for label, q, fmt in rows:
        print(f"  {label:<62} {fmt.format(query(q)):>8}")
    print(f"  (queries: {url}/graph)")


STEPS = {"drive": drive, "wait": wait, "summary": summary, "prometheus": prometheus}


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in STEPS:
        sys.exit(f"usage: demo.py {{{'|'.join(STEPS)}}} ARGS...")
    STEPS[sys.argv[1]](sys.argv[2:])
