"""A webhook receiver for the tests, reading requests with PyPI's
`cloudevents` SDK and verifying them with PyPI's `standardwebhooks`.

    python webhook_receiver.py OUT.jsonl SECRET [--retry-after SECONDS]
        [--delay-max-ms MS] [--fail-percent P]

Listens on 127.0.0.1 (an ephemeral port, printed on the first line of
stdout) and appends one JSON object per request to OUT.jsonl: the
CloudEvent as the SDK reads it (id, type, source, subject, time,
partitionkey, data), whether the Standard Webhooks signature verifies
with SECRET (`verified`, `null` without a signature), the Authorization
and Idempotency-Key headers, the content type, the arrival and answer
times, the requests in flight when it arrived (itself included) and the
status answered. Lines are written when the answer is, so their order is
the order of the answers.

--retry-after: the first request of each event is answered 429 with that
Retry-After, the next ones 200. --delay-max-ms: each answer waits a random
0..MS milliseconds. --fail-percent: that share of requests is answered 503.
"""
import argparse
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cloudevents.http import from_http
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

PARSER = argparse.ArgumentParser()
PARSER.add_argument("out")
PARSER.add_argument("secret")
PARSER.add_argument("--retry-after")
PARSER.add_argument("--delay-max-ms", type=float, default=0)
PARSER.add_argument("--fail-percent", type=float, default=0)
ARGS = PARSER.parse_args()
OUT, SECRET, RETRY_AFTER = ARGS.out, ARGS.secret, ARGS.retry_after
LOCK = threading.Lock()
SEEN = set()
IN_FLIGHT = [0]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        arrived = time.time()
        with LOCK:
            IN_FLIGHT[0] += 1
            in_flight = IN_FLIGHT[0]
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        event = from_http(headers, body)
        verified = None
        if "webhook-signature" in headers:
            try:
                Webhook(SECRET).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        with LOCK:
            first = event["id"] not in SEEN
            SEEN.add(event["id"])
        status = 429 if RETRY_AFTER is not None and first else 200
        if status == 200 and random.random() * 100 < ARGS.fail_percent:
            status = 503
        time.sleep(random.random() * ARGS.delay_max_ms / 1000)
        line = json.dumps({
            "id": event["id"], "type": event["type"], "source": event["source"],
            "subject": event.get("subject"), "time": event.get("time"),
            "partitionkey": event.get("partitionkey"), "specversion": event["specversion"],
            "data": event.data, "verified": verified,
            "authorization": headers.get("authorization"), "idempotency_key": headers.get("idempotency-key"),
            "content_type": headers.get("content-type"), "arrived": arrived, "answered": time.time(),
            "in_flight": in_flight, "status": status,
        })
        with LOCK, open(OUT, "a") as f:
            f.write(line + "\n")
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


server = Server(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
