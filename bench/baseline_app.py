"""The baseline: the ingest design of the old operations manual, rebuilt only to be measured.

FastAPI with an ``X-Auth`` header dependency, stdlib ``json``, and for every request a
``filelock.FileLock`` plus ``open(path, "a")``; no fsync. Run it from ``bench/`` with
``uvicorn baseline_app:app``; it reads LEITSTAND_TOKEN and LEITSTAND_DATA_DIR like leitstand.
"""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import PlainTextResponse
from filelock import FileLock

TOKEN = os.environ["LEITSTAND_TOKEN"]
DATA_DIR = os.environ.get("LEITSTAND_DATA_DIR", "data")
DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")

os.makedirs(DATA_DIR, exist_ok=True)
app = FastAPI()


def check_token(x_auth: Annotated[str | None, Header()] = None) -> None:
    if x_auth != TOKEN:
        raise HTTPException(status_code=401, detail="unauthorized")


@app.post("/ingest/{domain}", response_class=PlainTextResponse, dependencies=[Depends(check_token)])
async def ingest(domain: str, request: Request) -> str:
    if not DOMAIN.fullmatch(domain):
        raise HTTPException(status_code=400, detail="invalid domain")
    try:
        payload: Any = json.loads(await request.body())
    except ValueError:
        raise HTTPException(status_code=400, detail="invalid json") from None
    items = payload if isinstance(payload, list) else [payload]
    if not all(isinstance(item, dict) for item in items):
        raise HTTPException(status_code=400, detail="invalid payload")
    path = os.path.join(DATA_DIR, domain + ".jsonl")
    with FileLock(path + ".lock"), open(path, "a") as out:
        for event in items:
            out.write(json.dumps({**event, "domain": domain}) + "\n")
    return "ok"
