"""Start-up exactness probes: run on the loaded backend before the engine starts, they turn off
what would change the numbers with this model file on this machine.

- Prefix reuse: a prompt run as after a cache hit (restored from a cached prefix, the tail run
  from there) must give the logits of the whole prompt's passes, in the shapes real requests take
  (tails of 1-11 tokens after a long context, cached prompts shorter and longer than the new one,
  tails that cross an n_batch grid line). The backend lists rules for where a tail may start
  (ReuseRule); the first that gives the same floats is used (else the first within tolerance,
  else the cache is off). llama.cpp: any tail on Q4_1, Q8_0,
  F16, F32; on K-quant and repacked files only tails of 8 or more tokens starting at multiples of
  4 past a grid line (docs/exactness.md). MLX: 3e-5, any tail.
- Shared passes: a backend that can run several fresh prompts in one pass (MLX, where the batched
  float32 products are faster) rounds them differently from one prompt's pass; prompts of three
  lengths run together must stay within the tolerance of each alone.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from server.backends.base import Backend, ReuseRule, Step, grid_chunks
from server.config import Settings

log = logging.getLogger(__name__)

# Both tolerances are the tests' (reuse vs none, shared vs alone), in logit units.
SPLIT_TOLERANCE = 1e-4
SHARED_TOLERANCE = 1e-4
PROBE_TEXT = (
    "The old lighthouse keeper climbed the stairs every evening, counting the steps as his father "
    "had taught him, and lit the lamp at the top."
)


def probe_tokens(backend: Backend, n: int) -> list[int]:
    """The probe text's tokens, repeated to n (BOS, where the model adds one, first only)."""
    text = backend.tokenize(PROBE_TEXT, True)
    body = backend.tokenize(" " + PROBE_TEXT, False) or text
    tokens = list(text)
    while len(tokens) < n:
        tokens += body
    return tokens[:n]


def reuse_cuts(n: int, n_batch: int) -> tuple[list[int], list[int]]:
    """The cache hits real requests make on an n-token prompt, as (how many tokens a cached prompt
    shares with it, how long cached prompts are): shared all but the last 1-11 tokens (a long
    context and a one-letter answer, as MMLU and ARC send), about half (HellaSwag's endings), and
    around each n_batch grid line (a tail that crosses it, or starts just past it); cached prompts
    of the same length, a longer one (lm-eval sends the longest first), and shorter ones that end
    just past a grid line or near the end (their last pass was short, so some of their rows may not
    be reused)."""
    lines = range(n_batch, n, n_batch)
    shares = {n - 1, n - 2, n - 4, n - 7, n - 11, n // 2 + 1}  # n - 11: a tail at 4 mod 8 past its line
    cached = {n, n - 6, n + EXTRA}  # n + EXTRA: a longer prompt cached first, as lm-eval sends them
    for line in lines:
        shares |= {line - 11, line - 3, line + 1, line + 4}
        cached |= {line + 2, line + 9}
    return sorted(x for x in shares if 0 < x < n), sorted(x for x in cached if 0 < x <= n + EXTRA)


WINDOW = 8  # rows compared at each place a pass's kernel path can change
PROBE_GRID = 32
EXTRA = 5  # tokens of a cached prompt longer than the probe prompt


def reuse_drift(backend: Backend, rule: ReuseRule, min_reuse: int) -> tuple[float, int]:
    """How far a prompt's logits move when it runs as after a cache hit instead of whole: a cached
    prompt (the probe prompt's first tokens, run whole, its rows kept and its KV snapshot taken)
    gives the prefix `rule` allows, the rest runs from there on the n_batch grid, as the engine
    does. Returns the largest |difference| of any restored or computed row from the whole prompt's,
    and the number of hits tried; stops early once past SPLIT_TOLERANCE. The probe runs on a grid
    of PROBE_GRID tokens (or n_batch, if smaller) and a prompt 24 tokens longer (within the
    context), so that tails cross a grid line, and EXTRA more for a longer cached prompt: the
    kernels' rules are about a pass's size and where it starts (fewer than 8 tokens, groups of 4),
    which a small grid shows as well as n_batch's, in a few hundred tokens instead of thousands.
    Compared are the rows where a pass's kernel path can change (a whole vocabulary per row: 1 MB
    for Gemma's): the WINDOW before and after each cut, and before each grid line and the end.
    Run at start-up on sequence 0, before the engine starts."""
    n_batch = min(backend.n_batch, PROBE_GRID)
    tokens = probe_tokens(backend, min(backend.info.n_ctx, n_batch + 24 + EXTRA))
    n = len(tokens) - EXTRA if len(tokens) > n_batch + 24 else len(tokens)  # the prompt; the rest extends a cached one
    shares, cached_lengths = reuse_cuts(n, n_batch)
    cached_lengths = [m for m in cached_lengths if m <= len(tokens)]
    last_line = (n - 1) // n_batch * n_batch
    # Other cached prompts differ from the prompt's own past the last grid line (their last pass),
    # so only the hits that restore rows there.
    hits = {
        (m, length)
        for m in cached_lengths
        for share in shares
        if share <= min(m, n)
        if (length := rule.restore_length(share, n, n_batch, cached=m)) >= min_reuse and (m == n or length > last_line)
    }
    edges = {length for _, length in hits} | {*range(n_batch, n, n_batch), n} | set(cached_lengths)
    kept = {i for edge in edges for i in range(max(0, edge - WINDOW), min(n, edge + WINDOW))}

    def run(start: int, stop: int) -> dict[int, np.ndarray]:
        """The kept rows of tokens[start:stop], run from `start` on the grid."""
        rows: dict[int, np.ndarray] = {}
        for lo, hi in grid_chunks(start, stop, n_batch):
            block = backend.prefill(0, tokens[lo:hi], lo, 0)
            assert block is not None  # logits from 0 of a chunk that is never empty (lo < hi)
            rows |= {i: np.array(block[i - lo], dtype=np.float32) for i in kept if lo <= i < hi}
        return rows

    def drift(rows: dict[int, np.ndarray], lo: int, hi: int) -> float:
        return max((float(np.abs(rows[i] - whole[i]).max()) for i in rows if lo <= i < hi), default=0.0)

    whole = run(0, n)
    worst = 0.0
    # n first: the sequence still holds the whole pass.
    for m in sorted({m for m, _ in hits}, key=lambda m: (m != n, m)):
        entry = whole if m == n else run(0, m)
        state, _ = backend.snapshot(0)
        for length in sorted(length for c, length in hits if c == m):
            worst = max(worst, drift(entry, 0, length))  # rows the cache gives back
            backend.restore(0, state, length)
            worst = max(worst, drift(run(length, n), length, n))  # rows run again
            if worst > SPLIT_TOLERANCE:
                backend.release(0)
                return worst, len(hits)
    backend.release(0)
    return worst, len(hits)


def shared_pass_drift(backend: Backend) -> float:
    """The largest |difference| of any logit of any row between three prompts (a third, two thirds
    and all of the probe text, each cut to one pass) run together and each run alone. Run at
    start-up on sequences 0..2, before the engine starts."""
    tokens = backend.tokenize(PROBE_TEXT, True)[: min(backend.n_batch, backend.info.n_ctx)]
    lengths = sorted({max(2, len(tokens) * i // 3) for i in (1, 2, 3)})[: backend.max_sequences]
    prompts = [(seq, tokens[:n], 0) for seq, n in enumerate(lengths)]
    if len(prompts) < 2:
        return 0.0
    alone = [np.array(backend.prefill(seq, p, 0, 0), dtype=np.float32) for seq, p, _ in prompts]
    together = [np.array(block, dtype=np.float32) for block in backend.prefill_together(prompts)]
    for seq, _, _ in prompts:
        backend.release(seq)
    return max(float(np.abs(a - b).max()) for a, b in zip(alone, together))


# Sequences' prompt lengths in the decode probe: short ones, and one past 256 tokens (llama.cpp
# attends over cells in buckets of 256, the largest of a pass's sequences for all of them).
DECODE_PROBE_LENGTHS = (12, 270, 21, 30, 39, 48, 57, 66)


def decode_rows(backend: Backend) -> tuple[int, float]:
    """The most sequences one decode pass may carry with every row the very floats of its sequence
    decoded alone, and the largest |difference| of a logit in the first size that moved one (0 if
    none did). Sequences of different lengths (one past 256) decode one token alone, then in passes
    of 2..max_sequences consecutive sequences at the start, middle and end of the ids (llama.cpp's
    repacked K-quant kernels take another path for the first multiple of 4 rows of a pass; others
    change at 8 rows). Run at start-up before the engine starts, on every sequence; each is
    restored to its prompt after each pass, and all are released at the end. A backend without
    snapshots cannot be rewound, so it is not checked: (1, inf), one sequence per pass."""
    n = backend.max_sequences
    if n == 1:
        return 1, 0.0
    if not backend.supports_snapshots:
        return 1, math.inf
    longest = backend.info.n_ctx - 2
    lengths = [max(1, min(longest, DECODE_PROBE_LENGTHS[s % len(DECODE_PROBE_LENGTHS)] + s)) for s in range(n)]
    text = probe_tokens(backend, max(lengths) + n + 1)
    steps: list[Step] = []
    states: list[object] = []

    def rewind(group: list[Step]) -> None:
        for step in group:
            backend.restore(step.seq, states[step.seq], step.position)

    try:
        for seq, length in enumerate(lengths):
            tokens = text[seq : seq + length]  # each sequence its own text
            for lo, hi in grid_chunks(0, length, backend.n_batch):
                backend.prefill(seq, tokens[lo:hi], lo, hi - lo)
            states.append(backend.snapshot(seq)[0])
            steps.append(Step(seq, text[seq + length], length))
        alone = []
        for step in steps:
            alone.append(backend.decode([step])[0])
            rewind([step])
        for size in range(2, n + 1):
            drift = 0.0
            for start in sorted({0, (n - size) // 2, n - size}):
                group = steps[start : start + size]
                rows = backend.decode(group)
                rewind(group)
                drift = max(drift, *(float(np.abs(row - alone[s.seq]).max()) for row, s in zip(rows, group)))
            if drift > 0:
                return size - 1, drift
        return n, 0.0
    finally:
        for seq in range(n):
            backend.release(seq)


def decode_limit(backend: Backend) -> int | None:
    """decode_rows' limit for the engine (None: every running sequence in one pass), logged."""
    started = time.perf_counter()
    most, drift = decode_rows(backend)
    seconds = time.perf_counter() - started
    if most == backend.max_sequences:
        log.info(
            "Decoding checked: %d sequences in one forward pass give each the logits it gets alone (%.1f s)",
            most,
            seconds,
        )
        return None
    if math.isinf(drift):
        log.warning(
            "Decoding one sequence per forward pass: this backend cannot rewind a sequence (no snapshots), so "
            "whether sequences decoded together keep their numbers cannot be checked; the %d sequences of "
            "--max-sequences still generate at once, in turn",
            backend.max_sequences,
        )
    else:
        log.warning(
            "Decoding %s: %d sequences in one forward pass moved a logit by %.3g from each decoded alone "
            "(%.1f s); the %d sequences of --max-sequences still generate at once, in %s",
            f"at most {most} sequences per forward pass" if most > 1 else "one sequence per forward pass",
            most + 1,
            drift,
            seconds,
            backend.max_sequences,
            f"passes of up to {most}" if most > 1 else "turn",
        )
    return most


def choose_reuse_rule(backend: Backend, min_reuse: int) -> ReuseRule | None:
    """The first of the backend's reuse rules under which a cache hit gives the whole pass's
    logits (within SPLIT_TOLERANCE), or None."""
    return choose_reuse(backend, min_reuse)[0]


def choose_reuse(backend: Backend, min_reuse: int) -> tuple[ReuseRule | None, float]:
    """choose_reuse_rule's rule and how far cache hits under it moved a logit (0: the same floats)."""
    drifts: dict[ReuseRule, float] = {}
    for rule in backend.reuse_rules:  # the first that gives the same floats; else the first within tolerance
        started = time.perf_counter()
        drift, cuts = reuse_drift(backend, rule, min_reuse)
        log.info(
            "Prefix cache check (%s): %d cache hits against the whole prompt, logits moved by up to %.3g (%.1f s)",
            rule,
            cuts,
            drift,
            time.perf_counter() - started,
        )
        drifts[rule] = drift
        if drift == 0:
            return rule, drift
    within = [rule for rule, drift in drifts.items() if drift <= SPLIT_TOLERANCE]
    if within:
        return within[0], drifts[within[0]]
    log.warning(
        "Prefix cache off: with this model file, a prompt run as after a cache hit (a cached prefix, then "
        "the rest) gives other numbers than run whole under every rule tried (logits moved by up to %.3g; "
        "tolerance %.0e), so reuse would change results. Scoring runs every prompt whole.",
        min(drifts.values()),
        SPLIT_TOLERANCE,
    )
    return None, min(drifts.values())


@dataclass(frozen=True)
class Exactness:
    """What the start-up probes decided, once: the engine, the start-up log line and the system
    fingerprint read it (nothing else decides whether the prefix cache is on)."""

    prefix_cache_bytes: int  # 0: no prefix cache (not asked for, no snapshots, or no rule kept the numbers)
    reuse_rule: ReuseRule  # where a cached prompt's tail may start (meaningful while the cache is on)
    shared_passes: bool  # fresh prompts admitted together run in one forward pass
    # Cache hits gave the very floats of the whole prompt (not only within tolerance), so prompts
    # that are not scored (generations) reuse cached prefixes too: a greedy answer must not depend
    # on what ran before it, and a logit moved within tolerance could still flip a near tie.
    reuse_generations: bool = False
    # The most running sequences one decode pass carries (None: all of them): more changed a row
    # from its sequence decoded alone, so the engine splits its steps into passes of this many.
    decode_rows: int | None = None

    @property
    def prefix_cache(self) -> bool:
        return self.prefix_cache_bytes > 0

    @classmethod
    def unchecked(cls, backend: Backend, prefix_cache_mb: int = 0) -> Exactness:
        """What a backend gets without the probes (an engine built in code, a test): the cache
        where asked for and possible, under the backend's first rule; shared passes where it can."""
        on = prefix_cache_mb > 0 and backend.supports_snapshots
        return cls(prefix_cache_mb << 20 if on else 0, backend.reuse_rules[0], backend.shares_prompt_passes)

    def describe(self) -> str:
        """The prefix cache, for the start-up log line."""
        if not self.prefix_cache:
            return "off"
        reused = "scored prompts and generations" if self.reuse_generations else "scored prompts"
        return f"{self.prefix_cache_bytes >> 20} MB, {self.reuse_rule}, for {reused}"


def run_probes(backend: Backend, settings: Settings, min_reuse: int) -> Exactness:
    """Both probes, as the settings ask for them: the prefix cache stays on under the first of the
    backend's rules that keeps the numbers (else it is off), and fresh prompts share passes where
    the backend can and the result stays within SHARED_TOLERANCE of each prompt alone."""
    asked = Exactness.unchecked(backend, settings.prefix_cache_mb)
    rule, cache_bytes, exact = asked.reuse_rule, asked.prefix_cache_bytes, False
    if asked.prefix_cache:
        log.info(
            "Checking that prefix reuse keeps every number (a prompt run whole and as after cache hits; "
            "seconds on large models)"
        )
        chosen, drift = choose_reuse(backend, min_reuse)
        rule, cache_bytes = (chosen, cache_bytes) if chosen is not None else (rule, 0)
        exact = chosen is not None and drift == 0
    shared = asked.shared_passes
    if shared:
        drift = shared_pass_drift(backend)
        shared = drift <= SHARED_TOLERANCE
        if not shared:
            log.warning(
                "Prompts run one at a time: run together in one forward pass, they gave logits up "
                "to %.3g away from each prompt alone, past the %.0e this server allows.",
                drift,
                SHARED_TOLERANCE,
            )
        else:
            log.info(
                "Fresh prompts admitted together share forward passes (logits within %.2g of each "
                "prompt alone in the start-up check)",
                drift,
            )
    rows = decode_limit(backend) if backend.max_sequences > 1 else None
    # With shared passes a generation's prompt may run in a group, whose KV is only within
    # tolerance of its own: reused, it would hand that on. Generations reuse only without them.
    return Exactness(cache_bytes, rule, shared, reuse_generations=exact and not shared, decode_rows=rows)
