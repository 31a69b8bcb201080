"""Potluck: run large language models on volunteer compute, over a peer-to-peer swarm.

Where things live: ``potluck.protocol`` (records, messages, model families: what every peer
agrees on), ``potluck.node`` (the volunteer's server), ``potluck.client`` (routing, sessions, the
transformers-compatible model). ``AutoDistributedModelForCausalLM`` is re-exported here.
"""
__version__ = "0.1.0"

__all__ = ["AutoDistributedModelForCausalLM", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import potluck` (and the node side) does not import the client.
    if name == "AutoDistributedModelForCausalLM":
        from potluck.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(f"module 'potluck' has no attribute {name!r}")
