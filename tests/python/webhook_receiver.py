"""A webhook receiver for the tests, reading requests with PyPI's
`cloudevents` SDK and verifying them with PyPI's `standardwebhooks`.

    python webhook_receiver.py OUT.jsonl SECRET [RETRY_AFTER_SECONDS]

Listens on 127.0.0.1 (an ephemeral port, printed on the first line of
stdout) and appends one JSON object per request to OUT.jsonl: the
CloudEvent as the SDK reads it (id, type, source, subject, time,
partitionkey, data), whether the Standard Webhooks signature verifies
with SECRET (`verified`, `null` without a signature), the Authorization
and Idempotency-Key headers, the content type, the arrival time and the
status answered. With RETRY_AFTER_SECONDS, the first request of each
event is answered 429 with that Retry-After, the next ones 200.
"""
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cloudevents.http import from_http
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

OUT, SECRET = sys.argv[1], sys.argv[2]
RETRY_AFTER = sys.argv[3] if len(sys.argv) > 3 else None
LOCK = threading.Lock()
SEEN = set()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        arrived = time.time()
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
        line = json.dumps({
            "id": event["id"], "type": event["type"], "source": event["source"],
            "subject": event.get("subject"), "time": event.get("time"),
            "partitionkey": event.get("partitionkey"), "specversion": event["specversion"],
            "data": event.data, "verified": verified,
            "authorization": headers.get("authorization"), "idempotency_key": headers.get("idempotency-key"),
            "content_type": headers.get("content-type"), "arrived": arrived, "status": status,
        })
        with LOCK, open(OUT, "a") as f:
            f.write(line + "\n")
        self.send_response(status)
        if status == 429:
            self.send_header("retry-after", RETRY_AFTER)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
