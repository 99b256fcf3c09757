"""A small notes service on SQLAlchemy and PyMySQL, as a Python app would be written: it knows
only SQLALCHEMY_DATABASE_URI (the deployer builds it from its generated values) and PORT, and,
when it is given REDIS_URL, keeps a cache there with cachelib under REDIS_PREFIX (get, set with
an expiry and delete of its own keys: what a prefix-confined Redis user may send)."""

import json
import os
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sqlalchemy import Column, Integer, String, create_engine, func, select
from sqlalchemy.orm import DeclarativeBase, Session


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    id = Column(Integer, primary_key=True)
    text = Column(String(200), nullable=False)


engine = create_engine(os.environ["SQLALCHEMY_DATABASE_URI"], pool_pre_ping=True, pool_size=4)


def make_cache():
    """A RedisCache on REDIS_URL (its user and password), every key under REDIS_PREFIX; None
    without REDIS_URL, and then nothing is cached."""
    if not os.environ.get("REDIS_URL"):
        return None
    import redis
    from cachelib.redis import RedisCache
    client = redis.Redis.from_url(os.environ["REDIS_URL"], socket_timeout=5)
    return RedisCache(client, key_prefix=os.environ.get("REDIS_PREFIX", ""), default_timeout=60)


cache = make_cache()


def note_count() -> tuple[int, bool]:
    """The number of notes, from the cache when it has it (for 60 s); and whether it did."""
    if cache is not None:
        cached = cache.get("count")
        if cached is not None:
            return int(cached), True
    with Session(engine) as session:
        count = session.scalar(select(func.count()).select_from(Note))
    if cache is not None:
        cache.set("count", count, timeout=60)
    return count, False


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
            return self.answer(200, {"ok": True})
        if url.path == "/version":
            return self.answer(200, {"release": os.environ.get("RELEASE", "?"), "pid": os.getpid(), "cwd": os.getcwd()})
        if url.path == "/notes":
            with Session(engine) as session:
                return self.answer(200, {"notes": [n.text for n in session.scalars(select(Note).order_by(Note.id))]})
        if url.path == "/count":
            count, cached = note_count()
            return self.answer(200, {"count": count, "cached": cached})
        return self.answer(404, {"error": "not found"})

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path != "/notes":
            return self.answer(404, {"error": "not found"})
        text = urllib.parse.parse_qs(url.query).get("text", [""])[0]
        with Session(engine) as session:
            session.add(Note(text=text))
            session.commit()
        if cache is not None:
            cache.delete("count")
        return self.answer(201, {"added": text})

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    if sys.argv[1:] == ["migrate"]:
        Base.metadata.create_all(engine)
        print("notes: tables ready")
    else:
        server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
        print(f"notes: listening on port {os.environ['PORT']}", flush=True)
        server.serve_forever()
