"""What a job asks of its passes besides the generated tokens: one object per kind of output.

The serving layer builds them from a request (Outputs.of: OpenAI's echo and logprobs, vLLM's
prompt_logprobs, /v1/distributions' start). The prompt pass asks them which rows it needs and how to
score them (Outputs.prompt_rows, Outputs.first_row); decoding asks whether to score each generated
token (Outputs.generated); the serving layer asks them for its answer's parts (Echo.rows). A new
kind of output is a class here, its field on Outputs, and what the pass and the answer take of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.numerics.scoring import ScoredRows, first_rows


@dataclass(frozen=True)
class Echo:
    """The prompt, part of the answer (OpenAI's echo); with `k` (logprobs), each prompt token's
    logprob and top-k, else its text alone."""

    k: int | None

    def rows(self, scores: ScoredRows) -> ScoredRows:
        """The echo's scores from the prompt's scored rows: its top-k, which the rows may hold
        wider (scored once for every output that asked)."""
        assert self.k is not None, "an echo without logprobs has no scores"
        return first_rows(scores, len(scores.token_logprobs), self.k)


@dataclass(frozen=True)
class PromptLogprobs:
    """vLLM's prompt_logprobs: every prompt row's top-k and the token's rank, echoed or not."""

    k: int


@dataclass(frozen=True)
class Distributions:
    """/v1/distributions: the full log-distribution of every row from `start` on (row i: the next
    token after tokens[:i + 1]), up to the prompt's last token."""

    start: int


@dataclass(frozen=True)
class GeneratedLogprobs:
    """Each generated token's logprob and top-k (OpenAI's logprobs)."""

    k: int


@dataclass(frozen=True)
class PromptRows:
    """How the prompt pass scores the prompt's rows: once, with the widest top-k any output asked
    for, and each token's rank where one asked for ranks. The prefix cache keeps rows scored so,
    and gives them back to a prompt that asks for no more."""

    k: int
    ranks: bool


@dataclass(frozen=True)
class Outputs:
    echo: Echo | None = None
    prompt_logprobs: PromptLogprobs | None = None
    distributions: Distributions | None = None
    generated: GeneratedLogprobs | None = None

    @classmethod
    def of(
        cls,
        echo: bool = False,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        distributions_from: int | None = None,
    ) -> Outputs:
        """From a request's fields: `logprobs` (top-k; None: none) applies to the generated tokens
        and, with `echo`, to the echoed prompt."""
        return cls(
            echo=Echo(logprobs) if echo else None,
            prompt_logprobs=PromptLogprobs(prompt_logprobs) if prompt_logprobs is not None else None,
            distributions=Distributions(distributions_from) if distributions_from is not None else None,
            generated=GeneratedLogprobs(logprobs) if logprobs is not None else None,
        )

    @property
    def prompt_rows(self) -> PromptRows | None:
        """The scoring of prompt rows the outputs need; None when none needs scored prompt rows."""
        scored_echo = self.echo is not None and self.echo.k is not None
        if not scored_echo and self.prompt_logprobs is None:
            return None
        widths = [o.k for o in (self.generated, self.prompt_logprobs) if o is not None]
        return PromptRows(max(widths), ranks=self.prompt_logprobs is not None)

    @property
    def generated_k(self) -> int:
        """The top-k of generated tokens (0 when their scores are not asked for)."""
        return self.generated.k if self.generated is not None else 0

    def first_row(self, n: int) -> int:
        """The first row of an n-token prompt whose logits a pass must produce: every row of a scored
        prompt, the rows whose distributions are asked for, else the last (it chooses the first
        generated token)."""
        if self.prompt_rows is not None:
            return 0
        return min(self.distributions.start if self.distributions is not None else n - 1, n - 1)
