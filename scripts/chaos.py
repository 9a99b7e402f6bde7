"""The chaos suite: drive events through the whole pipeline while faults
are injected on a seeded schedule, then prove nothing was lost, nothing was
applied twice and per-aggregate order held.

Processes (the release `outbox` binary, each with its own log under the run
directory): one session API, two relays on one outbox (MongoDB leases;
with CHAOS_SHARDS=N the outbox is split into N bucket ranges the two share,
both publishing), two
projection consumers in one group, and one webhook consumer whose webhook is
this harness (it records the order in which events are handled). The run
has its own broker (tansu, in memory) reached only through a TCP proxy of
the harness, so the broker can be made unreachable without losing data.

Load: several clients create, refresh and end sessions of many users
through the session API, at a steady rate with bursts, until CHAOS_EVENTS
events are committed. Faults (bounded, from CHAOS_SEED): SIGKILL of the
active relay, SIGSTOP of the active relay for longer than its lease then
SIGCONT, SIGKILL of a consumer, SIGKILL and restart of mongod, a restart of
the schema registry, the broker unreachable (the proxy drops and refuses
every connection) for a few seconds, and for far longer than the relays'
attempt budget (`--max-attempts 3`), the standby relay restarted with its
clock ahead (libfaketime) and made active, and the relays' checkpoints
deleted while they publish (each steps down and starts again with a
first-start recovery scan while the clients write). Then everything drains
and the checkers run:

- lost: an event committed in the outbox and absent from the topic;
- duplicates published: records of an event beyond its first;
- double effect: the read model differs from one computed from the
  committed events (and its active sessions from the sessions collection),
  or the processed marks are not exactly one per event;
- order: per aggregate, the first record of each event in the topic, and
  the first delivery of each event to the webhook consumer, in increasing
  aggregate version;
- stuck: outbox rows left failed, held or dead;
- the group's lag is 0 and the webhook consumer saw every event.

Exit status 1 on any loss, double effect, order violation or stuck event.
"""

import argparse
import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pymongo
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

LEASE_SECONDS = 4
PARTITIONS = 3


def log(msg):
    print(f"[chaos +{time.monotonic() - START:6.1f}s] {msg}", flush=True)


START = time.monotonic()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One process of the pipeline, restartable, with its log file."""

    def __init__(self, name, argv, env, logdir):
        self.name, self.argv, self.env, self.logdir = name, argv, env, logdir
        self.p = None
        self.starts = 0

    def start(self, extra_env=None):
        self.starts += 1
        out = open(os.path.join(self.logdir, f"{self.name}.log"), "ab")
        out.write(f"\n=== start {self.starts} {extra_env or ''} ===\n".encode())
        env = dict(self.env, **(extra_env or {}))
        self.p = subprocess.Popen(self.argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    def signal(self, sig):
        if self.p and self.p.poll() is None:
            self.p.send_signal(sig)

    def kill(self):
        self.signal(signal.SIGKILL)
        if self.p:
            self.p.wait()

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGCONT)
            self.p.terminate()
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def alive(self):
        return self.p is not None and self.p.poll() is None


def metric(port, name):
    """A metric's value (summed over its series) from a process's /metrics."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except (OSError, urllib.error.URLError):
        return None
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    return total if found else None


class Proxy:
    """A TCP proxy in front of the harness's broker (which advertises the
    proxy's address, so every Kafka connection goes through it): `cut`
    drops every connection and refuses new ones until `restore`; the
    broker and its data are untouched."""

    def __init__(self, listen_port, upstream_port):
        self.upstream = ("127.0.0.1", upstream_port)
        self.server = socket.create_server(("127.0.0.1", listen_port))
        self.conns = set()
        self.lock = threading.Lock()
        self.is_cut = False
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            client, _ = self.server.accept()
            if self.is_cut:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            # Forward each Kafka request and reply at once: with Nagle's
            # algorithm on, a small write waits for the peer's delayed ACK
            # (tens of milliseconds), which would slow every round trip.
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    def pump(self, src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            self.close(sock)

    def close(self, sock):
        with self.lock:
            self.conns.discard(sock)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def cut(self):
        self.is_cut = True
        with self.lock:
            conns = list(self.conns)
        for sock in conns:
            self.close(sock)

    def restore(self):
        self.is_cut = False


class Recorder(BaseHTTPRequestHandler):
    """The webhook consumer's target: records each delivery, in order."""

    deliveries = []
    lock = threading.Lock()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with Recorder.lock:
            Recorder.deliveries.append(body["eventId"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class Load:
    """Clients writing sessions through the session API until `target`
    events are committed (creates, refreshes and ends over many users)."""

    def __init__(self, base, target, rate, clients, rng):
        self.base, self.target, self.rate, self.clients = base, target, rate, clients
        self.rng = rng
        self.written = 0  # events acknowledged by the API
        self.errors = 0
        self.lock = threading.Lock()
        self.done = threading.Event()

    def call(self, method, path, body=None, headers=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, None
        except (OSError, urllib.error.URLError):
            return None, None

    def client(self, seed):
        rng = random.Random(seed)
        live = []
        while not self.done.is_set():
            # Steady rate per client, bursts of 3x for a second in every ten.
            burst = int(time.monotonic()) % 10 == 0
            time.sleep(self.clients / (self.rate * (3 if burst else 1)))
            op = rng.random()
            if not live or op < 0.4:
                key = str(uuid.uuid4())
                body = {"userId": f"user-{rng.randrange(500)}", "ttlSeconds": 3600}
                status, resp = self.retry("POST", "/sessions", body, {"Idempotency-Key": key})
                if status == 201:
                    live.append(resp["id"])
            elif op < 0.8:
                sid = rng.choice(live)
                status, _ = self.retry("POST", f"/sessions/{sid}/refresh", {})
            else:
                sid = live.pop(rng.randrange(len(live)))
                status, _ = self.retry("DELETE", f"/sessions/{sid}?reason=logout")
            with self.lock:
                if status in (200, 201, 204):
                    self.written += 1
                if self.written >= self.target:
                    self.done.set()

    def retry(self, method, path, body=None, headers=None):
        """Retry through outages (a create with its idempotency key writes once)."""
        for _ in range(120):
            status, resp = self.call(method, path, body, headers)
            if status is not None and status < 500:
                return status, resp
            with self.lock:
                self.errors += 1
            if self.done.is_set():
                return status, resp
            time.sleep(0.5)
        return None, None

    def run(self):
        threads = [threading.Thread(target=self.client, args=(self.rng.random(),), daemon=True)
                   for _ in range(self.clients)]
        for t in threads:
            t.start()
        return threads


class Pipeline:
    def __init__(self, args, run_dir):
        self.args = args
        self.run_dir = run_dir
        rid = uuid.uuid4().hex[:8]
        self.db_name, self.topic = f"chaos-{rid}", f"chaos-events-{rid}"
        self.group, self.order_group = f"chaos-{rid}", f"chaos-order-{rid}"
        env = dict(os.environ, RUST_LOG=os.environ.get("CHAOS_RUST_LOG", "info"), OUTBOX_LOG_FORMAT="text")
        env.pop("KUBECONFIG", None)
        # The run's own broker (in memory, like the stack's), reached only
        # through the proxy, so that the broker can be cut off without
        # losing its data.
        broker_port, proxy_port = free_port(), free_port()
        # The broker logs every request at info: warnings only (a full run
        # would write tens of GB).
        self.broker = Proc("broker", [args.tansu, "broker", "--listener-url", f"tcp://127.0.0.1:{broker_port}",
                                      "--advertised-listener-url", f"tcp://127.0.0.1:{proxy_port}",
                                      "--storage-engine", "memory://tansu/"], dict(env, RUST_LOG="warn"), run_dir)
        self.broker_port, self.proxy_port = broker_port, proxy_port
        args.kafka_bootstrap = f"127.0.0.1:{proxy_port}"
        common = ["--mongodb-uri", args.mongodb_uri, "--database", self.db_name]
        kafka = ["--kafka-bootstrap", args.kafka_bootstrap, "--schema-registry-url", args.registry_url]
        self.api_port = free_port()
        self.api = Proc("session-api", [args.bin, "session-api", *common, "--listen", f"127.0.0.1:{self.api_port}"],
                        env, run_dir)
        self.relays = []
        for name in ("relay-a", "relay-b"):
            port = free_port()
            p = Proc(name, [args.bin, "relay", *common, *kafka, "--route", f"Session={self.topic}",
                            "--schemas-dir", os.path.join(REPO, "schemas"),
                            "--relay-id", name, "--lease-backend", "mongodb", "--lease-seconds", str(LEASE_SECONDS),
                            "--shards", str(args.shards),
                            # Three attempts (about a second and a half): any outage
                            # longer than that must still turn no event dead.
                            "--backoff-initial-ms", "200", "--backoff-max-ms", "2000", "--max-attempts", "3",
                            "--metrics-listen", f"127.0.0.1:{port}"], env, run_dir)
            p.port = port
            self.relays.append(p)
        self.consumers = []
        for name in ("consumer-a", "consumer-b"):
            port = free_port()
            p = Proc(name, [args.bin, "consume", *common, *kafka, "--topic", self.topic, "--group-id", self.group,
                            "--handler", "projection", "--member-id", name, "--backoff-max-ms", "2000",
                            "--session-timeout-ms", "6000", "--metrics-listen", f"127.0.0.1:{port}"], env, run_dir)
            p.port = port
            self.consumers.append(p)
        self.hook_port = free_port()
        port = free_port()
        self.order = Proc("order-consumer", [args.bin, "consume", *common, *kafka, "--topic", self.topic,
                                             "--group-id", self.order_group, "--handler", "webhook",
                                             "--webhook-url", f"http://127.0.0.1:{self.hook_port}/events",
                                             "--backoff-max-ms", "2000", "--metrics-listen", f"127.0.0.1:{port}"],
                          env, run_dir)
        self.order.port = port
        self.mongo = pymongo.MongoClient(args.mongodb_uri, serverSelectionTimeoutMS=60000)
        self.db = self.mongo[self.db_name]
        self.duplicates_skipped = 0

    def all(self):
        return [self.api, *self.relays, *self.consumers, self.order]

    def stop_all(self):
        for p in self.all():
            p.stop()
        self.broker.stop()

    def start(self):
        # Databases of earlier runs (a failed run's is kept for a look until the next run).
        for name in self.mongo.list_database_names():
            if name.startswith("chaos-"):
                self.mongo.drop_database(name)
        self.broker.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.broker_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("chaos: the run's broker did not start; see " + self.run_dir)
                time.sleep(0.2)
        self.proxy = Proxy(self.proxy_port, self.broker_port)
        admin = AdminClient({"bootstrap.servers": self.args.kafka_bootstrap})
        admin.create_topics([NewTopic(self.topic, PARTITIONS, 1)])[self.topic].result(timeout=30)
        server = ThreadingHTTPServer(("127.0.0.1", self.hook_port), Recorder)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        for p in self.all():
            p.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/readyz", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.3)
        sys.exit("chaos: the session API did not become ready; see " + self.run_dir)

    def active_relay(self):
        """A relay publishing now (one holding a range's lease; with several
        ranges, both may be, and the first is taken)."""
        for r in self.relays:
            if r.alive() and (metric(r.port, "outbox_relay_leader") or 0) >= 1.0:
                return r
        return None

    def count_duplicates(self, consumer):
        """Add a consumer's skipped duplicates to the total before it goes."""
        d = metric(consumer.port, "outbox_consumer_duplicates_total")
        self.duplicates_skipped += int(d or 0)


class Faults:
    """The seeded schedule of faults, each bounded in time."""

    KINDS = ("relay-kill", "relay-pause", "consumer-kill", "mongod-restart", "registry-restart", "broker-cut",
             "relay-clock-ahead", "broker-long-cut", "checkpoint-reset")

    def __init__(self, pipe, rng, every, kinds):
        self.pipe, self.rng, self.every, self.kinds = pipe, rng, every, kinds
        self.injected = collections.Counter()
        self.log = []
        self.stop = threading.Event()
        self.error = None

    def run(self):
        try:
            self.schedule()
        except Exception as e:  # a fault that could not be injected or undone fails the run
            self.error = f"{type(e).__name__}: {e}"
            log(f"fault injection failed: {self.error}")

    def schedule(self):
        while not self.stop.wait(self.rng.uniform(self.every * 0.5, self.every * 1.5)):
            # A checkpoint reset republishes the whole outbox (a first-start
            # scan): at most two per run, or the duplicates swamp the consumers.
            kinds = [k for k in self.kinds if k != "checkpoint-reset" or self.injected[k] < 2] or self.kinds
            kind = self.rng.choice(kinds)
            t0 = time.monotonic()
            what = getattr(self, kind.replace("-", "_"))()
            if what:
                self.injected[kind] += 1
                self.log.append((round(t0 - START, 1), kind, what, round(time.monotonic() - t0, 1)))
                log(f"fault {kind}: {what} ({time.monotonic() - t0:.1f}s)")

    def relay_kill(self):
        r = self.pipe.active_relay()
        if not r:
            return None
        r.kill()
        time.sleep(self.rng.uniform(0.5, 2))
        r.start()
        return f"SIGKILL {r.name} (active), restarted"

    def relay_pause(self):
        r = self.pipe.active_relay()
        if not r:
            return None
        pause = LEASE_SECONDS + self.rng.uniform(1, 4)
        r.signal(signal.SIGSTOP)
        time.sleep(pause)
        r.signal(signal.SIGCONT)
        return f"SIGSTOP {r.name} (active) for {pause:.1f}s > lease {LEASE_SECONDS}s, then SIGCONT"

    def consumer_kill(self):
        c = self.rng.choice(self.pipe.consumers)
        self.pipe.count_duplicates(c)
        c.kill()
        time.sleep(self.rng.uniform(0.5, 3))
        c.start()
        return f"SIGKILL {c.name}, restarted"

    def broker_cut(self):
        cut = self.rng.uniform(3, 10)
        self.pipe.proxy.cut()
        time.sleep(cut)
        self.pipe.proxy.restore()
        return f"broker unreachable for {cut:.1f}s (every connection dropped and refused), data kept"

    def broker_long_cut(self):
        """The broker away for far longer than the relays' attempt budget."""
        cut = self.rng.uniform(20, 40)
        self.pipe.proxy.cut()
        time.sleep(cut)
        self.pipe.proxy.restore()
        return f"broker unreachable for {cut:.1f}s, longer than the relays' 3-attempt budget, data kept"

    def checkpoint_reset(self):
        """Every checkpoint of the outbox deleted while the relays publish:
        the next write of each publishing relay is refused (its claim is
        gone), it steps down, claims again and, with no checkpoint, starts
        with a first-start recovery scan, while the clients keep writing."""
        pattern = "^outbox(#r[0-9]+of[0-9]+)?$"
        deleted = self.pipe.db.outbox_relay_checkpoints.delete_many({"_id": {"$regex": pattern}}).deleted_count
        return f"{deleted} relay checkpoint(s) deleted while publishing: recovery scans under load"

    def relay_clock_ahead(self):
        """The standby restarted with its clock ahead (libfaketime), then
        made the active relay by killing the other; bounded, then normal."""
        active = self.pipe.active_relay()
        standby = next((r for r in self.pipe.relays if r is not active), None)
        if not active or not standby:
            return None
        ahead = self.rng.choice([30, 600, 3600])
        standby.kill()
        standby.start({"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": f"+{ahead}s", "FAKETIME_DONT_RESET": "1"})
        time.sleep(2)
        active.kill()
        # Down for longer than the lease: the skewed relay takes over and publishes.
        time.sleep(LEASE_SECONDS + self.rng.uniform(2, 6))
        skewed_led = self.pipe.active_relay() is standby
        active.start()
        time.sleep(2)
        standby.kill()
        standby.start()
        return (f"{standby.name} restarted {ahead}s ahead, {active.name} (active) SIGKILLed; the skewed relay "
                f"{'took over' if skewed_led else 'did NOT take over'}; {active.name} back, {standby.name} "
                f"restarted in time")

    def restart_stack_process(self, name):
        """SIGKILL a process of the stack and start it again with
        `stack.sh up` on the same data."""
        stack_sh("kill", name)
        time.sleep(self.rng.uniform(1, 4))
        stack_sh("up", name)

    def mongod_restart(self):
        self.restart_stack_process("mongo")
        return "SIGKILL mongod, restarted (same data)"

    def registry_restart(self):
        self.restart_stack_process("registry")
        return "SIGKILL the schema registry, restarted (same store)"


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def stack_sh(*args):
    """Run `scripts/stack.sh` with `args`; stop the run if it fails."""
    done = subprocess.run([os.path.join(REPO, "scripts", "stack.sh"), *args],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"chaos: stack.sh {' '.join(args)} failed: {done.stderr[-2000:]}")


class Progress:
    """Samples every second: events committed, records in the topic,
    events applied; the longest stall of each while behind."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.stop = threading.Event()
        self.stalls = {"publish": 0.0, "consume": 0.0}
        # Where each longest stall lies, in seconds since the start.
        self.windows = {"publish": None, "consume": None}

    def high_watermarks(self, consumer):
        total = 0
        for p in range(PARTITIONS):
            _, high = consumer.get_watermark_offsets(TopicPartition(self.pipe.topic, p), timeout=5)
            total += high
        return total

    def run(self):
        c = Consumer({"bootstrap.servers": self.pipe.args.kafka_bootstrap, "group.id": "chaos-progress"})
        last = {"publish": (None, time.monotonic()), "consume": (None, time.monotonic())}
        while not self.stop.wait(1):
            try:
                committed = self.pipe.db.outbox.estimated_document_count()
                applied = self.pipe.db.processed_events.count_documents({"group": {"$regex": f"^{self.pipe.group}"}})
                records = self.high_watermarks(c)
            except Exception:  # mongod or the broker away: a stall, measured by the next sample
                continue
            now = time.monotonic()
            for key, value, behind in (("publish", records, records < committed),
                                       ("consume", applied, applied < committed)):
                seen, since = last[key]
                if value != seen or not behind:
                    last[key] = (value, now)
                elif now - since > self.stalls[key]:
                    self.stalls[key] = now - since
                    self.windows[key] = (round(since - START, 1), round(now - START, 1))
        c.close()


def read_topic(bootstrap, topic):
    """Every record of the topic: (partition, offset, eventId, key). Reads
    until every partition is past its high watermark and nothing more comes
    for 3 s."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"chaos-check-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
    c.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    out, position = [], {p: 0 for p in range(PARTITIONS)}
    idle, deadline = 0, time.monotonic() + 180
    while time.monotonic() < deadline:
        m = c.poll(1)
        if m is None or m.error():
            idle += 1
            if idle >= 3 and all(position[p] >= ends[p] for p in ends):
                break
            continue
        idle = 0
        headers = dict(m.headers() or [])
        out.append((m.partition(), m.offset(), headers.get("eventId", b"").decode(), (m.key() or b"").decode()))
        position[m.partition()] = max(position[m.partition()], m.offset() + 1)
    c.close()
    counts = collections.Counter(r[0] for r in out)
    log("topic read: " + ", ".join(f"p{p}: {counts[p]} record(s), next offset {position[p]}, high watermark {ends[p]}"
                                   for p in range(PARTITIONS)))
    return out


def order_violations(event_ids, version):
    """Events, by their first occurrence in `event_ids`, whose aggregate
    version is not above the one before them of the same aggregate; and
    the set of events seen."""
    violations, seen, last = 0, set(), {}
    for eid in event_ids:
        if eid in seen or eid not in version:
            continue
        seen.add(eid)
        agg, v = version[eid]
        if v <= last.get(agg, -1):
            violations += 1
        last[agg] = v
    return violations, seen


def expected_model(events):
    """The read model computed from committed events, by the projection's rules."""
    model = {}
    for e in events:
        p = e.get("payload", {})
        user = p.get("userId")
        if not user:
            continue
        m = model.setdefault(user, {"activeSessions": 0, "sessionsCreated": 0, "refreshes": 0})
        if e["eventName"] == "SessionCreated":
            m["activeSessions"] += 1
            m["sessionsCreated"] += 1
        elif e["eventName"] == "SessionRefreshed":
            m["refreshes"] += 1
        elif e["eventName"] == "SessionEnded":
            m["activeSessions"] -= 1
    return model


def check(pipe, faults, progress, load, wall):
    db = pipe.db
    events = list(db.outbox.find({}, {"payload": 1, "eventName": 1, "aggregateId": 1, "aggregateVersion": 1,
                                      "status": 1}))
    ids = {e["_id"] for e in events}
    version = {e["_id"]: (e["aggregateId"], e.get("aggregateVersion") or 0) for e in events}
    records = read_topic(pipe.args.kafka_bootstrap, pipe.topic)
    in_topic = collections.Counter(r[2] for r in records)
    lost = len(ids - set(in_topic))
    dup_published = sum(n - 1 for n in in_topic.values())

    # Order in the topic (the first record of each event, in offset order)
    # and of handling (the first delivery of each to the webhook consumer).
    topic_violations, _ = order_violations((r[2] for r in sorted(records)), version)
    with Recorder.lock:
        deliveries = list(Recorder.deliveries)
    handled_violations, seen = order_violations(deliveries, version)
    webhook_missing = len(ids - seen)

    # Exactly-once effect.
    expected = expected_model(events)
    actual = {d["_id"]: {k: d.get(k, 0) for k in ("activeSessions", "sessionsCreated", "refreshes")}
              for d in db.session_projection.find({})}
    model_diffs = sum(1 for u in set(expected) | set(actual) if expected.get(u) != actual.get(u))
    active = collections.Counter(s["userId"] for s in db.sessions.find({"endedAt": None}, {"userId": 1}))
    domain_diffs = sum(1 for u, m in expected.items() if m["activeSessions"] != active.get(u, 0))
    state = db.projection_generations.find_one({"_id": "session_projection"}) or {}
    scope = state.get("current", {}).get("scope", pipe.group)
    marks = db.processed_events.count_documents({"group": scope})
    stuck = sum(1 for e in events if e.get("status") in ("failed", "held", "dead"))
    for c in pipe.consumers:
        pipe.count_duplicates(c)

    rows = [
        ("events committed (outbox)", len(ids)),
        ("events acknowledged to clients", load.written),
        ("client retries through outages", load.errors),
        *[(f"faults: {k}", faults.injected.get(k, 0)) for k in Faults.KINDS],
        ("records in the topic", len(records)),
        ("lost (committed, not in the topic)", lost),
        ("duplicates published", dup_published),
        ("duplicates skipped by consumers", pipe.duplicates_skipped),
        ("processed marks (projection group)", marks),
        ("read-model users differing from the events", model_diffs),
        ("users whose active sessions differ from the sessions collection", domain_diffs),
        ("order violations in the topic", topic_violations),
        ("order violations in handling (webhook consumer)", handled_violations),
        ("events the webhook consumer never saw", webhook_missing),
        ("stuck (failed, held or dead)", stuck),
        ("longest publish stall (s)", round(progress.stalls["publish"], 1)),
        ("longest consume stall (s)", round(progress.stalls["consume"], 1)),
        ("wall time (s)", round(wall, 1)),
    ]
    print()
    print(f"Chaos run, seed {pipe.args.seed}, {pipe.args.events} events, {pipe.args.shards} bucket range(s), "
          f"database {pipe.db_name}")
    print()
    print("| measure | value |\n|---|---:|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print()
    print("| at (s) | fault | what | took (s) |\n|---:|---|---|---:|")
    for t, kind, what, took in faults.log:
        print(f"| {t} | {kind} | {what} | {took} |")
    # The longest stalls next to the faults under way then (a stall
    # longer than its faults is worth a look in the logs).
    for key, window in progress.windows.items():
        if window:
            start, end = window
            during = [f"{kind} at {t}s ({took}s)" for t, kind, _, took in faults.log
                      if t <= end and t + took + 1 >= start - 1]
            print(f"\nlongest {key} stall: {start}s to {end}s; faults under way: {', '.join(during) or 'none'}")
    failures = []
    if faults.error:
        failures.append(f"the harness could not inject a fault: {faults.error}")
    if lost:
        failures.append(f"{lost} event(s) lost")
    if model_diffs or domain_diffs or marks != len(ids):
        failures.append(f"double or missing effect ({model_diffs} user(s) differ, {marks} marks for {len(ids)} events)")
    if topic_violations or handled_violations:
        failures.append(f"order violated ({topic_violations} in the topic, {handled_violations} in handling)")
    if stuck:
        failures.append(f"{stuck} event(s) stuck")
    if webhook_missing:
        failures.append(f"{webhook_missing} event(s) never handled by the webhook consumer")
    return failures


def drained(pipe):
    ids = pipe.db.outbox.count_documents({})
    state = pipe.db.projection_generations.find_one({"_id": "session_projection"}) or {}
    scope = state.get("current", {}).get("scope", pipe.group)
    with Recorder.lock:
        handled = len(set(Recorder.deliveries))
    return pipe.db.processed_events.count_documents({"group": scope}) >= ids and handled >= ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=int(os.environ.get("CHAOS_EVENTS", 100_000)))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("CHAOS_SEED", random.randrange(1 << 31))))
    ap.add_argument("--rate", type=int, default=int(os.environ.get("CHAOS_RATE", 400)), help="events/s, steady")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--fault-every", type=float, default=float(os.environ.get("CHAOS_FAULT_EVERY", 15)),
                    help="mean seconds between faults")
    ap.add_argument("--faults", default=os.environ.get("CHAOS_FAULTS", ",".join(Faults.KINDS)))
    ap.add_argument("--shards", type=int, default=int(os.environ.get("CHAOS_SHARDS", 1)),
                    help="bucket ranges the relays share (1: one active relay, one standby)")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tansu", required=True, help="the tansu broker binary (the run starts its own)")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--drain-timeout", type=float, default=300)
    args = ap.parse_args()
    args.mongodb_uri = os.environ["MONGODB_URI"]
    args.registry_url = os.environ["SCHEMA_REGISTRY_URL"]
    kinds = [k for k in args.faults.split(",") if k]
    unknown = set(kinds) - set(Faults.KINDS)
    if unknown:
        sys.exit(f"chaos: unknown fault kind(s) {sorted(unknown)}; known: {', '.join(Faults.KINDS)}")
    if "relay-clock-ahead" in kinds and not os.path.exists(FAKETIME_LIB):
        sys.exit(f"chaos: relay-clock-ahead needs libfaketime ({FAKETIME_LIB}): scripts/stack.sh install")
    os.makedirs(args.run_dir, exist_ok=True)
    log(f"seed {args.seed} (replay with CHAOS_SEED={args.seed}), {args.events} events at {args.rate}/s, "
        f"faults every ~{args.fault_every}s from {kinds}; logs in {args.run_dir}")
    rng = random.Random(args.seed)
    pipe = Pipeline(args, args.run_dir)
    pipe.start()
    log(f"pipeline up: session API :{pipe.api_port}, relays {[r.port for r in pipe.relays]}, "
        f"consumers {[c.port for c in pipe.consumers]}, database {pipe.db_name}, topic {pipe.topic}")
    load = Load(f"http://127.0.0.1:{pipe.api_port}", args.events, args.rate, args.clients, random.Random(rng.random()))
    faults = Faults(pipe, random.Random(rng.random()), args.fault_every, kinds)
    progress = Progress(pipe)
    threading.Thread(target=progress.run, daemon=True).start()
    fault_thread = threading.Thread(target=faults.run, daemon=True)
    t0 = time.monotonic()
    clients = load.run()
    fault_thread.start()
    while not load.done.wait(5):
        log(f"load: {load.written}/{args.events} events acknowledged, {load.errors} retries")
    for t in clients:
        t.join(timeout=60)
    faults.stop.set()
    fault_thread.join()
    log(f"load done: {load.written} events acknowledged; draining")
    pipe.proxy.restore()
    for p in pipe.all():  # anything left stopped by a fault that was cut short
        p.signal(signal.SIGCONT)
        if not p.alive():
            p.start()
    deadline = time.monotonic() + args.drain_timeout
    while not drained(pipe) and time.monotonic() < deadline:
        time.sleep(2)
    wall = time.monotonic() - t0
    time.sleep(2)  # the last offsets committed, the last reports written
    progress.stop.set()
    failures = check(pipe, faults, progress, load, wall)
    if failures and os.environ.get("CHAOS_KEEP") == "1":
        print(f"\nchaos: CHAOS_KEEP=1: processes left running; broker at {pipe.args.kafka_bootstrap}")
        os._exit(1)
    pipe.stop_all()
    if failures:
        print("\nchaos: FAILED: " + "; ".join(failures) + f" (seed {args.seed}; logs in {args.run_dir})")
        sys.exit(1)
    print(f"\nchaos: passed (seed {args.seed}); its logs removed")
    pipe.mongo.drop_database(pipe.db_name)
    shutil.rmtree(args.run_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
