"""A webhook receiver for the tests, reading requests with PyPI's
`cloudevents` SDK and verifying them with PyPI's `standardwebhooks`.

    python webhook_receiver.py OUT.jsonl SECRET [--retry-after SECONDS]
        [--delay-max-ms MS] [--fail-percent P] [--fail-every N] [--host ADDRESS]
        [--reject-subject SUBJECT --reject-while PATH]

Listens on 127.0.0.1 (or --host; an ephemeral port, printed on the first
line of stdout) and appends one JSON object per event to OUT.jsonl (a request in
the batch content mode, `application/cloudevents-batch+json`, holds many,
each parsed as a structured CloudEvent): the
CloudEvent as the SDK reads it (id, type, source, subject, time,
partitionkey, data), whether the Standard Webhooks signature verifies
with SECRET (`verified`, `null` without a signature), the Authorization
and Idempotency-Key headers, the content type, the arrival and answer
times, the requests in flight when it arrived (itself included) and the
status answered. Lines are written when the answer is, so their order is
the order of the answers.

--retry-after: the first request of each event (Idempotency-Key) is answered 429 with that
Retry-After, the next ones 200. --delay-max-ms: each answer waits a random
0..MS milliseconds. --fail-percent: that share of requests is answered 503;
--fail-every N: every Nth request is. --reject-subject with --reject-while:
requests with an event of that subject (aggregate) are answered 422 (a
rejection: the consumer dead-letters the event after backoff.maxAttempts)
while the file PATH exists.
"""
import argparse
import json
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cloudevents.http import from_http, from_json
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

PARSER = argparse.ArgumentParser()
PARSER.add_argument("out")
PARSER.add_argument("secret")
PARSER.add_argument("--retry-after")
PARSER.add_argument("--delay-max-ms", type=float, default=0)
PARSER.add_argument("--fail-percent", type=float, default=0)
PARSER.add_argument("--fail-every", type=int, default=0)
PARSER.add_argument("--host", default="127.0.0.1")
PARSER.add_argument("--reject-subject")
PARSER.add_argument("--reject-while")
ARGS = PARSER.parse_args()
OUT, SECRET, RETRY_AFTER = ARGS.out, ARGS.secret, ARGS.retry_after
LOCK = threading.Lock()
SEEN = set()
IN_FLIGHT = [0]
REQUESTS = [0]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        arrived = time.time()
        with LOCK:
            IN_FLIGHT[0] += 1
            in_flight = IN_FLIGHT[0]
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        if headers.get("content-type", "").startswith("application/cloudevents-batch+json"):
            events = [from_json(json.dumps(doc)) for doc in json.loads(body)]
        else:
            events = [from_http(headers, body)]
        verified = None
        if "webhook-signature" in headers:
            try:
                Webhook(SECRET).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        request_id = headers.get("idempotency-key")
        with LOCK:
            first = request_id not in SEEN
            SEEN.add(request_id)
            REQUESTS[0] += 1
            nth = REQUESTS[0]
        status = 429 if RETRY_AFTER is not None and first else 200
        if status == 200 and (random.random() * 100 < ARGS.fail_percent
                              or ARGS.fail_every and nth % ARGS.fail_every == 0):
            status = 503
        if (ARGS.reject_subject and any(e.get("subject") == ARGS.reject_subject for e in events)
                and os.path.exists(ARGS.reject_while)):
            status = 422
        time.sleep(random.random() * ARGS.delay_max_ms / 1000)
        answered = time.time()
        lines = [json.dumps({
            "id": event["id"], "type": event["type"], "source": event["source"],
            "subject": event.get("subject"), "time": event.get("time"),
            "partitionkey": event.get("partitionkey"), "specversion": event["specversion"],
            "data": event.data, "verified": verified,
            "authorization": headers.get("authorization"), "idempotency_key": request_id,
            "content_type": headers.get("content-type"), "arrived": arrived, "answered": answered,
            "in_flight": in_flight, "batch": len(events), "status": status,
        }) for event in events]
        with LOCK, open(OUT, "a") as f:
            f.write("".join(line + "\n" for line in lines))
            IN_FLIGHT[0] -= 1
        self.send_response(status)
        if status == 429:
            self.send_header("retry-after", RETRY_AFTER)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


class Server(ThreadingHTTPServer):
    # Many deliveries connect at once: a short accept backlog would delay them.
    request_queue_size = 1024
    daemon_threads = True


server = Server((ARGS.host, 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
