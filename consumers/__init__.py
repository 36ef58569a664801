"""Everything that reads xrec's result topics: tail, the Redis recs cache, (later) evaluators."""
