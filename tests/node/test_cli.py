"""`potluck node` refuses bad command lines with a clear message and exit code 2."""
import os
import subprocess

import pytest

from helpers import potluck_command


@pytest.mark.parametrize("args, message", [
    (["--blocks", "5:3", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/QmbLHAnMoJPWSCR5Zhtx6BHJX9KiKNN6tpvbUcqanj75Nb"],
     "need 0 <= A < B"),
    (["--blocks", "0:99", "--new-swarm"], "outside the model's 0:8"),
    (["--blocks", "0:2"], "no initial peers"),
])
def test_bad_node_arguments(args, message, tiny_checkpoints):
    env = {k: v for k, v in os.environ.items() if k != "POTLUCK_INITIAL_PEERS"}
    result = subprocess.run(potluck_command("node", str(tiny_checkpoints["llama"]), *args), capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 2
    assert message in result.stderr
