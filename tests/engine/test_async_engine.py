"""AsyncEngine's stream router, driven by a hand-fed core: a consumer that falls behind gets the newest output."""

from __future__ import annotations

import asyncio

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.engine import RequestLimits
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams


class HandFedCore:
    """An EngineCore whose outputs the test delivers itself."""

    config = model_config = tokenizer = None
    max_model_len = 64
    limits = RequestLimits(64, 100, False)

    def __init__(self) -> None:
        self.sink = None
        self.added: list[str] = []
        self.aborted: list[str] = []

    def start(self, sink) -> None:
        self.sink = sink

    def add(self, request_id, prompt_token_ids, params, progress) -> None:
        self.added.append(request_id)

    def abort(self, request_id) -> None:
        self.aborted.append(request_id)

    def is_alive(self) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def output(n: int, finished: bool = False) -> RequestOutput:
    tokens = list(range(1, n + 1))
    return RequestOutput("r", [7, 8], [CompletionOutput(0, "x" * n, tokens, finish_reason="length" if finished
                                                         else None)], finished=finished)


def test_a_consumer_behind_gets_the_newest_output_and_always_the_final_one():
    core = HandFedCore()
    engine = AsyncEngine(core)

    async def consume() -> list[RequestOutput]:
        seen = []
        async for out in engine.generate([7, 8], SamplingParams(max_tokens=6), "r"):
            seen.append(out)
            if len(seen) == 1:  # three steps arrive while this consumer is busy, then the last two
                for n in (2, 3, 4):
                    core.sink.deliver([output(n)])
                await asyncio.sleep(0.05)
                core.sink.deliver([output(5)])
                core.sink.deliver([output(6, finished=True)])
                await asyncio.sleep(0.05)
        return seen

    async def main() -> list[RequestOutput]:
        task = asyncio.ensure_future(consume())
        while not core.added:
            await asyncio.sleep(0.001)
        core.sink.deliver([output(1)])
        return await task

    seen = asyncio.run(main())
    assert [len(o.outputs[0].token_ids) for o in seen] == [1, 6]  # 2-5 skipped: 6 holds them all
    assert seen[-1].finished and seen[-1].outputs[0].text == "x" * 6
    assert core.aborted == []  # finished, so nothing to abort


def test_an_error_behind_queued_outputs_still_reaches_the_consumer():
    core = HandFedCore()
    engine = AsyncEngine(core)

    async def main() -> list:
        seen = []

        async def consume():
            async for out in engine.generate([7, 8], SamplingParams(max_tokens=6), "r"):
                seen.append(out)

        task = asyncio.ensure_future(consume())
        while not core.added:
            await asyncio.sleep(0.001)
        core.sink.deliver([output(1)])
        core.sink.deliver([output(2)])
        core.sink.fail(RuntimeError("boom"))
        try:
            await task
        except RuntimeError as exc:
            return [seen, str(exc)]
        return [seen, None]

    seen, error = asyncio.run(main())
    assert error is not None and "boom" in error
    assert [len(o.outputs[0].token_ids) for o in seen] == [2]  # the newest output first, then the error
    assert core.aborted == ["r"]  # unfinished: its blocks are freed
