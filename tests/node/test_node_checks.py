"""What a node refuses before it joins or loads: a cache budget no session could have, a metrics
address it cannot serve on. Each names its option."""
import socket

import pytest
import torch

from potluck.node.metrics import check_metrics_address
from potluck.node.server import NodeConfig, check_cache_budget
from potluck.protocol.checkpoint import resolve_checkpoint
from potluck.protocol.errors import BadRequest

CPU = torch.device("cpu")


def test_a_cache_larger_than_the_machine_is_refused_naming_its_option(tiny_checkpoints):
    checkpoint = resolve_checkpoint(str(tiny_checkpoints["llama"]))
    config = NodeConfig(model=None, start=0, end=8, dtype="float32")
    with pytest.raises(BadRequest, match="--cache-gib 100000: .* GiB of RAM and swap"):
        check_cache_budget(NodeConfig(model=None, dtype="float32", cache_gib=100_000), checkpoint, CPU)
    with pytest.raises(BadRequest, match="--cache-tokens 10000000000000"):
        check_cache_budget(NodeConfig(model=None, start=0, end=8, dtype="float32", cache_tokens=10**13), checkpoint,
                           CPU)
    check_cache_budget(config, checkpoint, CPU)  # the default budget
    check_cache_budget(NodeConfig(model=None, start=0, end=8, dtype="float32", cache_gib=0.5), checkpoint, CPU)
    # in tokens, a self-placing node's budget is checked once its span is known
    check_cache_budget(NodeConfig(model=None, dtype="float32", cache_tokens=10**13), checkpoint, CPU)


def test_a_metrics_address_that_cannot_be_served_is_named():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(BadRequest, match=f"--metrics-port {port}: .*in use"):
            check_metrics_address(port, "127.0.0.1")
    with pytest.raises(BadRequest, match="--metrics-host nosuch.invalid"):
        check_metrics_address(0, "nosuch.invalid")
    with pytest.raises(BadRequest, match="--metrics-host 10.255.255.1: not an address of this machine"):
        check_metrics_address(0, "10.255.255.1")
    check_metrics_address(0, "127.0.0.1")
