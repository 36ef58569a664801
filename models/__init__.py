"""Pure ML and scoring for xrec. No Kafka, no Redis: plain Python / numpy (torch later)."""
