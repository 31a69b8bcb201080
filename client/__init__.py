"""Everything on the user's side: ``model.AutoDistributedModelForCausalLM`` (the transformers model
with remote blocks), ``session`` (inference sessions, hand-off and failover), ``swarm_view.SwarmView``
(the swarm view, bans, forward), ``routing`` (the fastest chain), ``transport.SwarmConnection`` (P2P
and DHT on a background loop), ``serving`` + ``openai_api`` (`potluck serve`), ``health`` (`potluck
health`), ``cli`` (`generate`, `chat`, `route`, `serve`)."""
