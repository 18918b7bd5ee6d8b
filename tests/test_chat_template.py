"""The client's chat-template renderer (logprobs_client.chat_template, which `logprobs-eval run
--apply-chat-template` gives lm-eval) against Hugging Face's own (transformers), on templates of the
kinds models ship: the same text, generation prompt or continued final message, for conversations
of every shape lm-eval builds, trailing spaces included."""

from __future__ import annotations

import sys

import pytest

from testing.live_server import ROOT

sys.path.insert(0, str(ROOT / "clients"))  # the checkout's client, installed or not

from logprobs_client.chat_template import render

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Llama-2 style: bos_token, raise_exception, stripped contents, blocks that trim_blocks/lstrip_blocks shape.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set system = '<<SYS>>\\n' + messages[0]['content'].strip() + '\\n<</SYS>>\\n\\n' %}
    {% set messages = messages[1:] %}
{% else %}
    {% set system = '' %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'].strip() + ' [/INST]' }}
    {% else %}
        {{ ' ' + message['content'].strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}"""
# Loop controls and Hugging Face's tojson (no key sorting, no HTML escapes, non-ASCII kept).
TOOLS = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{# each message's content, in its JSON #}<{{ message['role'] }}>{{ message | tojson }}"
    "{% if loop.index > 3 %}{% break %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}

TURNS = [{"role": "user", "content": "Question: 2+2?\nAnswer:"}, {"role": "assistant", "content": "4"}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief. "}, *TURNS, {"role": "user", "content": "Question: 3+3?\nAnswer:"}],
    [*TURNS, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is"}],
    [*TURNS, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer is "}],  # trailing space
    [*TURNS, {"role": "user", "content": "Q"}, {"role": "assistant", "content": " Answer:\n"}],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": 'é <b> & "q"', "name": "z"},
        {"role": "assistant", "content": "ok"},
    ],
]


def hugging_face(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages],
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=not add_generation_prompt,
        **TOKENS,
    )
    return rendered[0]


@pytest.mark.parametrize("template", [CHATML, LLAMA2, TOOLS], ids=["chatml", "llama2", "json"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_the_same_text_as_hugging_face(template, messages):
    # lm-eval asks for the generation prompt, or (a task with gen_prefix) the final message continued.
    add_generation_prompt = messages[-1]["role"] != "assistant"
    ours = render(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=not add_generation_prompt,
        **TOKENS,
    )
    assert ours == hugging_face(template, messages, add_generation_prompt)
    if not add_generation_prompt and template is not TOOLS:  # (TOOLS writes the content JSON-escaped)
        assert ours.rstrip().endswith(messages[-1]["content"].strip())


def test_a_template_that_refuses_the_conversation_says_why():
    from jinja2.exceptions import TemplateError

    with pytest.raises(TemplateError, match="must alternate"):
        render(LLAMA2, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], **TOKENS)
    with pytest.raises(ValueError, match="exclude each other"):
        render(CHATML, CONVERSATIONS[0], add_generation_prompt=True, continue_final_message=True)
