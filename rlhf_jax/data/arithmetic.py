"""The offline verifiable-reward task: multi-digit addition with a character-level tokenizer.

A prompt is "a+b=" (each operand 1..`digits` digits), the answer the decimal sum, then EOS. Demos
for SFT are made noisy on purpose (a fraction `noise` of the answers has its last digit one too
high, a consistent annotator error), so that the SFT model's held-out pass@1 starts low and RL on
the exact-match reward has room to raise it.

The reward is a JAX function of token ids (`exact_match_reward`): it parses the operands from the
left-padded prompt, computes the sum and compares the completion with the sum's digits followed
by EOS, so rollout, reward and update compile into one program with no host round trip.

Token ids: 0 pad, 1 EOS, 2..11 the digits 0..9, 12 "+", 13 "=" (`VOCAB_SIZE` 14).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Shaped

PAD, EOS, PLUS, EQUALS = 0, 1, 12, 13
DIGIT0 = 2
VOCAB_SIZE = 14
CHARS = {**{str(d): DIGIT0 + d for d in range(10)}, "+": PLUS, "=": EQUALS}


class CharTokenizer:
    """Characters "0"-"9", "+", "=" to ids (module doc); `eos_id`, `pad_id`, `vocab_size` as the
    project's other tokenizers."""

    eos_id, pad_id, vocab_size = EOS, PAD, VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        try:
            return [CHARS[c] for c in text]
        except KeyError as e:
            raise ValueError(
                f"character {e.args[0]!r} is not in the arithmetic vocabulary"
            ) from None

    def decode(self, ids) -> str:
        inverse = {v: k for k, v in CHARS.items()}
        out = []
        for i in ids:
            if int(i) == EOS:
                break
            out.append(inverse.get(int(i), ""))
        return "".join(out)


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Problems "a+b=" with operands of 1..`digits` digits; a fraction `noise` of the SFT answers
    carries a consistent error (the last digit one too high), so that an SFT model that imitates
    its data prefers the wrong answer and RL on the exact-match reward has something to fix."""

    digits: int = 2
    noise: float = 0.6

    @property
    def prompt_length(self) -> int:
        return 2 * self.digits + 2

    @property
    def answer_length(self) -> int:
        """Digits of the largest sum plus EOS: the max_new_tokens that always suffices."""
        return self.digits + 2

    def problems(self, n: int, seed: int) -> np.ndarray:
        """[n, 2] operand pairs drawn with `seed` (split 0 = train, others held out: pass a
        different seed; pairs are drawn uniformly, so splits overlap only by chance)."""
        rs = np.random.default_rng(seed)
        return rs.integers(0, 10**self.digits, (n, 2))

    def prompts(self, problems: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LEFT-padded prompt ids and mask [n, prompt_length]."""
        tok = CharTokenizer()
        tokens = np.full((len(problems), self.prompt_length), PAD, np.int32)
        mask = np.zeros_like(tokens)
        for i, (a, b) in enumerate(problems):
            ids = tok.encode(f"{a}+{b}=")
            tokens[i, -len(ids) :], mask[i, -len(ids) :] = ids, 1
        return tokens, mask

    def demonstrations(self, problems: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """SFT batch {tokens, attention_mask, loss_mask} [n, prompt + answer], right-padded:
        "a+b=" then the answer (its last digit + 1 mod 10 with probability `noise`) and EOS; the
        loss is on the answer and EOS."""
        rs = np.random.default_rng(seed)
        tok = CharTokenizer()
        width = self.prompt_length + self.answer_length
        out = {k: np.zeros((len(problems), width), np.int32) for k in ("tokens", "attention_mask")}
        out["loss_mask"] = np.zeros((len(problems), width), np.int32)
        for i, (a, b) in enumerate(problems):
            answer = list(str(a + b))
            if rs.random() < self.noise:  # a consistent annotator error: last digit off by one
                answer[-1] = str((int(answer[-1]) + 1) % 10)
            prompt = tok.encode(f"{a}+{b}=")
            ids = prompt + tok.encode("".join(answer)) + [EOS]
            out["tokens"][i, : len(ids)] = ids
            out["attention_mask"][i, : len(ids)] = 1
            out["loss_mask"][i, len(prompt) : len(ids)] = 1
        return out


def _operands(prompt_tokens: Int[Array, "B P"]) -> tuple[Int[Array, " B"], Int[Array, " B"]]:
    """(a, b) parsed from prompts "a+b=" (pads anywhere are skipped)."""

    def read(carry, tok):
        a, b, phase = carry
        digit = (tok >= DIGIT0) & (tok < DIGIT0 + 10)
        value = tok - DIGIT0
        a = jnp.where(digit & (phase == 0), a * 10 + value, a)
        b = jnp.where(digit & (phase == 1), b * 10 + value, b)
        phase = phase + (tok == PLUS) + (tok == EQUALS)
        return (a, b, phase), None

    zeros = jnp.zeros(prompt_tokens.shape[0], jnp.int32)
    (a, b, _), _ = jax.lax.scan(read, (zeros, zeros, zeros), prompt_tokens.T)
    return a, b


def answer_tokens(total: Int[ArrayLike, " B"], length: int) -> Int[Array, "B N"]:
    """The ids of each number's decimal digits, then EOS, then PAD, [B, length]."""
    total = jnp.asarray(total, jnp.int32)
    n_digits = jnp.maximum(
        1, jnp.floor(jnp.log10(jnp.maximum(total, 1) + 0.5)).astype(jnp.int32) + 1
    )
    pos = jnp.arange(length)[None, :]  # [1, N]
    power = jnp.maximum(n_digits[:, None] - 1 - pos, 0)  # [B, N] 10^power is the digit's place
    digit = (total[:, None] // (10**power)) % 10
    return jnp.where(
        pos < n_digits[:, None], DIGIT0 + digit, jnp.where(pos == n_digits[:, None], EOS, PAD)
    ).astype(jnp.int32)


def exact_match_reward(
    prompt_tokens: Int[ArrayLike, "B P"],
    prompt_mask: Shaped[ArrayLike, "B P"],
    response_tokens: Int[ArrayLike, "B N"],
    response_mask: Shaped[ArrayLike, "B N"],
) -> Float[Array, " B"]:
    """1.0 where the completion is exactly the sum's digits followed by EOS, else 0.0 (a JAX
    function of token ids: the reward contract of `train.make_critic_free_step`)."""
    prompt = jnp.where(jnp.asarray(prompt_mask) > 0, jnp.asarray(prompt_tokens), PAD)
    a, b = _operands(prompt)
    response = jnp.where(jnp.asarray(response_mask) > 0, jnp.asarray(response_tokens), PAD)
    want = answer_tokens(a + b, response.shape[1])
    fits = jnp.any(want == EOS, axis=1)  # a completion cut before the sum's EOS never matches
    return (jnp.all(response == want, axis=1) & fits).astype(jnp.float32)
