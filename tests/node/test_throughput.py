"""A node's measured speed is kept per model, dtype, device, span size and CUDA graphs, and read back."""
import json
import logging

import torch

from potluck.node import graphs
from potluck.node.span import load_span
from potluck.node.throughput import Speed, cached_speed, measure, remember_speed, speed_key
from potluck.protocol.checkpoint import resolve_checkpoint

CPU = torch.device("cpu")


def test_a_measured_speed_is_read_back_for_the_same_model_dtype_device_and_span(tmp_path):
    key = speed_key("tiny", '{"hidden_size": 64}', "float32", CPU, 4)
    remember_speed(key, Speed(120.0, 4000.0), tmp_path)
    assert cached_speed(key, tmp_path) == Speed(120.0, 4000.0)
    for other in [speed_key("tiny", '{"hidden_size": 256}', "float32", CPU, 4),  # same name, other model
                  speed_key("tiny", '{"hidden_size": 64}', "bfloat16", CPU, 4),
                  speed_key("tiny", '{"hidden_size": 64}', "float32", CPU, 5)]:
        assert cached_speed(other, tmp_path) is None


def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path):
    key = speed_key("tiny", "{}", "float32", CPU, 2)
    (tmp_path / "throughput.json").write_text("{not json")
    assert cached_speed(key, tmp_path) is None
    (tmp_path / "throughput.json").write_text(json.dumps({key: {"steps_per_s": "fast"}}))
    assert cached_speed(key, tmp_path) is None
    remember_speed(key, Speed(5.0, 50.0), tmp_path)
    assert cached_speed(key, tmp_path) == Speed(5.0, 50.0)


def test_a_node_with_cuda_graphs_measures_its_steps_as_fixed_shape_passes(tiny_checkpoints, monkeypatch):
    span = load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 4, torch.float32)
    runs = []
    real_run = graphs.FixedPasses.run

    def run(self, works):
        runs.append([work.start for work in works])
        return real_run(self, works)

    monkeypatch.setattr(graphs.FixedPasses, "run", run)
    speed = measure(span, steps=4, forward_tokens=16, repeats=1, graphs=True)
    assert speed.steps_per_s > 0 and speed.forward_tokens_per_s > 0
    assert runs == [[1], [2], [3], [4]]  # each step on the cache its earlier steps left
    assert measure(span, steps=4, forward_tokens=16, repeats=1).steps_per_s > 0 and len(runs) == 4
    assert speed_key("tiny", "{}", "float32", CPU, 4, graphs=True) != speed_key("tiny", "{}", "float32", CPU, 4)


def test_a_slow_measurement_says_how_far_it_got(tiny_checkpoints, monkeypatch, caplog):
    from potluck.node import span as spans

    caplog.set_level(logging.INFO, logger="potluck.node.throughput")
    monkeypatch.setattr(spans, "PROGRESS_EVERY_S", -1.0)  # every step is "a while" here
    measure(load_span(resolve_checkpoint(str(tiny_checkpoints["llama"])), 0, 2, torch.float32), steps=4, repeats=2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "measuring speed: 1 of 4 steps, 0 of 2 forwards of 128 tokens"
    assert lines[-1] == "measuring speed: 4 of 4 steps, 2 of 2 forwards of 128 tokens" and len(lines) == 6
