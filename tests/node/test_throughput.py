"""A node's measured speed is kept per model, dtype, device and span size, and read back."""
import json

import torch

from potluck.node.throughput import Speed, cached_speed, remember_speed, speed_key

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
