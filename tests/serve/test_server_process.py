"""ServerProcess, the benchmark scripts' `tokenmill serve` in a child process."""

from __future__ import annotations

import pytest

from tokenmill.serve.testing import ServerProcess


def test_a_server_that_fails_to_start_says_why(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(RuntimeError, match="exited \\(code 2\\) before it was healthy") as info:
        with ServerProcess(str(missing), start_timeout_s=120):
            pass
    assert f"model '{missing}' not found" in str(info.value)
