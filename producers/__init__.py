"""Everything that writes to xrec's input topics: the simulator, replay of logs, catalog loading."""
