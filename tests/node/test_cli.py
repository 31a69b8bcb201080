"""`potluck node` refuses bad command lines with a clear message and exit code 2."""
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

from helpers import NOBODY, potluck_command

CASES = [(["--blocks", "5:3", "--initial-peers", NOBODY], "need 0 <= A < B"),
         (["--blocks", "0:99", "--new-swarm"], "outside the model's 0:8"),
         (["--blocks", "0:2"], "no initial peers")]


def test_bad_node_arguments(tiny_checkpoints):
    env = {k: v for k, v in os.environ.items() if k != "POTLUCK_INITIAL_PEERS"}
    with ThreadPoolExecutor() as pool:  # side by side: each spends seconds importing
        results = list(pool.map(lambda case: subprocess.run(
            potluck_command("node", str(tiny_checkpoints["llama"]), *case[0]), capture_output=True, text=True,
            timeout=120, env=env), CASES))
    for (args, message), result in zip(CASES, results):
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
