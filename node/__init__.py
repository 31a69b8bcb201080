"""The volunteer's server: ``server.Node`` (life cycle), ``handlers.BlockServicer`` (RPCs),
``sessions`` (sessions and the cache budget), ``compute.ComputeLane``, ``announcer.Announcer``,
``links.PushLinks`` (hand-off streams to next nodes), ``pings`` (round trips to other nodes),
``throughput`` (speed measurement), ``bootstrap`` (`potluck dht`), ``swarm`` (`potluck swarm`), ``cli``."""
