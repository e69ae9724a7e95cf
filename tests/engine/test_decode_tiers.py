"""Decode-only steps go to the first decode model whose max_batch_size covers the batch (the megakernel for the
smallest batches, then the fused kernels), and to the model above them. Checked on CPU with recording wrappers
around the model itself, so the tokens must not change."""

from __future__ import annotations

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.llm import make_engine_config
from tokenmill.sampling_params import SamplingParams


class RecordingDecoder:
    """Runs `model`, remembering the batch size of every step it served."""

    def __init__(self, model, max_batch_size: int) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.batches: list[int] = []

    def __call__(self, input_ids, positions, kv_cache, meta):
        self.batches.append(int(input_ids.shape[0]))
        return self.model(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)


def make_engine(model_dir) -> LLMEngine:
    return LLMEngine(make_engine_config(str(model_dir), dtype="float32", device="cpu", max_model_len=128,
                                        max_num_seqs=8, num_blocks=128))


def run(engine: LLMEngine) -> list[list[int]]:
    # Different lengths, so the decode batch shrinks 5 -> 4 -> ... -> 1 as requests finish.
    prompts = [[3 + i, 40, 7 * i + 1] for i in range(5)]
    params = [SamplingParams(temperature=0.0, max_tokens=2 + 3 * i, ignore_eos=True) for i in range(5)]
    return [out.outputs[0].token_ids for out in engine.generate_blocking(prompts, params)]


def test_decode_batches_go_to_the_first_model_that_covers_them(tiny_model_dir):
    reference = run(make_engine(tiny_model_dir))
    engine = make_engine(tiny_model_dir)
    small, medium = RecordingDecoder(engine.model, 2), RecordingDecoder(engine.model, 4)
    engine.runner.decode_models = [small, medium]
    assert run(engine) == reference
    assert small.batches and set(small.batches) <= {1, 2}
    assert medium.batches and set(medium.batches) <= {3, 4}
    assert engine.runner._model_for(5) is engine.model


def test_megakernel_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="megakernel_max_batch must be >= 1"):
        EngineConfig(megakernel_max_batch=0)


def test_megakernel_max_batch_from_the_cli():
    from tokenmill.cli import build_parser, engine_config_from_args, main

    args = build_parser().parse_args(["serve", "--decode-backend", "megakernel", "--megakernel-max-batch", "4"])
    assert engine_config_from_args(args).megakernel_max_batch == 4
    default = engine_config_from_args(build_parser().parse_args(["serve"])).megakernel_max_batch
    assert default == EngineConfig.megakernel_max_batch
    assert main(["serve", "--megakernel-max-batch", "0"]) == 2  # a CLI error, not a traceback
