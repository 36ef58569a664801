"""The worker's agents, one module each, over a shared :class:`~streams.agents.context.Context`.

=================  ==============================================================
``normalize``      platform topics → validate, pseudonymize → ``xrec.events.unified``
``recommend``      unified events in adaptive micro-batches → state, prequential
                   quality, ranking, recommendations, training examples, drift
``train``          training examples → optimizer steps → head versions
``catalog``        catalog records → item text → vectors
``ops``            ``/metrics``, ``/healthz``, the stall watchdog, heartbeats
=================  ==============================================================

:func:`streams.app.create_app` builds the context and calls each wanted module's
``install``; the agents talk to each other only through topics and Redis.
"""
