"""An lm-eval model for logprobs-server that evaluates instruct models with their own chat template,
with no Hugging Face tokenizer and no Hub: `logprobs-completions`, lm-eval's `local-completions`
whose chat template is the server's (from /tokenizer_info), rendered here as Hugging Face does.

Why a model here and not a server change: with `tokenizer_backend=remote` and tokenized requests,
lm-eval 0.4.13's `apply_chat_template` returns the message list itself, which its loglikelihood
path then treats as text (`_encode_pair` calls `.rstrip()` on it) before any request is sent; with
untokenized requests the list is sent as `prompt` at batch size 1, and loglikelihood tasks cannot
measure their context. Rendering the template where lm-eval asks for it gives lm-eval the string it
expects, and the rest (remote tokenizer, batched token-id requests, echo + logprobs) is
`local-completions` unchanged.

Run through `logprobs-eval run --apply-chat-template`, or `python -m logprobs_client.lm_eval_model`
with lm-eval's own arguments (`--model logprobs-completions --apply_chat_template ...`), or import
this module before lm-eval's `simple_evaluate(model="logprobs-completions", ...)`.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.models.openai_completions import LocalCompletionsAPI

from logprobs_client import chat_template

MODEL_NAME = "logprobs-completions"


@register_model(MODEL_NAME)
class LogprobsCompletions(LocalCompletionsAPI):  # type: ignore[misc]  # lm-eval ships no types: its class is Any
    def __init__(self, tokenizer_backend: str = "remote", **kwargs: Any) -> None:  # lm-eval's model_args
        super().__init__(tokenizer_backend=tokenizer_backend, **kwargs)

    def _server_tokenizer(self) -> dict[str, Any]:
        if self.tokenizer_backend != "remote":
            raise ValueError(
                f"{MODEL_NAME} renders the server's chat template, which it reads through the remote "
                f"tokenizer: use tokenizer_backend=remote (not {self.tokenizer_backend})"
            )
        info: dict[str, Any] = self.tokenizer.tokenizer_info  # /tokenizer_info's JSON, as lm-eval read it
        return info

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The server's template (lm-eval records it with the results)."""
        if not chat_template:
            return None
        template: str | None = self._server_tokenizer().get("chat_template")
        if not template:
            raise ValueError(
                "The server publishes no chat template for its model (/tokenizer_info): evaluate it "
                "without --apply_chat_template"
            )
        return template

    def apply_chat_template(self, chat_history: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        info = self._server_tokenizer()
        template = self.chat_template(True)
        assert template is not None  # chat_template(True) returns the template or raises
        return chat_template.render(
            template,
            chat_history,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
            bos_token=info.get("bos_token"),
            eos_token=info.get("eos_token"),
            pad_token=info.get("pad_token"),
        )

    @property
    def tokenizer_name(self) -> str:
        """Part of lm-eval's request-cache key for chat-templated requests."""
        return f"{MODEL_NAME}:{self.model}"


if __name__ == "__main__":  # lm-eval's command line, with this model registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
