"""Potluck: run large language models on volunteer compute, over a peer-to-peer swarm.

Where things live: ``potluck.protocol`` (records, messages, model families: what every peer
agrees on), ``potluck.node`` (the volunteer's server), ``potluck.client`` (routing, sessions, the
transformers-compatible model). ``AutoDistributedModelForCausalLM`` is re-exported here.
"""
import logging

__version__ = "0.1.0"

# torchao (``--quant``), which transformers imports whenever it is installed, warns at import about
# kernels for GPUs this machine lacks; torch about its enums. Neither concerns a Potluck user.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__all__ = ["AutoDistributedModelForCausalLM", "__version__"]


def __getattr__(name: str):
    # Lazy, so `import potluck` (and the node side) does not import the client.
    if name == "AutoDistributedModelForCausalLM":
        from potluck.client.model import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(f"module 'potluck' has no attribute {name!r}")
