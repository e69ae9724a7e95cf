"""A Parcae model from `tokenmill train run` to an answer: served in place, exported, over HTTP and the CLI."""

from __future__ import annotations

import json
import random

import openai
import pytest
import torch

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.llm import LLM, make_engine_config
from tokenmill.models.parcae import get_config
from tokenmill.sampling_params import SamplingParams
from tokenmill.serve.testing import start_server
from tokenmill.train.trainer import TrainConfig, load_trained_model, train

ENGINE_KW = dict(dtype="float32", device="cpu", max_model_len=64, block_size=4, max_num_seqs=4)


def documents(n: int = 12, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    who = ["the king", "a fool", "the queen", "my lord", "the duke"]
    did = ["loves", "fears", "follows", "betrays", "answers"]
    what = ["the crown", "his brother", "the sea", "a letter", "the night"]
    return {
        f"gen/doc{d}.txt": "\n".join(
            f"{rng.choice(who).capitalize()} {rng.choice(did)} {rng.choice(what)}." for _ in range(40)
        )
        for d in range(n)
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Parcae run (a few steps: the weights only need to be a real run's) and its export."""
    from tokenmill.train.cli import main as train_main
    from tokenmill.train.data import build_dataset

    root = tmp_path_factory.mktemp("parcae-serving")
    build_dataset(documents(), root / "data", vocab_size=300, val_permille=100, progress=False)
    cfg = TrainConfig(
        model=get_config("tiny", d_model=32, n_heads=2, mean_recurrence=3, backprop_depth=2),
        data_dir=str(root / "data"), out_dir=str(root / "run"), steps=4, batch_size=4, seq_len=32, lr=3e-3,
        warmup_steps=1, eval_every=0, eval_batches=1, progress=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core CI machine: intra-op threads only add contention at this size
    try:
        assert train(cfg).status == "completed"
    finally:
        torch.set_num_threads(threads)
    assert train_main(["train", "export", str(root / "run"), str(root / "export")]) == 0
    return root / "run", root / "export"


def test_export_folder_contents(trained):
    run, export = trained
    assert (run / "tokenizer.json").is_file()  # the trainer copies the corpus tokenizer next to its checkpoint
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["ParcaeForCausalLM"] and config["recurrence"] == 3
    assert config["eos_token_id"] == 0  # <|endoftext|>, the corpus's document separator
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in export.iterdir()}


def test_run_folder_and_export_serve_the_training_model(trained):
    run, export = trained
    model = load_trained_model(run)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    in_place = LLM(str(run), **ENGINE_KW)
    prompt = in_place.tokenizer.encode("The king loves")
    expected = list(prompt)
    for _ in range(6):
        with torch.no_grad():
            expected.append(int(model(torch.tensor([expected]), T=3, state_seed=0)[0, -1].argmax()))
    assert in_place.generate([prompt], params)[0].outputs[0].token_ids == expected[len(prompt):]
    exported = LLM(str(export), **ENGINE_KW)
    assert exported.tokenizer.eos_token_ids == [0]
    assert exported.generate([prompt], params)[0].outputs[0].token_ids == expected[len(prompt):]


def test_server_round_trip_with_state_seed(trained):
    _, export = trained
    engine = AsyncEngine.from_config(make_engine_config(str(export), served_model_name="parcae", **ENGINE_KW),
                                     engine_process=True)  # as `tokenmill serve` runs it
    server = start_server(engine)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        plain = client.completions.create(model="parcae", prompt="The queen", max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert plain.choices[0].text and plain.usage.completion_tokens == 5
        seeded = [
            client.completions.create(model="parcae", prompt="The queen", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True, "state_seed": 12345})
            for _ in range(2)
        ]
        assert seeded[0].choices[0].text == seeded[1].choices[0].text
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="parcae", prompt="x", max_tokens=2, extra_body={"state_seed": 2**64})
    finally:
        server.stop()
        engine.shutdown()


def test_cli_generate_with_recurrence_flag(trained, capsys):
    from tokenmill.cli import main

    _, export = trained
    code = main(["generate", str(export), "--prompt", "The duke", "--max-tokens", "4", "--device", "cpu",
                 "--max-model-len", "64", "--parcae-recurrence", "2", "--state-seed", "7"])
    assert code == 0
    llm = LLM(str(export), parcae_recurrence=2, **ENGINE_KW)
    (out,) = llm.generate("The duke", SamplingParams(temperature=0.0, max_tokens=4, state_seed=7))
    assert capsys.readouterr().out == out.outputs[0].text + "\n"
