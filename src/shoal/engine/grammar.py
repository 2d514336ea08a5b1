"""Grammar-constrained decoding: a sequence's next token restricted to those that keep its output
inside a JSON schema, any JSON object, or a Lark grammar.

A `Constraint` is text (the schema or the grammar), never a compiled object: it is what travels
in `SamplingParams` and across the runner contract, and each process compiles it against its own
tokenizer. `Grammars` (one per generator) turns a constraint into a `Matcher` (one per sequence)
and masks the logits of a step's constrained rows; rows without a constraint are never touched.
The generator advances each matcher by the token it sampled; a matcher whose grammar can take no
more tokens is done, and its sequence finishes ("stop").

Built on llguidance (Rust; a lexer plus an Earley parser over the token trie, no per-schema
precomputation). Measured on the bundled model's 49,152-token vocabulary on the 2-core machine,
five schemas (nested objects, enums, arrays, bounded numbers, required fields):

    library               compile a schema   mask of one token (median / mean)   30 schema features
    llguidance 1.9        0.5-1 ms           11 / 32 us                          29 (uniqueItems refused by name)
    xgrammar 0.2.9        1-11 ms            1.3 / 3.6 us                        27 (uniqueItems ignored; valid
                                                                                 patternProperties rejected)
    outlines-core 0.2.14  27 ms-5.6 s        1.4 / 18 us                         22 (numeric bounds, multipleOf,
                                                                                 uniqueItems ignored)

Every mask costs microseconds against a decode step of 8-30 ms, so coverage and
compile time decide: llguidance enforces the most of JSON Schema, names what it cannot, and
compiles a schema per request in about a millisecond (outlines-core needs 5.6 s for "any JSON
object"). It is one wheel with no dependencies; xgrammar would bring triton and transformers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

import llguidance
import numpy as np
import torch
from numba import njit

from shoal.engine.tokenizer import Tokenizer

log = logging.getLogger("shoal.grammar")

Kind = Literal["json_object", "json_schema", "lark"]

# JSON as json.dumps writes it and no other whitespace: a small model left free to put whitespace
# between tokens can spend all of max_tokens on newlines.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = json.dumps({"type": "object"})


class InvalidConstraint(ValueError):
    """A schema or grammar that cannot constrain decoding, with the library's reason."""


@dataclass(frozen=True)
class Constraint:
    """What a sequence's output must match."""

    kind: Kind
    text: str = ""  # the JSON schema (json_schema) or the Lark grammar (lark); unused for json_object
    # A schema keyword the library cannot enforce (uniqueItems, ...) is an error; if False, it is ignored.
    strict: bool = True

    @classmethod
    def json_schema(cls, schema: dict[str, Any], strict: bool = True) -> Constraint:
        return cls("json_schema", json.dumps(schema), strict)

    def grammar(self) -> str:
        """llguidance's grammar for this constraint, checked; `InvalidConstraint` says why not."""
        try:
            if self.kind == "json_object":
                g = llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, overrides=_JSON_OPTIONS)
            elif self.kind == "json_schema":
                g = llguidance.LLMatcher.grammar_from_json_schema(self.text, overrides={**_JSON_OPTIONS, "lenient": not self.strict})
            elif self.kind == "lark":
                g = llguidance.LLMatcher.grammar_from_lark(self.text)
            else:
                raise InvalidConstraint(f"unknown constraint kind {self.kind!r}")
        except ValueError as e:  # not JSON, or not an object
            raise InvalidConstraint(str(e) or type(e).__name__) from None
        problem = llguidance.LLMatcher.validate_grammar(g, None)
        if problem:
            raise InvalidConstraint(problem.strip())
        return g


def check(constraint: Constraint) -> None:
    """Raise `InvalidConstraint` if the constraint is not usable (no tokenizer needed; ~0.1 ms)."""
    constraint.grammar()


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, inner: llguidance.LLMatcher):
        self.inner = inner

    def advance(self, token: int) -> None:
        if not self.inner.consume_token(token):
            # Only a token that bypassed the mask gets here; the matcher now reports done.
            log.warning("a constrained sequence took token %d outside its grammar: %s", token,
                        self.inner.get_error().partition("\n")[0][:200])

    @property
    def done(self) -> bool:
        """The grammar is complete and admits no further token (or the matcher failed)."""
        return self.inner.is_stopped()


class Grammars:
    """One tokenizer's matchers, and the masking of a step's constrained rows."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._lltok: llguidance.LLTokenizer | None = None  # built on first use: ~0.2 s for a 49k vocabulary
        self._eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else 0
        self._words = (tokenizer.vocab_size + 31) // 32
        self._bitmask = np.zeros((0, self._words), dtype=np.int32)

    def matcher(self, constraint: Constraint) -> Matcher:
        if self._lltok is None:
            t = self.tokenizer
            self._lltok = llguidance.LLTokenizer(t.backend.to_str(), n_vocab=t.vocab_size, eos_token=sorted(t.eos_token_ids) or None)
        m = llguidance.LLMatcher(self._lltok, constraint.grammar(), log_level=0)
        if m.is_error():
            raise InvalidConstraint(m.get_error().strip())
        return Matcher(m)

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, Matcher]]) -> torch.Tensor:
        """Every token its grammar does not allow next set to -inf in each (row, matcher)'s row of
        logits (B, vocab) float32, in place where the tensor allows it; returns the masked logits."""
        n = len(rows)
        if self._bitmask.shape[0] < n:
            self._bitmask = np.zeros((n, self._words), dtype=np.int32)
        bits = self._bitmask[:n]
        # One row after another on this thread: llguidance's thread pool (LLExecutor) measured slower
        # here, its threads waking on cores that the model's threads still hold.
        for k, (_, m) in enumerate(rows):
            m.inner.unsafe_compute_mask_ptr(bits[k].ctypes.data, self._words * 4)
            if m.inner.is_error():  # nothing can follow: let it end rather than sample from nothing
                bits[k] = 0
                bits.view(np.uint32)[k, self._eos >> 5] = 1 << (self._eos & 31)
        if logits.dtype != torch.float32 or not logits.is_contiguous() or not logits.numpy().flags.writeable:
            logits = logits.float().contiguous().clone()
        _apply_bitmask(logits.numpy(), np.array([r for r, _ in rows], dtype=np.int64), bits)
        return logits


@njit(cache=True)
def _apply_bitmask(logits, rows, bits):
    # bits[k]: bit j of word w allows token 32·w + j in row rows[k]; tokens past the bitmask
    # (a head wider than the tokenizer's vocabulary) are never allowed.
    V = logits.shape[1]
    W = bits.shape[1]
    for k in range(rows.shape[0]):
        r = rows[k]
        for w in range(W):
            word = bits[k, w]
            if word == -1:
                continue
            base = w * 32
            if word == 0:  # the common case: a grammar allows few tokens
                logits[r, base : min(base + 32, V)] = -np.inf
                continue
            for b in range(32):
                j = base + b
                if j >= V:
                    break
                if (word >> b) & 1 == 0:
                    logits[r, j] = -np.inf
        for j in range(W * 32, V):
            logits[r, j] = -np.inf


__all__ = ["Constraint", "Grammars", "InvalidConstraint", "Matcher", "check"]
