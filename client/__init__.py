"""Everything on the user's side: ``model.AutoDistributedModelForCausalLM`` (the transformers model
with remote blocks), ``session`` (inference sessions and forward through a chain), ``routing``,
``transport.SwarmConnection`` (P2P and DHT on a background loop), ``cli`` (`generate`, `chat`)."""
