"""Next-token choice: `SamplingParams` (the one public settings type, validated once) and the one sampling stage.

The stage runs on device over per-row settings (`SamplingMetadata`, a pytree of traced arrays, so a new setting
compiles nothing), in one fixed order:
  1. the allowed-token bitmask (packed int32 [B, ceil(V / 32)], as xgrammar and llguidance write it) and logit_bias;
  2. penalties: repetition_penalty as transformers' RepetitionPenaltyLogitsProcessor over prompt and generated
     tokens, then presence and frequency penalties as OpenAI's API over the generated tokens (vLLM's order);
  3. temperature; 4. top-k, top-p, min-p (transformers' MinPLogitsWarper); 5. the draw, or argmax at temperature 0.
`accept` is the same stage for k drafted tokens (Leviathan et al.'s rule); one token is its k = 0 case, so a plain
step and a verify step draw the same way. Every draw of row b at its token index t uses the key
fold_in(fold_in(key(seed_b), t), purpose): one derivation wherever the row runs (generate, stream, server).

Penalties need token counts on device (`TokenCounts`): int32 [V] generated counts plus a packed prompt bitmask per
row, 4 V + V / 8 bytes (198 KiB for SmolLM2's 49152 tokens, 132 KiB for Mistral's 32768); callers pass None where no
row is penalized (a static switch: that program neither keeps nor reads them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mistral_jax import grammars
from mistral_jax.errors import ParamError

TOP_LOGPROBS = 20  # alternatives computed for every token (OpenAI's limit); a request may ask for up to this many
MAX_TOP_K = 2**31 - 1  # top_k is an int32 on device; any value at or above the vocabulary means no filter
MAX_SEED = 2**64  # seeds are 64 bits: the two 32-bit words of a threefry key (see `seed_key_data`)
MAX_BIAS = 100.0  # logit_bias values lie in [-MAX_BIAS, MAX_BIAS] (OpenAI's range)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _token_id(key, param: str) -> int:
    """A token id given as an int or (JSON object keys) a decimal string."""
    if isinstance(key, str) and key.strip().lstrip("+").isdigit():
        key = int(key)
    if not _is_int(key) or key < 0:
        raise ParamError(param, f"{param} keys must be token ids (non-negative integers), got {key!r}")
    return int(key)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One row's (or request's) generation settings, checked once here; a wrong one raises ParamError naming it.

    temperature 0 is greedy; top_k 0 (or any value at or above the vocabulary), top_p 1 and min_p 0 switch those
    filters off. presence/frequency penalties follow OpenAI (over the generated tokens), repetition_penalty
    transformers' RepetitionPenaltyLogitsProcessor (over prompt and generated tokens; 1 is off), min_p transformers'
    MinPLogitsWarper. logit_bias maps token ids to a bias in [-100, 100] added to their logits (stored as sorted
    (id, bias) pairs). seed: any integer in [0, 2**64). response_format: a constraint on the answer (grammars.py:
    {"json_schema": schema}, {"regex": ...}, OpenAI's {"type": "json_schema", ...}, ...), compiled here once; the
    serving engine honours it, generate refuses it.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending; a mapping is accepted
    max_tokens: int = 16
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one, which is not returned
    stop_token_ids: tuple[int, ...] = ()  # besides the tokenizer's own end-of-turn ids (unless ignore_eos)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; N >= 0: each token's logprob and the top N alternatives
    echo_logprobs: bool = False  # also the prompt's tokens' logprobs (completions with echo)
    response_format: str | None = None  # a constraint (grammars.py; a mapping or its JSON), kept as canonical JSON
    grammar: str | None = dataclasses.field(default=None, init=False, repr=False, compare=False)  # its llguidance

    def __post_init__(self):
        def number(name: str, ok, why: str):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or abs(value) > FLOAT32_MAX or not ok(value):
                raise ParamError(name, f"{name} must be {why}, got {value!r}")
            object.__setattr__(self, name, float(value))

        def integer(name: str, low: int, high: int, why: str):
            value = getattr(self, name)
            if not _is_int(value) or not low <= value < high:
                raise ParamError(name, f"{name} must be {why}, got {value!r}")
            object.__setattr__(self, name, int(value))

        number("temperature", lambda v: v >= 0, "a finite number >= 0")
        integer("top_k", 0, MAX_TOP_K + 1, f"an integer in [0, {MAX_TOP_K}] (0 or >= the vocabulary: no filter)")
        number("top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")
        number("min_p", lambda v: 0 <= v <= 1, "a number in [0, 1]")
        integer("seed", 0, MAX_SEED, "an integer in [0, 2**64)")
        number("presence_penalty", lambda v: abs(v) <= MAX_PENALTY, f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        number("frequency_penalty", lambda v: abs(v) <= MAX_PENALTY, f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        number("repetition_penalty", lambda v: v > 0, "a finite number > 0 (1 is off)")
        integer("max_tokens", 1, 2**31, "an integer >= 1")
        self._check_logit_bias()
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise ParamError("stop", f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if not isinstance(ids, (tuple, list)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise ParamError("stop_token_ids", f"stop_token_ids must be token ids, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        for name in ("ignore_eos", "echo_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ParamError(name, f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= TOP_LOGPROBS):
            raise ParamError("logprobs", f"logprobs must be between 0 and {TOP_LOGPROBS}, got {self.logprobs!r}")
        self._check_response_format()

    def for_row(self, row: int) -> SamplingParams:
        """These settings for row (or choice) `row` of a batch sharing them: seeded seed + row (mod 2**64), the one
        recipe of generate's batch rows and the server's n choices, so row i equals a lone request seeded so."""
        return dataclasses.replace(self, seed=(self.seed + row) % MAX_SEED)

    def _check_response_format(self):
        """The constraint in its one-key form as canonical JSON, and its grammar compiled (a ParamError naming
        response_format where llguidance cannot compile it)."""
        spec = grammars.constraint(self.response_format)
        if spec is None:
            object.__setattr__(self, "response_format", None)
            return
        object.__setattr__(self, "grammar", grammars.grammar(spec))
        # Keys keep their order: a schema's property order is the order its JSON is generated in.
        object.__setattr__(self, "response_format", json.dumps(spec, ensure_ascii=False))

    def _check_logit_bias(self):
        bias = self.logit_bias
        if isinstance(bias, Mapping):
            bias = bias.items()
        elif not isinstance(bias, (tuple, list)):
            raise ParamError("logit_bias", f"logit_bias must map token ids to numbers, got {bias!r}")
        pairs = {}
        for item in bias:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ParamError("logit_bias", f"logit_bias must map token ids to numbers, got {item!r}")
            token, value = _token_id(item[0], "logit_bias"), item[1]
            if not _is_number(value) or not math.isfinite(value) or abs(value) > MAX_BIAS:
                raise ParamError("logit_bias", f"logit_bias values must be numbers in [-{MAX_BIAS:g}, {MAX_BIAS:g}], "
                                               f"got {value!r} for token {token}")
            pairs[token] = float(value)
        object.__setattr__(self, "logit_bias", tuple(sorted(pairs.items())))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether the penalties need token counts (presence, frequency or repetition set)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids this names lie in the vocabulary (the sizes are known only with a model)."""
        for name, ids in (("logit_bias", [t for t, _ in self.logit_bias]), ("stop_token_ids", self.stop_token_ids)):
            if any(t >= vocab_size for t in ids):
                raise ParamError(name, f"{name} token ids must lie in [0, {vocab_size})")


def seed_key_data(seed: int) -> np.ndarray:
    """A 64-bit seed as threefry key data uint32 [2] (high word, low word); equal to
    `jax.random.key_data(jax.random.key(seed))` for seeds below 2**32 (jax.random.key drops the high word)."""
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


# Per-row settings on device -------------------------------------------------------------------------------
ACCEPT, TOKEN, DRAFT = 0, 1, 2  # what a key is folded with for: accepting drafts, the emitted token, draft i (2 + i)


@flax.struct.dataclass
class SamplingMetadata:
    """Every row's settings as arrays (a pytree: traced, so new settings reuse the compiled programs)."""

    keys: jax.Array  # uint32 [B, 2]: threefry key data of each row's seed (`seed_key_data`)
    temperature: jax.Array  # float32 [B]: 0 = greedy
    top_k: jax.Array  # int32 [B]: 0 = off (so is any value >= V)
    top_p: jax.Array  # float32 [B]: 1 = off
    min_p: jax.Array  # float32 [B]: 0 = off
    presence: jax.Array  # float32 [B]: OpenAI's presence_penalty
    frequency: jax.Array  # float32 [B]: OpenAI's frequency_penalty
    repetition: jax.Array  # float32 [B]: transformers' repetition_penalty, 1 = off
    bias: jax.Array  # float32 [B, V]: logit_bias, dense
    allowed: jax.Array  # int32 [B, ceil(V / 32)]: token v allowed where bit v % 32 of word v // 32 is set


def packed_width(vocab_size: int) -> int:
    """int32 words of a packed token bitmask: ceil(V / 32)."""
    return -(-vocab_size // 32)


def metadata(params: Sequence[SamplingParams], vocab_size: int) -> SamplingMetadata:
    """Rows' settings as numpy arrays (the caller places them); checks the token ids against the vocabulary."""
    b = len(params)
    bias = np.zeros((b, vocab_size), np.float32)
    for row, p in enumerate(params):
        p.check_vocab(vocab_size)
        if p.logit_bias:
            ids, values = zip(*p.logit_bias)
            bias[row, list(ids)] = values

    def column(name, dtype):
        return np.array([getattr(p, name) for p in params], dtype)

    return SamplingMetadata(
        keys=np.stack([seed_key_data(p.seed) for p in params]),
        temperature=column("temperature", np.float32),
        top_k=np.array([p.top_k if p.top_k < vocab_size else 0 for p in params], np.int32),
        top_p=column("top_p", np.float32),
        min_p=column("min_p", np.float32),
        presence=column("presence_penalty", np.float32),
        frequency=column("frequency_penalty", np.float32),
        repetition=column("repetition_penalty", np.float32),
        bias=bias,
        allowed=np.full((b, packed_width(vocab_size)), -1, np.int32),
    )


def pack_tokens(rows: Sequence[Sequence[int]], vocab_size: int) -> np.ndarray:
    """Token id lists -> packed bitmasks int32 [R, ceil(V / 32)] with each list's tokens set."""
    words = np.zeros((len(rows), packed_width(vocab_size)), np.uint32)
    for row, ids in enumerate(rows):
        ids = np.unique(np.asarray(ids, np.int64))
        np.bitwise_or.at(words[row], ids // 32, (np.uint32(1) << (ids % 32).astype(np.uint32)))
    return words.view(np.int32)


def unpack_tokens(words, vocab_size: int):
    """Packed bitmasks int32 [..., W] -> bool [..., V]."""
    v = jnp.arange(vocab_size)
    return ((words[..., v // 32] >> (v % 32)) & 1).astype(bool)


@flax.struct.dataclass
class TokenCounts:
    """What the penalties read per row: how often each token was generated, and which the prompt holds."""

    generated: jax.Array  # int32 [B, V]: generated tokens' counts (presence and frequency penalties)
    prompt: jax.Array  # int32 [B, ceil(V / 32)]: packed bitmask of the prompt's tokens (repetition penalty)


def prompt_counts(prompts: Sequence[Sequence[int]], vocab_size: int) -> TokenCounts:
    """Counts before the first new token (numpy): nothing generated, the prompts' tokens marked."""
    return TokenCounts(np.zeros((len(prompts), vocab_size), np.int32), pack_tokens(prompts, vocab_size))


def token_counts(prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], vocab_size: int) -> TokenCounts:
    """Counts after each row generated `outputs` (numpy): what `count` makes on device, rebuilt on the host."""
    counts = prompt_counts(prompts, vocab_size)
    for row, output in enumerate(outputs):
        if len(output):
            counts.generated[row] = np.bincount(np.asarray(output, np.int64), minlength=vocab_size)
    return counts


def count(counts: TokenCounts | None, tokens, new) -> TokenCounts | None:
    """counts plus tokens int32 [B, J] where new (bool [B, J])."""
    if counts is None:
        return None
    rows = jnp.arange(tokens.shape[0])[:, None]
    return counts.replace(generated=counts.generated.at[rows, tokens].add(new.astype(jnp.int32)))


# The stage ------------------------------------------------------------------------------------------
def _per_row(x, like):
    """A [B] setting shaped to broadcast against `like` [B, ..., V]."""
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


def adjust(logits, sampling: SamplingMetadata, counts: TokenCounts | None, drafts=None):
    """Steps 1-2 (mask and bias, penalties): float logits [B, J, V] -> float32 [B, J, V]. Position j of a row
    follows drafts[:, :j] (int32 [B, J - 1], None when J = 1): the penalties count them as generated."""
    v = logits.shape[-1]
    x = logits.astype(jnp.float32) + sampling.bias[:, None]
    x = jnp.where(unpack_tokens(sampling.allowed, v)[:, None], x, -jnp.inf)
    if counts is None:
        return x
    n = jnp.broadcast_to(counts.generated[:, None], x.shape)  # [B, J, V]
    if drafts is not None and drafts.shape[1]:
        ahead = jnp.cumsum(jax.nn.one_hot(drafts, v, dtype=jnp.int32), axis=1)  # [B, J - 1, V]
        n = n + jnp.pad(ahead, ((0, 0), (1, 0), (0, 0)))
    seen = (n > 0) | unpack_tokens(counts.prompt, v)[:, None]
    rep = _per_row(sampling.repetition, x)
    x = jnp.where(seen, jnp.where(x < 0, x * rep, x / rep), x)
    return x - _per_row(sampling.frequency, x) * n - _per_row(sampling.presence, x) * (n > 0)


def _filter(x, top_k, top_p, min_p):
    """Steps 4: top-k, top-p and min-p over x [B, J, V] (settings shaped [B, 1, 1]): the rest set to -inf."""
    v = x.shape[-1]
    descending = -jnp.sort(-x, axis=-1)
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)
    kth = jnp.take_along_axis(descending, k - 1, axis=-1)  # [B, J, 1]
    descending = jnp.where(descending < kth, -jnp.inf, descending)
    probs = jax.nn.softmax(descending, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    nucleus = jnp.min(jnp.where(before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
    nucleus = jnp.where(top_p < 1, nucleus, -jnp.inf)
    floor = descending[..., :1] + jnp.log(min_p)  # p < min_p * p_max, as logits; min_p 0: -inf
    return jnp.where(x < jnp.maximum(jnp.maximum(kth, nucleus), floor), -jnp.inf, x)


def warp(x, sampling: SamplingMetadata):
    """Steps 3-4: x [B, J, V] (adjusted) / temperature, then the filters; greedy rows' come back divided by 1.
    The filters' sort runs only when some sampling row sets one (a traced switch)."""
    x = x / _per_row(jnp.where(sampling.temperature > 0, sampling.temperature, 1.0), x)
    top_k, top_p, min_p = (_per_row(a, x) for a in (sampling.top_k, sampling.top_p, sampling.min_p))
    filtering = (sampling.temperature > 0) & ((sampling.top_k > 0) | (sampling.top_p < 1) | (sampling.min_p > 0))
    return jax.lax.cond(jnp.any(filtering), _filter, lambda x, *_: x, x, top_k, top_p, min_p)


def token_probs(x, sampling: SamplingMetadata):
    """The distributions sampling draws from: adjusted logits [B, J, V] -> probabilities [B, J, V]."""
    return jax.nn.softmax(warp(x, sampling), axis=-1)


def row_keys(sampling: SamplingMetadata, counts):
    """Each row's key for its draws at token index counts (int32 [B]) -> typed keys [B]."""
    return jax.vmap(lambda data, t: jax.random.fold_in(jax.random.wrap_key_data(data, impl="threefry2x32"), t))(
        sampling.keys, counts)


def _leviathan(warped, drafts, q, key):
    """One sampling row: warped logits [J, V], drafts [J - 1], the draft's q [J - 1, V] (None: point masses) ->
    (kept [], emitted [J]). Keep draft i with probability min(1, p / q); at the first rejection draw from
    max(0, p - q) normalised; after all J - 1 kept, draw the bonus from p itself (J = 1: a plain draw)."""
    k = drafts.shape[0]
    token_key = jax.random.fold_in(key, TOKEN)
    if k == 0:
        return jnp.int32(0), jax.random.categorical(token_key, warped[0])[None].astype(jnp.int32)
    p = jax.nn.softmax(warped, axis=-1)
    q = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype) if q is None else q
    p_draft = jnp.take_along_axis(p[:k], drafts[:, None], axis=-1)[:, 0]
    q_draft = jnp.take_along_axis(q, drafts[:, None], axis=-1)[:, 0]
    keep = jax.random.uniform(jax.random.fold_in(key, ACCEPT), (k,)) * q_draft < p_draft  # u < p / q
    kept = jnp.sum(jnp.cumprod(keep)).astype(jnp.int32)
    residual = jnp.maximum(p[kept] - jnp.pad(q, ((0, 1), (0, 0)))[kept], 0.0)
    residual = jnp.where(jnp.sum(residual) > 0, residual, p[kept])  # empty only where p == q
    token = jnp.where(kept == k, jax.random.categorical(token_key, warped[kept]),
                      jax.random.categorical(token_key, jnp.log(residual))).astype(jnp.int32)
    return kept, jnp.pad(drafts, (0, 1)).at[kept].set(token)


def _coupled(warped, drafts, sampling: SamplingMetadata, counts):
    """Leviathan's rule for point-mass drafts, coupled to plain sampling: warped [B, J, V], drafts [B, J - 1] ->
    (kept [B], emitted [B, J]). Position j draws as a plain step at token index counts + j would (Gumbel-max with
    that index's key); draft j is kept iff it equals that draw (probability p(d), as min(1, p / q) with q = 1), and
    the first differing draw is a sample of p without d renormalised, the residual. So a sampled row makes the
    same tokens speculating or not, whatever its batch verifies."""
    j = warped.shape[1]
    keys = jax.vmap(lambda t: row_keys(sampling, counts + t), out_axes=1)(jnp.arange(j, dtype=jnp.int32))  # [B, J]
    plain = jax.vmap(jax.vmap(lambda key, w: jax.random.categorical(jax.random.fold_in(key, TOKEN), w)))(
        keys, warped).astype(jnp.int32)  # [B, J]
    kept = jnp.sum(jnp.cumprod(drafts == plain[:, :-1], axis=1), axis=1).astype(jnp.int32)
    return kept, plain


def accept(x, drafts, sampling: SamplingMetadata, counts, q=None):
    """Step 5 for a row's latest token and its drafts: x [B, J, V] adjusted logits at the J positions, drafts
    int32 [B, J - 1] (J = 1: none), counts int32 [B] each row's token index (its key), q float32 [B, J - 1, V] the
    draft model's distributions (None: prompt lookup's point masses) -> (kept int32 [B], emitted int32 [B, J]: a
    row's first kept + 1 are its new tokens). Greedy rows keep drafts while they equal the argmax."""
    target = jnp.argmax(x, axis=-1).astype(jnp.int32)  # [B, J]
    kept = jnp.sum(jnp.cumprod(drafts == target[:, :-1], axis=1), axis=1).astype(jnp.int32)
    hot = sampling.temperature > 0

    def sampled():
        if q is None:  # point-mass drafts: keep draft j while it equals plain sampling's draw at that index
            return _coupled(warp(x, sampling), drafts, sampling, counts)
        return jax.vmap(_leviathan)(warp(x, sampling), drafts, q, row_keys(sampling, counts))

    kept_hot, emitted_hot = jax.lax.cond(jnp.any(hot), sampled, lambda: (kept, target))
    return jnp.where(hot, kept_hot, kept), jnp.where(hot[:, None], emitted_hot, target)


def sample(logits, sampling: SamplingMetadata, counts=None, index=None):
    """One token per row from logits [B, V], all five steps: -> int32 [B]. index: int32 [B] each row's token index
    (default 0); counts: the rows' TokenCounts (None: no penalties)."""
    index = jnp.zeros(logits.shape[0], jnp.int32) if index is None else index
    drafts = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return accept(adjust(logits[:, None], sampling, counts), drafts, sampling, index)[1][:, 0]


def draw(x, sampling: SamplingMetadata, counts, purpose):
    """A draft model's token per row from adjusted logits x [B, V] with key purpose `purpose` (DRAFT + i), and the
    distribution it was drawn from: -> (int32 [B], float32 [B, V]). Greedy rows take the argmax."""
    warped = warp(x[:, None], sampling)[:, 0]
    keys = jax.vmap(lambda key: jax.random.fold_in(key, purpose))(row_keys(sampling, counts))
    drawn = jax.vmap(jax.random.categorical)(keys, warped)
    token = jnp.where(sampling.temperature > 0, drawn, jnp.argmax(x, axis=-1)).astype(jnp.int32)
    return token, jax.nn.softmax(warped, axis=-1)
