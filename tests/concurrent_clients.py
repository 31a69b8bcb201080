"""A client process for concurrency tests: greedy generations in threads, started together.

    python concurrent_clients.py MODEL PEERS '[[seed, prompt_length], ...]' NEW_TOKENS

Prints "ready" once connected, waits for a line on stdin (so several processes start at once),
then prints one JSON object: seed -> the generated token ids."""
import json
import sys
import threading

import torch

from potluck import AutoDistributedModelForCausalLM


def main() -> None:
    model_path, peers, specs, new_tokens = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3]), \
        int(sys.argv[4])
    torch.set_num_threads(1)
    model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=peers)
    print("ready", flush=True)
    sys.stdin.readline()
    results = {}

    def generate(seed: int, length: int) -> None:
        ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(seed))
        results[seed] = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0].tolist()

    threads = [threading.Thread(target=generate, args=spec) for spec in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps(results), flush=True)
    model.swarm_view.swarm.close()


if __name__ == "__main__":
    main()
