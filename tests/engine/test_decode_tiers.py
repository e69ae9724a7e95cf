"""Decode-only steps go to the first decode model whose max_batch_size covers the batch and whose max_context, if
it has one, covers the step's longest sequence (the megakernel for the smallest batches and for larger ones at short
contexts, then the fused kernels), and to the model above them. Checked on CPU with recording wrappers around the
model itself, so the tokens must not change."""

from __future__ import annotations

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.runner import DecodeTier
from tokenmill.llm import make_engine_config
from tokenmill.sampling_params import SamplingParams


class RecordingDecoder:
    """Runs `model`, remembering the batch size of every step it served."""

    def __init__(self, model, max_batch_size: int) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.batches: list[int] = []
        self.longest: list[int] = []

    def __call__(self, input_ids, positions, kv_cache, meta):
        self.batches.append(int(input_ids.shape[0]))
        self.longest.append(max(meta.seq_lens_cpu))
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


def test_a_context_limited_tier_takes_larger_batches_only_while_every_sequence_is_short(tiny_model_dir):
    reference = run(make_engine(tiny_model_dir))
    engine = make_engine(tiny_model_dir)
    small, short = RecordingDecoder(engine.model, 2), RecordingDecoder(engine.model, 8)
    engine.runner.decode_models = [small, DecodeTier(short, 8, max_context=6)]
    assert run(engine) == reference
    assert small.batches and set(small.batches) <= {1, 2}
    assert short.batches and min(short.batches) >= 3 and max(short.longest) <= 6
    runner = engine.runner
    assert runner._model_for(5, 6) is runner.decode_models[1]
    assert runner._model_for(5, 7) is engine.model and runner._model_for(5) is engine.model  # unknown: any context
    # A graph of size 8 may run either the short-context tier or the model; one of size 2 only the small decoder.
    assert runner._models_for_size(8) == [runner.decode_models[1], engine.model]
    assert runner._models_for_size(2) == [small]


def test_megakernel_short_context_settings_are_checked_and_come_from_the_cli():
    from tokenmill.cli import build_parser, engine_config_from_args

    with pytest.raises(ValueError, match="megakernel_short_context must be >= 0"):
        EngineConfig(megakernel_short_context=-1)
    with pytest.raises(ValueError, match="megakernel_short_context_batch must be >= 1"):
        EngineConfig(megakernel_short_context_batch=0)
    args = build_parser().parse_args(["serve", "--decode-backend", "megakernel", "--megakernel-short-context", "0",
                                      "--megakernel-short-context-batch", "12"])
    config = engine_config_from_args(args)
    assert (config.megakernel_short_context, config.megakernel_short_context_batch) == (0, 12)
    default = engine_config_from_args(build_parser().parse_args(["serve"]))
    assert default.megakernel_short_context is None  # the card's (kernels/megakernel/decoder.default_short_context)


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
