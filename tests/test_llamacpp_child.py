"""The llama.cpp peer runs in a child process with its extra buffer types off (tests/llamacpp.py):
an abort there is one failed test carrying llama.cpp's stderr, not a dead test session."""

from __future__ import annotations

import pytest

from .llamacpp import SETTING, LlamaCppCrashed, in_child


def test_an_abort_in_the_child_is_one_failure_with_its_stderr():
    with pytest.raises(LlamaCppCrashed) as e:
        in_child("_abort", "ggml-backend.cpp:1294: GGML_ASSERT(*cur_backend_id != -1) failed (on purpose)")
    msg = str(e.value)
    assert "SIGABRT" in msg and "_abort()" in msg, msg
    assert "GGML_ASSERT(*cur_backend_id != -1) failed (on purpose)" in msg, msg
    assert SETTING in msg


def test_the_child_runs_llama_cpp_without_extra_buffer_types():
    import llama_cpp.llama_cpp as lc

    assert lc.llama_model_default_params().use_extra_bufts is True  # llama.cpp's default, here in the parent
    assert in_child("_extra_bufts_default") is False


def test_an_exception_in_the_child_is_reported():
    with pytest.raises(LlamaCppCrashed, match="(?s)exit status 1.*KeyError: .no_such_function"):
        in_child("no_such_function")
