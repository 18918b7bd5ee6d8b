"""Hub names without a server: how `--model` text is read, and which file of a GGUF repo a name
chooses (server/models/hub.py). tests/test_hub.py serves them from a real cache."""

from __future__ import annotations

import pytest

from server.backends.gguf_files import choose_gguf
from server.config import ConfigError
from server.models.hub import HubRef


def choose(ref: HubRef, files: list[str]) -> list[str]:
    return choose_gguf(ref.repo, ref.quant, ref.file, files)


@pytest.mark.parametrize(
    "text, ref",
    [
        ("mlx-community/SmolLM2-135M-Instruct-4bit", HubRef("mlx-community/SmolLM2-135M-Instruct-4bit")),
        ("bartowski/Qwen2.5-0.5B-GGUF:Q4_K_M", HubRef("bartowski/Qwen2.5-0.5B-GGUF", quant="Q4_K_M")),
        ("org/repo:q8_0@v1.2", HubRef("org/repo", quant="q8_0", revision="v1.2")),
        ("org/repo/model-f16.gguf", HubRef("org/repo", file="model-f16.gguf")),
        ("org/repo/sub/model.Q4_0.gguf@" + "0" * 40, HubRef("org/repo", file="sub/model.Q4_0.gguf", revision="0" * 40)),
        ("org/repo@refs/pr/3", HubRef("org/repo", revision="refs/pr/3")),
    ],
)
def test_hub_names_are_read(text, ref):
    assert HubRef.parse(text) == ref


@pytest.mark.parametrize(
    "text",
    [
        "model.gguf",
        "./org/repo",
        "/abs/org/repo",
        "~/org/repo",
        "org",
        "org/repo:",
        "org/repo/notes.txt",
        "org/repo@",
        "a/b/c",
        "org/repo:Q4@x:y",
        "org /repo",
    ],
)
def test_other_text_is_not_a_hub_name(text):
    assert HubRef.parse(text) is None


REPO = [
    "README.md",
    "model-Q8_0.gguf",
    "model-Q4_K_M.gguf",
    "model.q4_k.gguf",
    "model-F16.gguf",
    "big-Q6_K-00001-of-00003.gguf",
    "big-Q6_K-00002-of-00003.gguf",
    "big-Q6_K-00003-of-00003.gguf",
    "sub/model-IQ2_XS.gguf",
]


@pytest.mark.parametrize(
    "ref, chosen",
    [
        (HubRef("o/r", quant="Q8_0"), ["model-Q8_0.gguf"]),
        (HubRef("o/r", quant="q4_k_m"), ["model-Q4_K_M.gguf"]),
        (HubRef("o/r", quant="Q4_K"), ["model.q4_k.gguf"]),  # not Q4_K_M: the tag ends at "-", "." or the end
        (HubRef("o/r", quant="f16"), ["model-F16.gguf"]),
        (HubRef("o/r", quant="iq2_xs"), ["sub/model-IQ2_XS.gguf"]),
        (HubRef("o/r", quant="Q6_K"), [f"big-Q6_K-0000{i}-of-00003.gguf" for i in (1, 2, 3)]),  # split: every part
        (HubRef("o/r"), ["model-Q4_K_M.gguf"]),  # the default
        (HubRef("o/r", file="big-Q6_K-00002-of-00003.gguf"), [f"big-Q6_K-0000{i}-of-00003.gguf" for i in (1, 2, 3)]),
        (HubRef("o/r", file="model-F16.gguf"), ["model-F16.gguf"]),
    ],
)
def test_the_name_chooses_the_file(ref, chosen):
    assert choose(ref, REPO) == chosen


def test_without_a_tag_the_only_gguf_is_chosen_else_the_choices_are_listed():
    assert choose(HubRef("o/r"), ["a.gguf", "config.json"]) == ["a.gguf"]
    with pytest.raises(ConfigError, match=r"several GGUF files .*a-Q8_0.gguf, b-F16.gguf"):
        choose(HubRef("o/r"), ["a-Q8_0.gguf", "b-F16.gguf"])
    with pytest.raises(ConfigError, match=r"no file for the quantization Q2_K; its GGUF files: .*model-Q8_0.gguf"):
        choose(HubRef("o/r", quant="Q2_K"), REPO)
    with pytest.raises(ConfigError, match=r"holds no .gguf file"):
        choose(HubRef("o/r"), ["config.json", "model.safetensors"])
    with pytest.raises(ConfigError, match="matches several files"):
        choose(HubRef("o/r", quant="Q8_0"), ["a-Q8_0.gguf", "b-Q8_0.gguf"])
