"""The jobs, imported by name by `rq worker` (run in this folder, `--path .`)."""

import os

from rq import get_current_job
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from models import Done


def record(text: str) -> str:
    """Write the job's row with the release of the worker that ran it; run twice, it keeps one."""
    job = get_current_job()
    # rq runs each job in a forked process that exits after it: no pool to keep.
    engine = create_engine(os.environ["SQLALCHEMY_DATABASE_URI"], poolclass=NullPool)
    try:
        with Session(engine) as session:
            if session.scalar(select(Done).where(Done.job_id == job.id)) is None:
                session.add(Done(job_id=job.id, text=text, worker_release=os.environ.get("RELEASE", "?")))
                session.commit()
    finally:
        engine.dispose()
    return job.id
