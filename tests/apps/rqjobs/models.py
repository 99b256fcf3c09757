"""The one table: a row per job the worker has done, written by the worker and read by the web
service (both use the same database)."""

from sqlalchemy import Column, Integer, String
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


class Done(Base):
    __tablename__ = "done"
    id = Column(Integer, primary_key=True)
    job_id = Column(String(64), nullable=False, unique=True)
    text = Column(String(200), nullable=False)
    worker_release = Column(String(20), nullable=False)

    def as_dict(self) -> dict:
        return {"id": self.job_id, "text": self.text, "release": self.worker_release}
