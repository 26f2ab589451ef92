"""Constrained decoding: sample only strings a regular expression, JSON schema or grammar accepts.

The engine is llguidance (imported lazily): it compiles the constraint against the tokenizer's
vocabulary and, after each token, yields the bitmask of the tokens that can still lead to an
accepted string (EOS only once the string is complete). That runs on the host, so the sampler
calls `TokenConstraint` once per step through its `allowed_tokens` hook (an ordered
`io_callback` inside the jitted `lax.while_loop`), gets the [b, vocab/32] int32 bitmask back and
sets the other logits to -inf before filtering and choosing.

Why a callback and not a precomputed automaton on the device: a JSON schema or a Lark grammar is
not a finite automaton, and the engine's masks depend on the whole prefix; computing them on the
host where the engine lives costs a few microseconds per row and step (llguidance's masks are
fast by design) plus one small transfer, next to milliseconds for a decode step, and keeps one
compiled sampler for every constraint of the same batch shape (`reset` reuses it).
"""

from __future__ import annotations

import functools
import json

import jax
import numpy as np

from ptjax import sampling
from ptjax.data import ByteTokenizer, encode_prompt

KINDS = ("regex", "json_schema", "grammar")


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - a dependency of ptjax
        raise ImportError("constrained decoding needs llguidance (pip install llguidance)") from e
    return llguidance


class _ByteVocabulary:
    """`ByteTokenizer` as llguidance's `TokenizerWrapper` expects a tokenizer: each id's bytes
    and an encoder from bytes to ids."""

    def __init__(self, tokenizer: ByteTokenizer):
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        specials = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
        self.special_token_ids = list(specials)
        self.tokens = [f"<special_{i}>".encode() for i in range(tokenizer.OFFSET)]
        self.tokens += [bytes([i]) for i in range(256)]
        self.offset = tokenizer.OFFSET

    def __call__(self, text):
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return [b + self.offset for b in data]


def engine_tokenizer(tokenizer):
    """llguidance's `LLTokenizer` for a ptjax tokenizer (a `ByteTokenizer`, or an `HFTokenizer`
    wrapping a `tokenizers.Tokenizer`), with every stop id as an end token.

    Why cached: building one scans the whole vocabulary (about a second for 50k tokens), and a
    tokenizer serves many constraints.
    """
    return _engine_tokenizer(tokenizer)


@functools.lru_cache(maxsize=8)
def _engine_tokenizer(tokenizer):
    llg = _llguidance()
    stops = list(sampling.tokenizer_stop_ids(tokenizer))
    if isinstance(tokenizer, ByteTokenizer):
        return llg.LLTokenizer(llg.TokenizerWrapper(_ByteVocabulary(tokenizer)))
    raw = getattr(tokenizer, "tokenizer", None)
    if raw is None or not hasattr(raw, "to_str"):
        raise TypeError(f"constrained decoding needs a ByteTokenizer or an HFTokenizer, got "
                        f"{type(tokenizer).__name__}")
    return llg.LLTokenizer(raw.to_str(), n_vocab=tokenizer.vocab_size, eos_token=stops)


# JSON is laid out as `json.dumps` writes it, with no other whitespace: with the engine's
# default (any whitespace between tokens) a small model can fill its budget with newlines. A
# schema's own "x-guidance" options override this.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def compile_grammar(kind: str, text) -> str:
    """llguidance's grammar for a constraint: `regex` (Rust regex syntax, matched in full),
    `json_schema` (a JSON schema as a dict or JSON text; `JSON_LAYOUT`) or `grammar` (a Lark
    grammar, or GBNF as llama.cpp writes it). Errors name the kind."""
    llg = _llguidance()
    if kind not in KINDS:
        raise ValueError(f"unknown constraint kind {kind!r}; choose one of {KINDS}")
    if kind == "json_schema":
        schema = text
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema: not valid JSON ({e})") from e
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    return llg.grammar_from("regex" if kind == "regex" else "grammar", text)


class TokenConstraint:
    """The host side of constrained decoding: one llguidance matcher per sampled row.

    Called by the sampler once per step with the tokens the previous step chose (-1 before
    the first) and which rows are still running; each running row's matcher consumes its token
    and writes the bitmask of the tokens allowed next. Rows that have finished get all bits
    (their token is replaced by padding anyway). Reuse one object for several `generate` calls
    with `reset()` (a jitted sampler closes over it, so it then compiles once).
    """

    def __init__(self, tokenizer, kind: str, text, *, batch: int, vocab_size: int):
        llg = _llguidance()
        self.kind = kind
        self.engine_tokenizer = engine_tokenizer(tokenizer)
        self.grammar = compile_grammar(kind, text)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(
            self.grammar, self.engine_tokenizer)
        if is_error:
            raise ValueError(f"{kind}: {messages[0]}")
        self.batch, self.vocab_size = batch, vocab_size
        self.words = -(-vocab_size // 32)
        self.engine_words = -(-self.engine_tokenizer.vocab_size // 32)
        if self.engine_tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer has {self.engine_tokenizer.vocab_size} tokens but "
                             f"the model only {vocab_size} logits")
        self.stop_ids = np.asarray(sampling.tokenizer_stop_ids(tokenizer), np.int64)
        self.reset()

    def reset(self):
        """Fresh matchers for a new batch of completions."""
        llg = _llguidance()
        self.matchers = [llg.LLMatcher(self.engine_tokenizer, self.grammar, log_level=1)
                         for _ in range(self.batch)]
        self.rejected = np.zeros(self.batch, bool)  # a row whose token the engine refused

    def __call__(self, last_tokens, active) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask

        last_tokens, active = np.asarray(last_tokens), np.asarray(active)
        bits = np.zeros((self.batch, self.words), np.int32)
        bits[~active] = -1
        engine_bits = np.zeros((1, self.engine_words), np.int32)
        for row in np.flatnonzero(active):
            matcher = self.matchers[row]
            if last_tokens[row] >= 0 and not matcher.consume_token(int(last_tokens[row])):
                self.rejected[row] = True
            if matcher.is_error():  # only a bug could get here: end the row cleanly
                bits[row, self.stop_ids[0] // 32] |= np.int32(1 << (self.stop_ids[0] % 32))
                continue
            fill_next_token_bitmask(matcher, engine_bits, 0)
            bits[row, :self.engine_words] = engine_bits[0]
        return bits

    def accepts(self, row: int) -> bool:
        """Whether row `row`'s tokens so far form a complete string of the constraint."""
        return bool(self.matchers[row].is_accepting() and not self.rejected[row])


def constraint_from(tokenizer, *, batch: int, vocab_size: int, regex: str = "",
                    json_schema=None, grammar: str = "") -> TokenConstraint | None:
    """The constraint that exactly one of `regex`, `json_schema`, `grammar` names (None when
    none does): the single entry point of the CLI and recipes."""
    given = [(k, v) for k, v in (("regex", regex), ("json_schema", json_schema),
                                 ("grammar", grammar)) if v]
    if len(given) > 1:
        raise ValueError(f"give at most one of regex, json_schema, grammar; got "
                         f"{[k for k, _ in given]}")
    if not given:
        return None
    kind, text = given[0]
    return TokenConstraint(tokenizer, kind, text, batch=batch, vocab_size=vocab_size)


@functools.lru_cache(maxsize=8)
def make_generate_fn(cfg, constraint: TokenConstraint, max_new_tokens: int,
                     temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, eos_id=2,
                     pad_id: int = 0):
    """A jitted `fn(params, tokens, mask, rng)`: `sampling.generate` under `constraint`,
    memoized per (constraint, settings), so a constraint reused with `reset()` compiles once."""
    def fn(params, tokens, mask, rng):
        return sampling.generate(params, cfg, tokens, mask, rng, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 eos_id=eos_id, pad_id=pad_id, allowed_tokens=constraint)

    return jax.jit(fn)


def generate_text(params, cfg, tokenizer, prompts: list[str], *, regex: str = "",
                  json_schema=None, grammar: str = "", max_new_tokens: int,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0) -> tuple[list[str], list[bool]]:
    """(completions of `prompts` under the constraint, whether each is a complete accepted
    string): one batch, strings in and out. A completion cut by `max_new_tokens` before the
    constraint could end is a prefix of an accepted string, and reported as not accepted."""
    constraint = constraint_from(tokenizer, batch=len(prompts), vocab_size=cfg.vocab_size,
                                 regex=regex, json_schema=json_schema, grammar=grammar)
    if constraint is None:
        raise ValueError("give one of regex, json_schema, grammar")
    encoded = [encode_prompt(text, tokenizer) for text in prompts]
    length = -(-max(len(e) for e in encoded) // sampling.PAD_MULTIPLE) * sampling.PAD_MULTIPLE
    tokens, mask = sampling.left_pad(encoded, length, tokenizer.pad_id)
    stop_ids = sampling.tokenizer_stop_ids(tokenizer)
    fn = make_generate_fn(cfg, constraint, int(max_new_tokens), float(temperature), int(top_k),
                          float(top_p), stop_ids, int(tokenizer.pad_id))
    out = fn(params, tokens, mask, jax.random.key(seed))
    generated, done = np.asarray(out["tokens"]), np.asarray(out["done"])
    texts = [sampling.text_of(row, stop_ids, tokenizer) for row in generated]
    return texts, [bool(done[i]) and constraint.accepts(i) for i in range(len(prompts))]
