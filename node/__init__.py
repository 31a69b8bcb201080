"""The volunteer's server: ``server.Node`` (life cycle), ``handlers.BlockServicer`` (RPCs),
``sessions`` (sessions and the cache budget), ``compute.ComputeLane``, ``announcer.Announcer``,
``bootstrap`` (`potluck dht`), ``swarm`` (`potluck swarm`), ``cli``."""
