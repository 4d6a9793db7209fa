"""Seeded generator of short movie-review-like texts: the corpus behind the offline IMDb stand-in.

Each review draws a latent sentiment ``z ~ U[-1, 1]``. Every evaluative sentence gets its own
sentiment ``s = clip(z + noise)`` and realises it with words taken, with their valences, from the
VADER lexicon (the ground-truth reward of `rlhf_jax.data.synthetic`): a target valence
``2.6 s (0.3 + 0.7 |s|)`` picks a valence bucket (linear interpolation between the two nearest
bucket centres) and then a word in it. Negations ("not bad", "never boring"), VADER boosters and
dampeners ("very", "slightly"), contrast sentences ("the acting was great, but the plot was
dull"), neutral filler and VADER-blind ratings ("seven out of ten") keep the map from ``z`` to the
reward monotone but noisy.

Only `random.Random` with integer seeds and exact arithmetic (+, -, *, /, comparisons) are used when
sampling, so a seed gives the same corpus on every machine, Python build and ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import functools
import importlib.resources
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Vocabulary: curated candidates, filtered by membership in VADER's lexicon and bucketed by valence.

# VADER's degree adverbs (its BOOSTER_DICT); "very" etc. add 0.293 to |valence|, dampeners subtract.
BOOSTERS: tuple[str, ...] = ("very", "really", "extremely", "absolutely", "incredibly", "so")
STRONG_BOOSTERS: tuple[str, ...] = ("utterly", "thoroughly", "totally", "completely")
DAMPENERS: tuple[str, ...] = ("somewhat", "slightly", "a little", "kind of", "barely")
# VADER-neutral hedges (not in the lexicon): change the wording, not the score.
HEDGES: tuple[str, ...] = ("rather", "fairly", "mostly", "a bit")

_ADJECTIVES = (
    "good great excellent amazing wonderful brilliant fantastic superb outstanding beautiful "
    "lovely enjoyable fun funny charming delightful perfect impressive inspiring powerful clever "
    "smart fresh engaging entertaining exciting thrilling stunning gorgeous solid fine nice "
    "pleasant okay "
    "sweet warm heartfelt hilarious magnificent marvelous terrific awesome remarkable strong "
    "creative original intelligent elegant compelling fascinating interesting satisfying adorable "
    "glorious splendid lively rich bad terrible awful horrible dreadful boring dull weak poor lame "
    "stupid dumb annoying messy confusing disappointing painful ugly pathetic ridiculous mediocre "
    "awkward tired horrendous dismal miserable disastrous dreary depressing offensive worthless "
    "useless crappy irritating frustrating idiotic lousy strange odd"
).split()
# Adjectives that VADER scores 0 (checked against the lexicon at import).
_NEUTRAL_ADJECTIVES = (
    "long short quiet simple typical familiar conventional ordinary standard loud dark unusual "
    "different modest predictable slow average uneven straightforward"
).split()
# (past, base) verb forms for "I loved the plot." / "I did not enjoy the plot."
_VERBS = (
    ("loved", "love"),
    ("liked", "like"),
    ("enjoyed", "enjoy"),
    ("adored", "adore"),
    ("admired", "admire"),
    ("appreciated", "appreciate"),
    ("hated", "hate"),
    ("disliked", "dislike"),
    ("despised", "despise"),
    ("loathed", "loathe"),
    ("noticed", "notice"),
    ("remembered", "remember"),
)
# "The ending {surprised} me."
_REACTIONS = (
    "bored impressed annoyed disappointed amazed delighted thrilled irritated charmed entertained "
    "frustrated confused surprised pleased puzzled shocked stunned"
).split()
# "It was a {masterpiece}."; (phrase, word carrying the valence)
_NOUNS = (
    ("masterpiece", "masterpiece"),
    ("joy", "joy"),
    ("delight", "delight"),
    ("success", "success"),
    ("winner", "winner"),
    ("pleasure", "pleasure"),
    ("triumph", "triumph"),
    ("treat", "treat"),
    ("treasure", "treasure"),
    ("disaster", "disaster"),
    ("catastrophe", "catastrophe"),
    ("fiasco", "fiasco"),
    ("failure", "failure"),
    ("waste of time", "waste"),
    ("mess", "mess"),
    ("flop", "flop"),
    ("bore", "bore"),
    ("dud", "dud"),
)
_NEUTRAL_NOUNS = ("drama", "remake", "sequel", "western", "period piece", "crime story")
# "The script was {cleverly} written."
_ADVERBS = (
    "perfectly brilliantly wonderfully beautifully cleverly nicely elegantly neatly carefully "
    "badly terribly horribly"
).split()
_NEUTRAL_ADVERBS = ("simply", "quickly", "loosely", "tightly", "smoothly")

# Aspect nouns (name, plural) and the participles that fit them for "was {adverb} {participle}".
_ASPECTS: tuple[tuple[str, bool], ...] = (
    ("plot", False),
    ("acting", False),
    ("script", False),
    ("soundtrack", False),
    ("ending", False),
    ("director", False),
    ("cast", False),
    ("dialogue", False),
    ("cinematography", False),
    ("pacing", False),
    ("story", False),
    ("score", False),
    ("music", False),
    ("editing", False),
    ("twist", False),
    ("premise", False),
    ("screenplay", False),
    ("lead", False),
    ("opening", False),
    ("finale", False),
    ("camera work", False),
    ("characters", True),
    ("performances", True),
    ("visuals", True),
    ("effects", True),
    ("costumes", True),
    ("actors", True),
    ("scenes", True),
)
_PARTICIPLES = {
    "plot": "written",
    "script": "written",
    "dialogue": "written",
    "story": "told",
    "screenplay": "written",
    "ending": "handled",
    "twist": "handled",
    "premise": "handled",
    "characters": "written",
    "cinematography": "done",
    "editing": "done",
    "score": "composed",
    "soundtrack": "chosen",
    "costumes": "made",
    "scenes": "shot",
    "visuals": "done",
    "effects": "done",
    "performances": "played",
}
_FILMS = ("film", "movie", "picture", "sequel", "drama", "western", "musical", "documentary")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Closers carrying sentiment: (text, sign of the sentiment it expresses).
_RECOMMENDATIONS = (
    ("I would recommend it.", 1),
    ("I would highly recommend it.", 1),
    ("I would really recommend it.", 1),
    ("Highly recommended.", 1),
    ("Worth a look.", 1),
    ("I would not recommend it.", -1),
    ("I can not recommend it.", -1),
    ("Avoid it.", -1),
    ("Skip it.", -1),
    ("Not worth it.", -1),
    ("Make up your own mind.", 0),
    ("See it if you are in the mood.", 0),
)
# Sentences with no VADER valence (tests check that each one scores 0).
NEUTRAL_SENTENCES: tuple[str, ...] = (
    "I saw it last week.",
    "I watched it at home.",
    "I saw it with my sister.",
    "I watched it on a Sunday.",
    "It runs about two hours.",
    "The story is set in a small town.",
    "It is based on an old book.",
    "It is the second part of a series.",
    "I went in knowing very little.",
    "My parents took me to see it.",
    "It came out last year.",
    "The cast is mostly new faces.",
)

N_BUCKETS = 7  # valence bucket centres -3, -2, ..., 3 (VADER lexicon units)


@functools.cache
def vader_lexicon() -> dict[str, float]:
    """Word -> mean valence, read from the `vader_lexicon.txt` shipped by `vaderSentiment`."""
    text = (
        importlib.resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text("utf-8")
    )
    lexicon = {}
    for line in text.splitlines():
        fields = line.strip().split("\t")
        if len(fields) >= 2:
            lexicon[fields[0]] = float(fields[1])
    return lexicon


def _bucket_of(valence: float) -> int:
    """Index 0..6 of the valence bucket centred at -3..3 (edges at half-integers)."""
    return min(N_BUCKETS - 1, max(0, int(valence + 3.5)))


@dataclass(frozen=True)
class WordClass:
    """Words (or phrases) of one part of speech, bucketed by the VADER valence of `key(word)`."""

    buckets: tuple[tuple[str, ...], ...]  # [N_BUCKETS], each in candidate order
    valence: dict[str, float]

    def sample(self, rng: random.Random, target: float) -> str:
        """A word whose valence is near `target` (linear interpolation between two buckets)."""
        x = min(max(target, -3.0), 3.0) + 3.0
        lo = min(int(x), N_BUCKETS - 2)
        k = lo + 1 if rng.random() < x - lo else lo
        if not self.buckets[k]:  # nearest non-empty bucket, ties towards the neutral bucket
            order = sorted(range(N_BUCKETS), key=lambda j: (abs(j - k), abs(j - 3)))
            k = next(j for j in order if self.buckets[j])
        return rng.choice(self.buckets[k])


def _word_class(
    candidates: Sequence[str], neutral: Sequence[str] = (), key: Callable[[str], str] = str
) -> WordClass:
    """Keep candidates in VADER's lexicon and neutral ones absent from it; bucket by valence."""
    lexicon = vader_lexicon()
    buckets: list[list[str]] = [[] for _ in range(N_BUCKETS)]
    valence = {}
    for word in candidates:
        if key(word) in lexicon and word not in valence:
            valence[word] = lexicon[key(word)]
            buckets[_bucket_of(valence[word])].append(word)
    for word in neutral:
        if all(w not in lexicon for w in key(word).split()) and word not in valence:
            valence[word] = 0.0
            buckets[3].append(word)
    return WordClass(tuple(tuple(b) for b in buckets), valence)


@functools.cache
def vocabulary() -> dict[str, WordClass]:
    """The sentiment-carrying word classes used by the generator."""
    nouns = dict(_NOUNS)
    return {
        "adjective": _word_class(_ADJECTIVES, _NEUTRAL_ADJECTIVES),
        "verb_past": _word_class([p for p, _ in _VERBS], [p for p, _ in _VERBS]),
        "verb_base": _word_class([b for _, b in _VERBS], [b for _, b in _VERBS]),
        "reaction": _word_class(_REACTIONS),
        "noun": _word_class([p for p, _ in _NOUNS], _NEUTRAL_NOUNS, key=lambda p: nouns.get(p, p)),
        "adverb": _word_class(_ADVERBS, _NEUTRAL_ADVERBS),
    }


@functools.cache
def _aspects() -> tuple[tuple[str, bool], ...]:
    lexicon = vader_lexicon()
    return tuple(a for a in _ASPECTS if all(w not in lexicon for w in a[0].split()))


# ---------------------------------------------------------------------------------------------
# Sentences. `s` is a sentence-level sentiment in [-1, 1]; VADER valences live in about [-3.4, 3.4].

VALENCE_SCALE = 2.6  # |target valence| of a sentence with |s| = 1
VALENCE_CURVE = 0.3  # target valence = VALENCE_SCALE * s * (VALENCE_CURVE + (1 - CURVE) |s|)
NEGATION_SCALAR = 0.74  # VADER multiplies a negated valence by -0.74
FILLER_BASE, FILLER_SLOPE = 0.05, 0.35  # P(neutral sentence) = BASE + SLOPE (1 - |z|)


@dataclass
class _Context:
    rng: random.Random
    past: bool
    film: str
    aspects: list[tuple[str, bool]]  # not yet used in this review, in sampled order
    fillers: list[str]  # neutral sentences not yet used in this review, in sampled order

    def be(self, plural: bool) -> str:
        return ("were" if plural else "was") if self.past else ("are" if plural else "is")

    def aspect(self) -> tuple[str, bool]:
        return self.aspects.pop() if self.aspects else self.rng.choice(_aspects())


def _valence(s: float) -> float:
    """Target VADER valence of a word expressing sentence sentiment `s` (mild stays mild)."""
    return VALENCE_SCALE * s * (VALENCE_CURVE + (1.0 - VALENCE_CURVE) * abs(s))


def _clip(x: float, lo: float = -1.0, hi: float = 1.0) -> float:
    return min(max(x, lo), hi)


def _noise(rng: random.Random, width: float) -> float:
    """Triangular noise on [-width, width] (sum of two uniforms: exact arithmetic only)."""
    return width * (rng.random() + rng.random() - 1.0)


def _predicate(ctx: _Context, s: float, negation: bool = True) -> str:
    """An adjectival predicate ("very good", "not bad", "slightly dull") expressing `s`."""
    rng, vocab = ctx.rng, vocabulary()["adjective"]
    a = abs(s)
    if negation and a > 0.15 and rng.random() < 0.2:  # negate a word of the opposite polarity
        r = rng.random()
        if r < 0.1:  # "hardly" is a VADER dampener, not a negation: a VADER-blind negation
            return "hardly " + vocab.sample(rng, -_valence(s))
        word = vocab.sample(rng, -_valence(s) / NEGATION_SCALAR)
        if r < 0.55:
            return "not " + word
        if r < 0.75:
            return "never " + word
        if r < 0.9:
            return "not very " + word
        return "not at all " + word
    target = _valence(s)
    r = rng.random()
    if r < 0.55 * a * a:
        modifier = rng.choice(STRONG_BOOSTERS if a > 0.85 and r < 0.15 else BOOSTERS) + " "
        target -= 0.3 * (1 if s > 0 else -1)  # the booster carries part of the intensity
    elif r < 0.55 * a * a + 0.25 * (1.0 - a):
        modifier = rng.choice(DAMPENERS if a > 0.2 else HEDGES) + " "
    elif r < 0.55 * a * a + 0.25 * (1.0 - a) + 0.05:
        modifier = rng.choice(HEDGES) + " "
    else:
        modifier = ""
    return modifier + vocab.sample(rng, target)


def _evaluation(ctx: _Context, s: float) -> str:
    """One clause (no final punctuation, lower-case start) that evaluates an aspect with `s`."""
    rng, vocab = ctx.rng, vocabulary()
    noun, plural = ctx.aspect()
    r = rng.random()
    if r < 0.5:
        return f"the {noun} {ctx.be(plural)} {_predicate(ctx, s)}"
    if r < 0.6:
        verb = rng.choice(("felt", "seemed"))
        return f"the {noun} {verb} {_predicate(ctx, s, negation=False)}"
    if r < 0.75:
        if s * s > 0.04 and rng.random() < 0.2:  # "I did not enjoy the plot"
            verb = vocab["verb_base"].sample(rng, -_valence(s) / NEGATION_SCALAR)
            return f"I did not {verb} the {noun}"
        booster = rng.choice(("really ", "absolutely ", "")) if s * s > 0.5 else ""
        return f"I {booster}{vocab['verb_past'].sample(rng, _valence(s))} the {noun}"
    if r < 0.88 and s * s > 0.04:  # (few reactions are neutral)
        verb = vocab["reaction"].sample(rng, _valence(s))
        if s * s > 0.6 and rng.random() < 0.5:
            verb = rng.choice(("really", "thoroughly")) + " " + verb
        return f"the {noun} {verb} me"
    if noun in _PARTICIPLES:
        adverb = vocab["adverb"].sample(rng, _valence(s))
        return f"the {noun} {ctx.be(plural)} {adverb} {_PARTICIPLES[noun]}"
    return f"the {noun} {ctx.be(plural)} {_predicate(ctx, s)}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _end(ctx: _Context, s: float) -> str:
    return "!" if s * s > 0.5 and ctx.rng.random() < 0.15 else "."


def _sentiment_sentence(ctx: _Context, s: float) -> str:
    """A sentence expressing `s` about the film as a whole or one of its aspects."""
    rng, vocab = ctx.rng, vocabulary()
    r = rng.random()
    if r < 0.55:
        return _cap(_evaluation(ctx, s)) + _end(ctx, s)
    if r < 0.7:
        return f"The {ctx.film} {ctx.be(False)} {_predicate(ctx, s)}{_end(ctx, s)}"
    if r < 0.82:
        adjective = vocab["adjective"].sample(rng, _valence(s))
        article = "an" if adjective[0] in "aeiou" else "a"
        if s * s > 0.3 and rng.random() < 0.3:
            return f"What {article} {adjective} {ctx.film}!"
        return f"It {ctx.be(False)} {article} {adjective} {ctx.film}."
    if r < 0.92:
        noun = vocab["noun"].sample(rng, _valence(s))
        if s * s > 0.5 and rng.random() < 0.4:
            noun = rng.choice(("total", "complete", "real")) + " " + noun
        return f"It {ctx.be(False)} a {noun}{_end(ctx, s)}"
    adjective = vocab["adjective"].sample(rng, _valence(s))
    return f"I found the {ctx.film} {adjective}."


def _contrast_sentence(ctx: _Context, s: float) -> str:
    """ "A was good, but B was bad": the clause after "but" carries `s` (VADER weighs it 1.5x)."""
    rng = ctx.rng
    other = -(0.3 + 0.7 * rng.random()) * (1 if s >= 0 else -1)
    if rng.random() < 0.2:  # "though": the main clause carries `s`, VADER weighs both equally
        return f"{_cap(_evaluation(ctx, s))}, though {_evaluation(ctx, 0.6 * other)}."
    return f"{_cap(_evaluation(ctx, other))}, but {_evaluation(ctx, s)}{_end(ctx, s)}"


def _closer(ctx: _Context, z: float) -> str:
    rng = ctx.rng
    if rng.random() < 0.45:  # a rating VADER cannot read: correlated with z, not with the reward
        number = _NUMBERS[min(max(int(5.5 + 4.5 * z + _noise(rng, 1.5) + 0.5), 1), 10) - 1]
        if rng.random() < 0.5:
            return f"{_cap(number)} out of ten."
        return f"I give it {number} out of ten."
    sign = 1 if z > 0.2 else (-1 if z < -0.2 else 0)
    return rng.choice([t for t, k in _RECOMMENDATIONS if k == sign])


def _filler(ctx: _Context) -> str:
    rng = ctx.rng
    r = rng.random()
    if r < 0.6 and ctx.fillers:
        return ctx.fillers.pop()
    noun, plural = ctx.aspect()
    if r < 0.85:
        adjective = vocabulary()["adjective"].sample(ctx.rng, 0.0)
        return f"The {noun} {ctx.be(plural)} {adjective}."
    return f"The {noun} reminded me of an old {ctx.film}."


def sample_review(rng: random.Random) -> tuple[str, float]:
    """One review and its latent sentiment z in [-1, 1] (drawn uniformly)."""
    z = 2.0 * rng.random() - 1.0
    aspects, fillers = list(_aspects()), list(NEUTRAL_SENTENCES)
    rng.shuffle(aspects)
    rng.shuffle(fillers)
    ctx = _Context(rng, rng.random() < 0.7, rng.choice(_FILMS), aspects, fillers)
    r = rng.random()
    n_sentences = 4 if r < 0.35 else (5 if r < 0.8 else 6)
    contrast_at = rng.randrange(n_sentences) if rng.random() < 0.3 else -1
    p_filler = FILLER_BASE + FILLER_SLOPE * (1.0 - abs(z))  # mild reviews say less
    sentences = []
    for i in range(n_sentences):
        s = _clip(z + _noise(rng, 0.35))
        if i == contrast_at:
            sentences.append(_contrast_sentence(ctx, s))
        elif i > 0 and rng.random() < p_filler:
            sentences.append(_filler(ctx))
        else:
            sentences.append(_sentiment_sentence(ctx, s))
    if rng.random() < 0.3:
        sentences.append(_closer(ctx, z))
    return " ".join(sentences), z


def generate_reviews(seed: int, n: int) -> tuple[list[str], list[float]]:
    """`n` reviews and their latent sentiments from `random.Random(seed)` (stream order)."""
    rng = random.Random(seed)
    texts, latents = [], []
    for _ in range(n):
        text, z = sample_review(rng)
        texts.append(text)
        latents.append(z)
    return texts, latents


def generate_corpus(seed: int, n: int) -> list[str]:
    """`n` short movie reviews, the same for a given seed on every machine.

    The first `n` reviews of the stream are the same for every larger `n` (a prefix property).

    Args:
        seed: integer seed of `random.Random`.
        n: number of reviews.

    Returns:
        list of `n` single-line texts of 3-6 short sentences (about 15-60 BPE tokens).
    """
    return generate_reviews(seed, n)[0]
