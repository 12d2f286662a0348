"""Hard negatives for every kept pair (decide phase): one-edit captions here; the CLIP-space
neighbours come from the exact search inside each group (`transforms/neighbours.py`), wired by
`pipeline/decide.py`.

Neighbour negatives. For each kept sample, the `negatives_k` nearest *other* kept samples by image
embedding (kind "image") and by caption embedding (kind "text"), each with the neighbour's uid,
caption and cosine. A neighbour is skipped when it is the sample itself, when its cosine is above
`negatives_ceiling`, when its pHash (or mirrored pHash) is within `dedup_radius` bits, or when its
normalised caption equals the anchor's: all of these are more likely true positives than negatives.

Caption negatives (`caption_negatives`). Rule-based, offline, deterministic edits that change
exactly one thing, using the word lists in `transforms/data/negatives_lexicon.json`:
  swap       two objects ("a dog on a sofa" -> "a sofa on a dog") or two attributes
             ("a red circle on a blue background" -> "a blue circle on a red background"),
  attribute  one attribute replaced by another of its category ("red car" -> "blue car"),
  object     one object noun replaced by another of its category ("red car" -> "red truck").
Choices among several candidates are made by a stable hash of the caption (never Python's salted
`hash`), so every worker and every run produces the same negatives.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Optional

import numpy as np

from schemas import Col

METRICS_NAMESPACE = "negatives"
LEXICON_PATH = Path(__file__).resolve().parent / "data" / "negatives_lexicon.json"
NEIGHBOUR_KINDS = ("image", "text")
CAPTION_KINDS = ("swap", "attribute", "object")
MAX_CAPTION_TOKENS = 256  # edits are made in the first tokens only: hostile captions stay cheap

# ------------------------------------------------------------------------------------------------
# caption negatives (pure)
# ------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)?")
# tokens after which an ambiguous word ("glass") is an object, not a modifier
_FUNCTION_WORDS = frozenset(
    "a an the and or but of on in at to with by from for under over near behind beside next is are was "
    "were be it its this that these those there here as into onto".split()
)


def _stable_int(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode("utf-8", "replace")).digest()[:8], "big")


def _pluralise(word: str, irregular: dict) -> str:
    if word in irregular:
        return irregular[word]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return word + "es"
    if re.search(r"[^aeiou]y$", word):
        return word[:-1] + "ies"
    return word + "s"


class _Lexicon:
    def __init__(self, data: dict):
        irregular = dict(data.get("irregular_plurals", {}))
        self.attribute_category = {w: c for c, words in data["attributes"].items() for w in words}
        self.object_category = {w: c for c, words in data["objects"].items() for w in words}
        self.attributes = {c: list(words) for c, words in data["attributes"].items()}
        self.objects = {c: list(words) for c, words in data["objects"].items()}
        self.plural = {w: _pluralise(w, irregular) for w in self.object_category}
        self.singular = {p: w for w, p in self.plural.items() if p != w and p not in self.object_category}
        self.synonyms: dict[str, frozenset] = {}
        for group in data.get("synonyms", []):
            for word in group:
                self.synonyms[word] = frozenset(group)
        # where each word sits in its category's list: a replacement is picked without building
        # the list of the allowed ones (`_nth_allowed`)
        self.positions = {
            role: {c: _positions(words) for c, words in table.items()}
            for role, table in (("attribute", self.attributes), ("object", self.objects))
        }
        # lowercased word -> (attribute category or None, (singular, object category) or None):
        # one lookup per token, and most tokens of a caption are in no list
        self.tags: dict[str, tuple] = {}
        for word in set(self.attribute_category) | set(self.object_category) | set(self.singular):
            singular = self.singular.get(word, word)
            is_object = word in self.object_category or word in self.singular
            self.tags[word] = (self.attribute_category.get(word),
                               (singular, self.object_category[singular]) if is_object else None)

    def same_meaning(self, a: str, b: str) -> bool:
        return a == b or b in self.synonyms.get(a, ())


def _positions(words: list) -> dict:
    found: dict[str, list] = {}
    for index, word in enumerate(words):
        found.setdefault(word, []).append(index)
    return found


def _nth_allowed(words: list, positions: dict, excluded: set, n: int) -> str:
    """The n-th word of `words` that is not in `excluded` (n < the number of such words)."""
    for hole in sorted(i for word in excluded for i in positions.get(word, ())):
        if hole <= n:
            n += 1
        else:
            break
    return words[n]


@functools.lru_cache(maxsize=1)
def lexicon() -> _Lexicon:
    with open(LEXICON_PATH, encoding="utf-8") as handle:
        return _Lexicon(json.load(handle))


class _Slot:
    """One editable word of a caption: where it is and what the lexicon says it is."""

    __slots__ = ("index", "start", "end", "text", "word", "role", "category", "plural")

    def __init__(self, index, start, end, text, word, role, category, plural=False):
        self.index, self.start, self.end, self.text = index, start, end, text
        self.word, self.role, self.category, self.plural = word, role, category, plural


def _tag(caption: str, lex: _Lexicon) -> tuple[list, list[_Slot]]:
    tokens = [(m.start(), m.end(), m.group()) for m in itertools.islice(_WORD.finditer(caption), MAX_CAPTION_TOKENS)]
    slots = []
    tags = lex.tags
    for i, (start, end, text) in enumerate(tokens):
        lower = text.lower()
        tagged = tags.get(lower)
        if tagged is None:
            continue
        category, as_object = tagged
        if category is not None and as_object is not None:
            # adjacent with no punctuation between them: "glass vase" is a modifier, "glass, vase" is not
            following = tokens[i + 1][2].lower() if i + 1 < len(tokens) else ""
            modifies = bool(following) and following not in _FUNCTION_WORDS and not caption[end:tokens[i + 1][0]].strip()
            if not modifies:
                category = None
        if category is not None:
            slots.append(_Slot(i, start, end, text, lower, "attribute", category))
        else:
            singular, object_category = as_object
            slots.append(_Slot(i, start, end, text, singular, "object", object_category, lower != singular))
    return tokens, slots


def _match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _article_for(word: str) -> str:
    lower = word.lower()
    if lower.startswith(("uni", "use", "usu", "one", "eu")):
        return "a"
    if lower.startswith(("hour", "honest", "heir")):
        return "an"
    return "an" if lower[:1] in "aeiou" else "a"


def _render(caption: str, tokens: list, edits: dict[int, str]) -> str:
    """Apply {token index: new word}, then fix "a"/"an" before each edited word."""
    replaced = dict(edits)
    for i, word in edits.items():
        if i > 0 and i - 1 not in replaced:
            _, end, text = tokens[i - 1]
            if len(text) <= 2 and text.lower() in ("a", "an") and not caption[end:tokens[i][0]].strip():
                replaced[i - 1] = _match_case(text, _article_for(word))
    pieces, cursor = [], 0
    for i in sorted(replaced):
        start, end, _ = tokens[i]
        pieces.append(caption[cursor:start])
        pieces.append(replaced[i])
        cursor = end
    pieces.append(caption[cursor:])
    return "".join(pieces)


def _surface(slot: _Slot, word: str, lex: _Lexicon) -> str:
    """`word` as it would read in `slot`: the slot's number (objects) and capitalisation."""
    if slot.role == "object" and slot.plural:
        word = lex.plural[word]
    return _match_case(slot.text, word)


def _swap_objects(caption, tokens, slots, lex) -> Optional[str]:
    objects = [s for s in slots if s.role == "object"]
    for i, a in enumerate(objects):
        for b in objects[i + 1:]:
            if not lex.same_meaning(a.word, b.word):
                return _render(caption, tokens, {a.index: _surface(a, b.word, lex), b.index: _surface(b, a.word, lex)})
    return None


def _swap_attributes(caption, tokens, slots, lex) -> Optional[str]:
    attributes = [s for s in slots if s.role == "attribute"]
    pairs = [
        (a, b)
        for i, a in enumerate(attributes)
        for b in attributes[i + 1:]
        # adjacent attributes describe the same thing: "big red car" -> "red big car" changes nothing
        if not lex.same_meaning(a.word, b.word) and b.index - a.index > 1
    ]
    if not pairs:
        return None
    # the same category first ("red ... blue"), then across categories ("small dog on a red sofa")
    a, b = sorted(pairs, key=lambda p: (p[0].category != p[1].category, p[0].index, p[1].index))[0]
    return _render(caption, tokens, {a.index: _surface(a, b.word, lex), b.index: _surface(b, a.word, lex)})


def _replace_one(caption, tokens, slots, lex, role: str) -> Optional[str]:
    candidates = [s for s in slots if s.role == role]
    if not candidates:
        return None
    present = {s.word for s in slots}
    table = lex.attributes if role == "attribute" else lex.objects
    # rotate through the slots from a hash-chosen start: the first slot that has a replacement wins
    start = _stable_int(caption, role) % len(candidates)
    for offset in range(len(candidates)):
        slot = candidates[(start + offset) % len(candidates)]
        words, positions = table[slot.category], lex.positions[role][slot.category]
        # allowed: not in the caption, not the slot's word or one of its synonyms
        excluded = present | {slot.word} | lex.synonyms.get(slot.word, frozenset())
        allowed = len(words) - sum(len(positions.get(word, ())) for word in excluded)
        if allowed > 0:
            choice = _nth_allowed(words, positions, excluded, _stable_int(caption, role, slot.word) % allowed)
            return _render(caption, tokens, {slot.index: _surface(slot, choice, lex)})
    return None


def caption_negatives(caption: str) -> list[tuple[str, str]]:
    """(negative caption, kind) pairs, kinds among swap / attribute / object; [] when no rule applies.

    Each negative changes exactly one thing; deterministic; never the source caption.
    """
    if not isinstance(caption, str) or not caption.strip():
        return []
    lex = lexicon()
    tokens, slots = _tag(caption, lex)
    if not slots:
        return []
    proposals = [
        (_swap_objects(caption, tokens, slots, lex), "swap"),
        (_swap_attributes(caption, tokens, slots, lex), "swap"),
        (_replace_one(caption, tokens, slots, lex, "attribute"), "attribute"),
        (_replace_one(caption, tokens, slots, lex, "object"), "object"),
    ]
    seen = {caption}
    result = []
    for negative, kind in proposals:
        if negative is not None and negative not in seen:
            seen.add(negative)
            result.append((negative, kind))
    return result


# ------------------------------------------------------------------------------------------------
# the negative dicts (decide phase attaches them to the decisions)
# ------------------------------------------------------------------------------------------------


def negative_dict(uid: Optional[str], caption: str, score: Optional[float], kind: str) -> dict:
    return {
        Col.NEGATIVE_UID: uid,
        Col.NEGATIVE_CAPTION: caption,
        Col.NEGATIVE_SCORE: None if score is None else float(np.float32(score)),
        Col.NEGATIVE_KIND: kind,
    }
