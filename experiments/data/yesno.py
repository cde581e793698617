"""A yes/no reading task in BoolQ's shape, generated in code (offline, no files, deterministic from a seed), and the
word-level tokenizer of its vocabulary.

Each item is a short passage about animals and a yes/no question about it:

    passage   the owl is red . the trout lives near the lake . the bee lives near the barn . the fox is white .
    question  is there a fish          -> yes (the trout)
    question  is there a wolf          -> no  (no wolf in the passage)
    question  is there an insect       -> yes (the bee)

A passage has 3 to 7 sentences (`sentences`), each about one animal of four kinds (birds, mammals, fishes,
insects; six of each):
its colour or where it lives. Half the questions ask for one animal, half for a kind; half the answers are yes
(label 1), half no (label 0), and the asked animal or kind is chosen so that the answer needs the passage. Reading
it takes matching a question word against the passage (animals) or a word against a class of words (kinds), which a
small model learns from a few thousand items; no item can be answered from the question alone.

`word_tokenizer()` is the tokenizer `model=llama_tiny` reads (shipped as checkpoints/words_tokenizer, made by this
function): one token per word of VOCABULARY, `[PAD]`, `[UNK]` and `[SEP]` (the separator of BoolQ's template), in a
`transformers.PreTrainedTokenizerFast` built with the `tokenizers` library.
"""
from __future__ import annotations

import random
from typing import Any

from experiments.data.datasets import RawSplits
from experiments.data.text import Texts

KINDS: dict[str, tuple[str, ...]] = {
    "bird": ("owl", "duck", "swan", "crow", "hawk", "wren"),
    "mammal": ("fox", "bear", "wolf", "deer", "hare", "goat"),
    "fish": ("trout", "pike", "carp", "eel", "cod", "bass"),
    "insect": ("moth", "ant", "bee", "wasp", "gnat", "flea"),
}
COLOURS = ("red", "blue", "green", "black", "white", "brown")
PLACES = ("barn", "river", "forest", "field", "hill", "lake")
ANIMALS = tuple(a for animals in KINDS.values() for a in animals)
FUNCTION_WORDS = ("the", "is", "lives", "near", "there", "a", "an", ".")
VOCABULARY = tuple(sorted({*ANIMALS, *KINDS, *COLOURS, *PLACES, *FUNCTION_WORDS}))
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[SEP]")


def passage_and_question(rng: random.Random, sentences: tuple[int, int] = (3, 7)) -> tuple[str, str, int]:
    """One item: (passage of `sentences[0]` to `sentences[1]` sentences, question, label), label 1 for yes."""
    yes = rng.random() < 0.5
    n = rng.randint(*sentences)
    if rng.random() < 0.5:  # a question about one animal
        asked = rng.choice(ANIMALS)
        others = [a for a in ANIMALS if a != asked]
        animals = [rng.choice(others) for _ in range(n)]
        if yes:
            animals[rng.randrange(n)] = asked
    else:  # a question about a kind of animal
        asked = rng.choice(list(KINDS))
        others = [a for kind, members in KINDS.items() if kind != asked for a in members]
        animals = [rng.choice(others) for _ in range(n)]
        if yes:
            for i in rng.sample(range(n), rng.randint(1, 2)):
                animals[i] = rng.choice(KINDS[asked])
    sentences = [f"the {a} is {rng.choice(COLOURS)} ." if rng.random() < 0.5 else
                 f"the {a} lives near the {rng.choice(PLACES)} ." for a in animals]
    article = "an" if asked[0] in "aeiou" else "a"
    return " ".join(sentences), f"is there {article} {asked}", int(yes)


def yesno(train_size: int = 4000, test_size: int = 1000, seed: int = 0,
          sentences: tuple[int, int] | list[int] = (3, 7)) -> RawSplits:
    """`train_size` training and `test_size` test items (fields passage and question, label 1 = yes), drawn by one
    `random.Random(seed)`: the same items for every run with this seed. `sentences`: the fewest and most sentences
    of a passage (3 to 7: up to 56 words with the question; 12 to 16: 80 to 118, BoolQ's length at 128 tokens)."""
    low, high = (int(n) for n in sentences)
    if not 1 <= low <= high:
        raise ValueError(f"dataset.source.sentences={[low, high]}: must be [fewest, most] with 1 <= fewest <= most")
    rng = random.Random(seed)
    items = [passage_and_question(rng, (low, high)) for _ in range(train_size + test_size)]

    def split(part: list[tuple[str, str, int]]) -> Texts:
        return Texts([{"passage": p, "question": q} for p, q, _ in part], [label for _, _, label in part])

    return RawSplits(train=split(items[:train_size]), test=split(items[train_size:]))


def word_tokenizer() -> Any:
    """A `PreTrainedTokenizerFast` with one token per word of VOCABULARY (ids after SPECIAL_TOKENS, in sorted order),
    splitting on whitespace and punctuation, lower-casing, and mapping any other word to `[UNK]`; `[PAD]` pads (on
    the right) and `[SEP]` is kept whole."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *VOCABULARY))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", sep_token="[SEP]",
                                   padding_side="right", truncation_side="right")
