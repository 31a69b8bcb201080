"""The swarm health dashboard, `potluck health`: a live web page, a JSON API and Prometheus metrics.

``crawler`` (``Crawler`` keeps a ``SwarmState`` of ``NodeView``s fresh from the DHT and info
probes), ``view`` (pure functions: the state as JSON and as Prometheus text, and a synthetic
state for tests), ``server`` (``HealthServer``: a small asyncio HTTP server for the page, the
JSON and the metrics), ``page.html``/``page.js``/``page.css`` (the page, no build step), ``cli``.
"""
