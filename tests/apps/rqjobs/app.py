"""A web service that hands work to an rq worker, as a Python app would be written: it knows only
SQLALCHEMY_DATABASE_URI (built in the spec from the generated values), REDIS_URL and PORT.

    python app.py migrate     create the table
    python app.py serve       the web service on 127.0.0.1:$PORT
    rq worker --url "$REDIS_URL" --path . default     the worker (tasks.record)"""

import json
import os
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from redis import Redis
from rq import Queue
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from models import Base, Done
from tasks import record

engine = create_engine(os.environ["SQLALCHEMY_DATABASE_URI"], pool_pre_ping=True, pool_size=4)


def redis() -> Redis:
    return Redis.from_url(os.environ["REDIS_URL"], socket_timeout=10)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/health":
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            self.server.redis.ping()
            return self.answer(200, {"ok": True})
        if url.path == "/version":
            return self.answer(200, {"release": os.environ.get("RELEASE", "?"), "pid": os.getpid(), "cwd": os.getcwd()})
        if url.path == "/done":
            with Session(engine) as session:
                return self.answer(200, {"done": [d.as_dict() for d in session.scalars(select(Done).order_by(Done.id))]})
        if url.path.startswith("/jobs/"):
            job_id = url.path[len("/jobs/"):]
            with Session(engine) as session:
                done = session.scalar(select(Done).where(Done.job_id == job_id))
            if done is None:
                return self.answer(404, {"error": "not done", "id": job_id})
            return self.answer(200, done.as_dict())
        return self.answer(404, {"error": "not found"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/jobs":
            return self.answer(404, {"error": "not found"})
        text = urllib.parse.parse_qs(url.query).get("text", [""])[0]
        job = Queue("default", connection=self.server.redis).enqueue(record, text)
        return self.answer(202, {"id": job.id})

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    if sys.argv[1:] == ["migrate"]:
        Base.metadata.create_all(engine)
        print("rqjobs: tables ready")
    elif sys.argv[1:] == ["serve"]:
        server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
        server.redis = redis()  # a connection pool, shared by the request threads
        print(f"rqjobs: listening on port {os.environ['PORT']}", flush=True)
        server.serve_forever()
    else:
        sys.exit("usage: app.py migrate | serve")
