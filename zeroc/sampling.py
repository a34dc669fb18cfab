"""Sampling parameters and the batched sampler: one pass on the device for every row of a step.

`sample_batch` picks one token per row with each row's own temperature, top-k and top-p (greedy rows
take the argmax). A random row draws one uniform u and takes the token where its cumulative
probabilities first exceed u times their total (inverse-CDF sampling): exact, and one random number per
row where racing exponential noise (argmax of probs / E) needs one per vocabulary entry, which on the CPU
cost 150 ms a step at batch 64 and 128k tokens. A seeded request draws its u from its own generator, so
its tokens do not depend on which other requests share its batch; unseeded rows share one generator and
one draw. Top-k alone ranks only the largest k scores (torch.topk), not the whole vocabulary. A row whose
logits are not finite gets id -1, so the caller finishes that request alone; the ids come to the host in
one copy, beside their log-probabilities where a request asks for them (`with_logprobs`).

On the CPU, `sample_batch` hands the rows to the CPU kernel module when given one (`native`: the engine
passes it with the cpu attention backend): kernels/csrc/sampling.cpp does all of the above in one call, a
row read once and its weights kept in cache, with the same ids as the torch path below for the same uniforms
(a top-p cut may differ by a token where its boundary is within float rounding of p). The torch path is what
a GPU runs; the torch and triton backends keep it on the CPU too, so the services' tests drive it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from torch import Tensor

from zeroc.config.limits import (MAX_GUIDE_AFTER_CHARS, MAX_GUIDE_CHARS, MAX_GUIDE_CHOICE_CHARS, MAX_GUIDE_CHOICES,
                                 MAX_GUIDE_DEPTH, MAX_GUIDE_PROPERTIES, MAX_LOGIT_BIAS, MAX_LOGIT_BIAS_TOKENS,
                                 MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY, MAX_STOP_TOKEN_IDS)
from zeroc.device import host_to_device

FAILED = -1  # the id `sample_batch` gives a row whose logits are not finite


# Below this a temperature is refused rather than clamped: dividing logits by a subnormal
# temperature overflows to inf and the softmax to NaN. 0 (greedy) is the way to ask for argmax.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
# Bounded work per request: each stop string is searched in the text after every token.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


GUIDE_KINDS = ("json", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class Guide:
    """Structured output: what a request's generated text must match (zeroc/structured.py masks every token that
    would break it). `json`: any JSON object (OpenAI's `json_object`); `json_schema`: `spec` is a JSON Schema as
    JSON text; `regex`: `spec` is a regular expression the whole text matches; `choice`: the text is one of
    `choices`; `grammar`: `spec` is an EBNF grammar (GBNF, as llama.cpp and xgrammar write it) whose `root` rule
    the text matches. Whether a schema, regex or grammar compiles is checked against the model's vocabulary
    (`Engine.check_sampling`). `after`: the text of one token of the vocabulary after which the guide starts
    (a reasoning model's end of thinking, "</think>"): the text up to that token is free, the text after it
    matches; "" (the default): the whole text matches."""

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()
    after: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GUIDE_KINDS:
            raise ValueError(f"guide: kind must be one of {', '.join(GUIDE_KINDS)}, got {self.kind!r}")
        if not isinstance(self.after, str) or len(self.after) > MAX_GUIDE_AFTER_CHARS:
            raise ValueError(f"guide: after is one token's text, at most {MAX_GUIDE_AFTER_CHARS} characters")
        size = len(self.spec) + sum(len(c) for c in self.choices if isinstance(c, str))  # compile time grows with it
        if size > MAX_GUIDE_CHARS:
            raise ValueError(f"guide: a {self.kind} guide has at most {MAX_GUIDE_CHARS} characters, got {size}")
        if (self.kind in ("json_schema", "regex", "grammar")) != bool(self.spec):
            raise ValueError(f"guide: a {self.kind} guide " + ("needs its text" if not self.spec else "takes none"))
        object.__setattr__(self, "choices", tuple(self.choices))
        if (self.kind == "choice") != bool(self.choices):
            raise ValueError("guide: a choice guide needs at least one choice" if self.kind == "choice"
                             else f"guide: a {self.kind} guide takes no choices")
        if len(self.choices) > MAX_GUIDE_CHOICES:
            raise ValueError(f"guide: at most {MAX_GUIDE_CHOICES} choices, got {len(self.choices)}")
        if any(not isinstance(c, str) or not c or len(c) > MAX_GUIDE_CHOICE_CHARS for c in self.choices):
            raise ValueError(f"guide: choices must be non-empty strings of at most {MAX_GUIDE_CHOICE_CHARS} "
                             "characters")
        if self.kind == "json_schema":
            _check_schema_shape(self.spec)


def _check_schema_shape(text: str) -> None:
    """Refuse a schema too deep or too wide to compile in bounded time (zeroc.config.limits). Text that is no JSON
    passes: the compiler says what is wrong with it."""
    try:
        doc = json.loads(text)
    except RecursionError:
        raise ValueError(f"guide: the JSON schema nests deeper than {MAX_GUIDE_DEPTH} levels") from None
    except ValueError:
        return
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_GUIDE_DEPTH:
            raise ValueError(f"guide: the JSON schema nests deeper than {MAX_GUIDE_DEPTH} levels")
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and len(props) > MAX_GUIDE_PROPERTIES:
                raise ValueError(f"guide: an object schema lists {len(props)} properties; at most "
                                 f"{MAX_GUIDE_PROPERTIES} are allowed")
            stack += [(v, depth + 1) for v in node.values() if isinstance(v, (dict, list))]
        elif isinstance(node, list):  # the document itself may be a scalar (`true`: any value)
            stack += [(v, depth + 1) for v in node if isinstance(v, (dict, list))]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop. temperature 0 means greedy; otherwise it must
    lie in [MIN_TEMPERATURE, MAX_TEMPERATURE]."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1.0: no nucleus cut
    min_p: float = 0.0  # keep tokens at least this times the most likely one's probability; 0.0: no cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text returned ends before the first match
    ignore_eos: bool = False
    min_tokens: int = 0  # tokens generated before a stop token or string may end the text (vLLM's)
    include_stop_str_in_output: bool = False  # the text returned ends after the first stop string, not before
    # None: no log-probabilities; n >= 0: each generated token's, and the n most likely tokens' at its position
    logprobs: int | None = None
    # None: none; n >= 0: each prompt token's log-probability given the tokens before it (from the second token
    # on), and the n most likely tokens' at its position (zeroc/prompt_logprobs.py)
    prompt_logprobs: int | None = None
    # zeroc/penalties.py: OpenAI's frequency and presence penalties (0: none), the repetition penalty (1: none)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # (token id, added to its logit) pairs, OpenAI's logit_bias (a {token id: bias} dict is taken too)
    logit_bias: tuple[tuple[int, float], ...] = ()
    guide: Guide | None = None  # structured output: the text must match it
    skip_special_tokens: bool = True  # leave special tokens' text out of the output text (False: keep markers)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        t = self.temperature
        if not (t == 0.0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):  # NaN fails both
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
                             f"got {t!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:  # NaN fails too
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed!r}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ValueError(f"min_tokens must be an integer in [0, max_new_tokens], got {self.min_tokens!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        if any(not s or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be non-empty and at most {MAX_STOP_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids has {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} "
                             "are allowed")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not (isinstance(k, int) and 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:  # NaN fails too
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}] (1: none), "
                             f"got {self.repetition_penalty!r}")
        self._check_logit_bias()
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    def _check_logit_bias(self) -> None:
        """logit_bias as sorted (token id, bias) pairs, from pairs or a {token id: bias} dict."""
        given = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        bias = tuple(sorted((int(t), float(b)) for t, b in given))
        if len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias has {len(bias)} tokens; at most {MAX_LOGIT_BIAS_TOKENS} are allowed")
        if any(t < 0 or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in bias):
            raise ValueError(f"logit_bias: token ids must be >= 0 and biases in [-{MAX_LOGIT_BIAS:g}, "
                             f"{MAX_LOGIT_BIAS:g}]")
        if len({t for t, _ in bias}) != len(bias):
            raise ValueError("logit_bias names a token more than once")
        object.__setattr__(self, "logit_bias", bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the request changes its logits before sampling: a penalty or a logit bias (zeroc/penalties.py)."""
        return (self.frequency_penalty != 0.0 or self.presence_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias))


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private RNG on `device` for a seeded random request, so it samples the same tokens in any batch;
    None for greedy and unseeded requests (those draw from the sampler's shared generator)."""
    if params.greedy or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors (B rows), plus host-side facts that let
    the sampler rank no more candidates than the cuts need, and none when no row cuts its support."""

    # None when every row is greedy: an all-greedy step copies nothing to the device.
    temperature: Tensor | None  # [B] float32; 1.0 on greedy rows (unused there)
    top_k: Tensor | None  # [B] int64 in [1, vocab]; vocab means no cut
    top_p: Tensor | None  # [B] float32 in (0, 1]
    greedy: Tensor | None  # [B] bool
    generators: tuple[torch.Generator | None, ...]  # per row; None: the shared generator (or greedy)
    random_rows: tuple[int, ...]  # rows that sample
    # How many of a row's highest scores the cuts rank: 0 when no random row cuts; the largest top-k when
    # every random row has one; else the whole vocabulary (top-p alone needs the full order).
    ranked: int
    k_and_p: bool = False  # a random row cuts by both: top-p then shares out its top-k set's mass
    key: tuple = ()  # each row's (temperature, top_k, top_p, min_p): what the tensors above were built from
    # [B] float32 in [0, 1], or None where no random row has one: a row keeps the tokens whose probability is at
    # least min_p times its most likely token's (vLLM's min_p), before its top-k and top-p
    min_p: Tensor | None = None

    @property
    def cuts(self) -> bool:
        return self.ranked > 0

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], vocab: int,
              device: torch.device, last: SamplingBatch | None = None) -> "SamplingBatch":
        """The step's batch. `last`: the step before's; where its rows sampled with the same parameters (decode
        steps of an unchanged batch), its device tensors serve again and nothing is copied to the device. Else the
        four go in one copy."""
        key = tuple((p.temperature, p.top_k, p.top_p, p.min_p) for p in params)
        if last is not None and last.key == key:
            return replace(last, generators=tuple(generators))
        random_rows = tuple(i for i, p in enumerate(params) if not p.greedy)
        if not random_rows:
            return cls(None, None, None, None, tuple(generators), (), 0, key=key)
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        cuts = any(top_k[i] < vocab or params[i].top_p < 1.0 for i in random_rows)
        ranked = max(top_k[i] for i in random_rows) if cuts else 0
        k_and_p = any(top_k[i] < vocab and params[i].top_p < 1.0 for i in random_rows)
        min_p = any(params[i].min_p > 0.0 for i in random_rows)
        # [4 or 5, B] float32 (top_k exact below 2^24, past any vocabulary)
        rows = host_to_device([[p.temperature or 1.0 for p in params], top_k, [p.top_p for p in params],
                               [float(p.greedy) for p in params]] + ([[p.min_p for p in params]] if min_p else []),
                              torch.float32, device)
        return cls(temperature=rows[0], top_k=rows[1].long(), top_p=rows[2], greedy=rows[3].bool(),
                   generators=tuple(generators), random_rows=random_rows, ranked=ranked, k_and_p=k_and_p, key=key,
                   min_p=rows[4] if min_p else None)


# On the CPU, where reading a tensor on the host stalls nothing, a top-p row's nucleus is looked for among its
# largest weights first (torch.topk: 20 ms at batch 64 x 128k tokens, where the full sort takes 270); only a
# row whose nucleus reaches past them sorts the whole vocabulary.
CPU_CANDIDATES = 1024


def _thresholds(weights: Tensor, batch: SamplingBatch, ranked: int) -> tuple[Tensor, Tensor]:
    """Each row's smallest kept weight under its top-k and then its top-p, from its `ranked` largest weights:
    weights [B, V] (unnormalized probabilities) -> (thresholds [B, 1], decided [B]: whether the ranked weights
    hold the row's whole cut; always where ranked is V)."""
    top_k, top_p, vocab = batch.top_k, batch.top_p, weights.shape[-1]
    cand = (torch.topk(weights, ranked, dim=-1).values if ranked < vocab
            else torch.sort(weights, dim=-1, descending=True).values)  # [B, R] descending
    has_k = (top_k <= ranked).unsqueeze(1)  # [B, 1] the row's top-k set is among the candidates
    cuts_k = has_k & (top_k < vocab).unsqueeze(1)  # ... and is not the whole vocabulary
    kth = torch.where(cuts_k, cand.gather(1, (top_k.clamp(max=ranked) - 1).unsqueeze(1)), 0.0)  # [B, 1]
    cand = cand * (cand >= kth)  # the top-k cut (ties with the k-th stay)
    # [B, 1] the mass top-p shares out: the whole row's, or where a row cuts by both its top-k set's (ties with
    # the k-th included, which may lie past the candidates). Summed over the row either way, so a row's cut
    # does not depend on how many candidates its batch ranked.
    total = (torch.where(weights >= kth, weights, 0.0) if batch.k_and_p else weights).sum(-1, keepdim=True)
    # Drop a token once the mass before it already reaches top_p; the first always stays, so the kept tokens
    # are a prefix of the ranked order and the last one's weight is the threshold. (Clamped: a NaN row keeps
    # none; it fails anyway, and an index of -1 would fault on a device.) A row without top-p keeps all.
    p = top_p.unsqueeze(1)  # [B, 1]
    kept = ((cand.cumsum(-1) - cand) < p * total).sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
    nucleus = torch.where(p < 1.0, cand.gather(1, kept - 1), 0.0)
    # decided: the top-k set is among the candidates, or there is no top-k and either no top-p or a nucleus
    # that the candidates' mass reaches
    reaches = (p >= 1.0) | (cand.sum(-1, keepdim=True) >= p * total)
    decided = has_k | ((top_k >= vocab).unsqueeze(1) & reaches)
    return torch.maximum(kth, nucleus), decided.squeeze(1)


def _cut_support(weights: Tensor, batch: SamplingBatch) -> None:
    """Zero, in place, the weights [B, V] that each row's top-k and then top-p drop. `batch.ranked` of each row's
    largest weights are ranked: every random row keeps at most that many, so ranking no more is exact; rows with
    a larger top_k (greedy ones) are cut at it, unused. On a device they are ranked at once, with no sync; on
    the CPU see CPU_CANDIDATES."""
    first = min(batch.ranked, CPU_CANDIDATES) if weights.device.type == "cpu" else batch.ranked
    threshold, decided = _thresholds(weights, batch, first)
    if first < batch.ranked and not bool(decided.all()):  # the CPU only: a nucleus reaches past the candidates
        threshold, _ = _thresholds(weights, batch, batch.ranked)
    weights.masked_fill_(weights < threshold, 0.0)


def _uniforms(rows: int, batch: SamplingBatch, device: torch.device, shared: torch.Generator | None) -> Tensor:
    """U[0, 1) per row [B]: a seeded row's from its own generator (one number a step, whatever the batch),
    the other rows' in one shared draw."""
    u = torch.rand(rows, device=device, generator=shared)
    for row in batch.random_rows:
        gen = batch.generators[row]
        if gen is not None:
            u[row: row + 1].uniform_(generator=gen)
    return u


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """The first token whose cumulative weight exceeds u times the row's total: weights [B, V] (unnormalized
    probabilities, finite; overwritten with their cumulative sums), u [B] -> ids [B]. A token of weight zero
    adds nothing to the sum, so it is never picked."""
    cdf = weights.cumsum_(dim=-1)  # [B, V]
    total = cdf[:, -1:]  # [B, 1]
    # below total even where u is 1.0 (an edge some device generators reach): the pick lands on a token with mass
    v = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, v, right=True).squeeze(1)


def sample_batch(logits: Tensor, batch: SamplingBatch, shared: torch.Generator | None = None,
                 native: ModuleType | None = None) -> Tensor:
    """One token id per row of logits: [B, V] -> [B] int64 on the device; FAILED where a row's logits are not
    finite. Causes no device sync. native: the CPU kernel module (zeroc_kernels.ragged_cpu.load_ragged_kernel),
    which samples CPU logits in one call; elsewhere it is not used."""
    if native is not None and logits.device.type == "cpu":
        return _sample_native(native, logits, batch, shared)
    # Random rows need one fp32 copy of the logits (scaled in place below); an all-greedy step copies nothing and
    # reads the logits in their own dtype (bf16 converts to fp32 exactly: the same argmax and checks either way).
    # Two reductions, no [B, V] temporary: max() gives argmax's ids (the first of equal maxima), and a NaN or
    # +inf shows in a row's max (both propagate NaN), a -inf in its min. On the CPU this is 6-8x faster than
    # argmax plus isfinite(logits).all().
    x = logits.to(torch.float32, copy=True) if batch.random_rows else logits  # [B, V]
    top, ids = x.max(dim=-1)  # [B], [B]
    bad = ~(torch.isfinite(top) & torch.isfinite(x.amin(dim=-1)))  # [B]
    if batch.random_rows:
        # exp((logits - max) / T) in place: the softmax's shift first, so finite logits give finite weights in
        # [0, 1] at any temperature (1 for the top token; a row that is not finite is already bad) that need no
        # normalizing: the cuts compare masses within a row, and the inverse CDF scales u by the row's total
        weights = x.sub_(top.unsqueeze(1)).div_(batch.temperature.unsqueeze(1)).exp_()  # [B, V]
        if batch.min_p is not None:  # a weight is its token's probability over the top one's: min_p's cut as is
            weights.masked_fill_(weights < batch.min_p.unsqueeze(1), 0.0)
        if batch.cuts:
            _cut_support(weights, batch)
        sampled = _inverse_cdf(weights, _uniforms(logits.shape[0], batch, logits.device, shared))
        ids = torch.where(batch.greedy, ids, sampled)  # a bad row's pick (V, past the end) is masked below
    return ids.masked_fill(bad, FAILED)


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model (its raw logits' log-softmax: before temperature and
    the top-k/top-p cuts, as vLLM reports them), and the most likely tokens' at its position, best first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability)


# Token ids ride in the float64 rows of `with_logprobs` exactly: any vocabulary is far below 2^53.
def with_logprobs(logits: Tensor, ids: Tensor, k: int) -> Tensor:
    """The step's one tensor for the host when a row asks for log-probabilities: logits [B, V] and the sampled
    ids [B] -> [B, 2 + 2k] float64 rows (id, its log-probability, the k best log-probabilities, their ids).
    No device sync; a FAILED row's figures are meaningless (its request fails)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    chosen = logp.gather(1, ids.clamp(min=0).unsqueeze(1))  # [B, 1]
    top = torch.topk(logp, k, dim=-1) if k else (logp[:, :0], ids[:, None][:, :0])  # [B, k] each
    return torch.cat([ids.unsqueeze(1).double(), chosen.double(), top[0].double(), top[1].double()], dim=1)


def read_logprobs(row: list[float], k: int, wanted: int) -> TokenLogprobs:
    """One host row of `with_logprobs(..., k)` as the `wanted` (<= k) alternatives a request asked for."""
    return TokenLogprobs(row[1], tuple((int(row[2 + k + j]), row[2 + j]) for j in range(wanted)))


def _sample_native(native: ModuleType, logits: Tensor, batch: SamplingBatch, shared: torch.Generator | None) -> Tensor:
    """`sample_batch` by kernels/csrc/sampling.cpp: logits [B, V] on the CPU -> ids [B]. The uniforms are drawn as
    the torch path draws them, so a seeded request gets the same tokens either way."""
    if logits.dtype not in (torch.float32, torch.bfloat16):
        logits = logits.float()  # exact for float16
    if not batch.random_rows:  # an all-greedy batch carries no parameter tensors, and draws nothing
        return native.sample_rows(logits)
    u = _uniforms(logits.shape[0], batch, logits.device, shared)
    return native.sample_rows(logits, batch.temperature, batch.top_k, batch.top_p, batch.greedy, u, batch.min_p)
