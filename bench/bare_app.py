"""A bare Faust pass-through agent (event → output record), the benchmark's baseline.

Same broker settings as the xrec worker (streams.app.base_app). Run:
``python bench/bare_app.py worker`` with KAFKA_BOOTSTRAP_SERVERS and BARE_IN / BARE_OUT set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faust  # noqa: E402

from streams.app import base_app  # noqa: E402
from streams.settings import Settings  # noqa: E402

settings = Settings()
app = base_app(settings, os.environ.get("BARE_APP_ID", "xrec-bare"))
raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
src = app.topic(os.environ["BARE_IN"], **raw)
dst = app.topic(os.environ["BARE_OUT"], **raw)


@app.agent(src)
async def passthrough(stream):  # type: ignore[no-untyped-def]
    async for event in stream.events():
        await dst.send(key=event.key, value=event.value)


if __name__ == "__main__":
    faust.Worker(app, loglevel="WARNING", quiet=True, redirect_stdouts=False
                 ).execute_from_commandline()
