"""Part-of-speech tags and noun chunks of benchmark prompts, as T2I-CompBench reads them.

The official evaluators run spaCy's ``en_core_web_sm`` for four things: the noun chunks that
become BLIP-VQA questions, the first / last NOUN of a spatial prompt, the nouns around a spatial
phrase in a complex prompt, and the complex prompt without its ADJ tokens (CLIP). Two parsers
give the same interface (:class:`Parser`: ``tokens`` with coarse spaCy tags, ``noun_chunks``):

- :class:`SpacyParser` wraps spaCy with ``en_core_web_sm`` when both are installed (the official
  tool; :func:`load_parser` prefers it);
- :class:`RuleParser`, the fallback used where spaCy or its model cannot be installed (no model
  download here): a lexicon-and-suffix tagger for the benchmark's prompt grammar. Determiners,
  numbers, prepositions, conjunctions, pronouns and auxiliaries come from closed lists;
  adjectives from a lexicon of colours, shapes, sizes, textures and the descriptive words of the
  T2I-CompBench prompts, from the suffixes -ful / -ous / -less / -ic / -ish, and from -ed / -ing /
  -ly words placed before a noun; verbs from a lexicon (words that are also nouns, "rest",
  "light", only between a noun and a determiner or preposition), from -ed / -ing words after a
  noun or not followed by one, and from the word between a noun and the next determiner ("the
  metallic tongs *mix* the greens"); every other word is a noun. A chunk is determiners +
  modifiers + nouns, ending at its last noun; "black and white cat" and "long, narrow kitchen"
  stay one chunk; after an article, modifiers without a noun end in their head noun ("a red
  *orange*", "the rough *square*"). Pronouns are not chunks (spaCy's are).

The rule parser's chunks were checked by hand on the val prompts (spaCy itself could not be run
here): the short prompts ("a green bench and a blue bowl", "a dog in front of a desk", "three
cats and a dog") come out as expected; on the long complex prompts a word can be tagged
differently, which changes a BLIP question or a removed adjective, never the score rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

# --- closed word classes -------------------------------------------------------------------------

DETERMINERS = frozenset(
    "a an the this these those its his her their my our your each every some any another "
    "many several few both all no".split()
)
NUMBER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split()
)
PREPOSITIONS = frozenset(
    "on in at of to from by with for near under over above below beside besides behind between into onto "
    "through across against around inside outside beneath atop along among toward towards upon off up down "
    "out like without within amid via past throughout underneath next beyond during after before "
    "about than".split()
)
CONJUNCTIONS = frozenset("and or but nor while whereas as because if although though so yet".split())
PRONOUNS = frozenset(
    "it they them he him she i we us you me that which who whom what itself themselves himself herself "
    "one's".split()
)
AUXILIARIES = frozenset(
    "is are was were be been being am has have had do does did can could will would shall should may might "
    "must".split()
)
ADVERBS = frozenset(
    "also very too here there together nearby away not never always often just even only still then "
    "really quite almost again ever perhaps instead".split()
)

# --- open classes: lexicons ----------------------------------------------------------------------

ADJECTIVES = frozenset(
    # colours
    "red orange yellow green blue purple pink brown black white grey gray beige tan gold golden silver "
    "violet indigo teal turquoise maroon navy ivory crimson scarlet lavender magenta cyan bronze whitish "
    "reddish bluish greenish yellowish multicolored multicoloured colorful colourful dark bright pale dull "
    # shapes and sizes
    "round square rectangular triangular circular oval spherical cubic cylindrical conical pyramidal "
    "pentagonal hexagonal octagonal oblong angular curvy straight flat big small tall short long large "
    "tiny huge little wide narrow thick thin heavy giant massive mini miniature compact "
    # textures, surfaces and the other descriptive words of the prompts
    "metallic wooden fluffy plastic soft hard smooth rough shiny glossy matte fuzzy furry silky velvety "
    "bumpy spiky prickly slimy sticky crisp crispy crunchy juicy ripe sweet sour tart fragrant delicate "
    "sleek rugged translucent transparent opaque iridescent warm cool cold hot wet dry damp dusty rusty "
    "muddy murky jagged thorny lumpy sharp clean dirty old new ancient modern fresh cozy comfortable "
    "calm choppy reedy rocky rich busy quiet dim distant sturdy greasy icy slushy tender plain elegant "
    "graceful gentle pungent grand intricate vibrant brilliant natural early daily romantic peaceful serene "
    "luxurious treacherous bravest brave welcome aerodynamic geometric urban seasonal earthy lush healthful "
    "adventurous ceramic curious hardworking unique stylish chilly perfect savory gooey delectable "
    "pillowy eager ornate priceless timeless endless artistic abstract emotional dramatic bold dynamic "
    "plush human maternal sheer floral deep bulky spicy fiery therapeutic sugary stainless vintage "
    "empty matching same different favorite precious tasty useful necessary fashionable electronic "
    "celestial magic ready free open close closed clear shallow steep low high strong weak beautiful "
    "pretty ugly cute happy sad angry lonely lovely friendly young elderly fat slim dense sparse bare "
    "tech-savvy crystal-clear glassy lacy woolly wooly leafy grassy sandy snowy sunny rainy "
    "foggy stormy cloudy windy frosty misty shadowy hazy glowing gleaming sparkly bubbly curly wavy "
    "striped spotted checkered dotted stained tiled hardcover visible unlikely plump delicious".split()
)
# verb forms that are not nouns in these prompts (past tenses, third persons, base forms)
VERBS = frozenset(
    "sat sits lay lies lying stood hung hangs swam flew drove sped fell wrote shone shines ran grew rose spun "
    "woke blew strode slept sank held holds kept brought caught built met sent spent struck swept swung threw "
    "took tore wore won dug drew froze hid rode sang shook slid gave got went came saw ate drank made told lit "
    "features reads gathered led fed "
    # base forms that are not nouns in these prompts
    "sit lie hang hold swim grow tell wake blow bring catch build feel sing keep give get go come see eat "
    "drink take make provide provides attract attracts illuminate illuminates decorate decorates serve serves "
    "boil boils stir stirs bake bakes write writes jot jots".split()
)
# verb forms that are also nouns ("a pendant light", "the kitchen sink"): a verb only between a noun and
# a determiner, preposition or adverb ("the wallets rest on the shelf")
NOUN_OR_VERB = frozenset(
    "stand stands fly flies drive speed fall shine run runs cast spread burst sleep sink left leave wear draw "
    "ride rest rests mix measure slice release display flash lean float look play fill light perch nap cook "
    "beat pound shape".split()
)
# past tenses that are also nouns ("a cut", "the cast"): a verb between a noun and a determiner or
# preposition, whatever the subject's number ("the berry jam spread on the toast")
PAST_OR_NOUN = frozenset("cast cut hit spread burst split set put shut".split())
# words with an adjective or participle suffix that are nouns (a prenominal "dining table" stays a compound noun)
NOUN_EXCEPTIONS = frozenset(
    "dining swimming cutting measuring baking reading rocking watering magnifying vending living parking "
    "hiking sewing wrapping frying washing sleeping shopping fishing building painting ceiling wedding "
    "clothing evening morning ring king wing string swing spring thing pudding icing railing sibling "
    "bed shed sled hundred family belly jelly lily butterfly fly holly ally rally bully dolly assembly "
    "supply reply duckling dumpling sapling seedling darling starling earring "
    # -ic / -ful / -ish words that are nouns
    "picnic traffic music mosaic clinic logic topic fabric comic attic garlic tunic relic critic rubric "
    "arithmetic mechanic republic handful spoonful mouthful radish relish parish polish varnish".split()
)

TAGS = ("DET", "NUM", "ADJ", "NOUN", "VERB", "AUX", "ADP", "CCONJ", "PRON", "ADV", "PUNCT")
_TOKEN = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*|\S")


@dataclass(frozen=True)
class Token:
    """A word or punctuation mark: its ``text``, coarse spaCy-style tag ``pos`` (one of
    :data:`TAGS`, plus PROPN from spaCy) and character span [start, end) in the prompt."""

    text: str
    pos: str
    start: int
    end: int


class Parser(Protocol):
    """``tokens(text)``: the tagged tokens; ``noun_chunks(text)``: the noun chunk strings, as
    spans of the text; ``name``: which parser ran (goes into the report summary)."""

    name: str

    def tokens(self, text: str) -> list[Token]: ...

    def noun_chunks(self, text: str) -> list[str]: ...


def _word_class(word: str) -> str | None:
    """The closed class of a lowercased word, or None for an open-class word."""
    if not word[0].isalnum():
        return "PUNCT"
    if word in DETERMINERS:
        return "DET"
    if word in NUMBER_WORDS or word.isdigit():
        return "NUM"
    if word in PREPOSITIONS:
        return "ADP"
    if word in CONJUNCTIONS:
        return "CCONJ"
    if word in PRONOUNS:
        return "PRON"
    if word in AUXILIARIES:
        return "AUX"
    if word in ADVERBS:
        return "ADV"
    return None


def _is_suffixed(word: str, suffix: str) -> bool:
    if word in NOUN_EXCEPTIONS or len(word) < len(suffix) + (2 if suffix == "ed" else 3):
        return False
    return word.endswith(suffix) and not (suffix == "ed" and word.endswith("eed"))


def _adjective_suffix(word: str) -> bool:
    if word in NOUN_EXCEPTIONS or len(word) < 6:
        return False
    return word.endswith(("ful", "ous", "less", "ic", "ish")) and not word.endswith("fish")


def _is_participle(word: str) -> bool:
    return _is_suffixed(word, "ed") or _is_suffixed(word, "ing")


def _open_tag(word: str, prev: str | None, next_class: str | None, next_word: str, plural_subject: bool) -> str:
    """The tag of an open-class word from itself, the previous tag, the next word's class ("OPEN",
    a closed tag, or None at the end) and whether a plural subject may precede it (an earlier
    "and", or a previous word in -s)."""
    after_modifier = prev in ("DET", "NUM", "ADJ")
    noun_follows = next_class == "OPEN" and not _is_suffixed(next_word, "ly")
    if word in ADJECTIVES or word.endswith("-shaped") or word == "light" and next_word in ADJECTIVES:
        return "ADJ"  # "light brown cabinets"
    if word in VERBS:
        return "NOUN" if after_modifier else "VERB"
    if word in NOUN_OR_VERB or word in PAST_OR_NOUN:
        # "the rug and ottoman rest on the floor", "two hot dogs sit on", not "a traffic light with"
        agrees = word in PAST_OR_NOUN or word.endswith("s") or plural_subject
        return "VERB" if prev == "NOUN" and agrees and next_class in ("DET", "NUM", "ADP", "ADV") else "NOUN"
    if _adjective_suffix(word):
        return "ADJ"  # "majestic", "powerful", "delicious", "endless", "reddish"
    if _is_participle(word):
        if prev in ("AUX", "PRON"):
            return "VERB"  # "was hung", "is resting", "they roasted marshmallows"
        if prev == "NOUN":
            return "VERB"  # "the mouth displayed flowers", "the bark scraped against"
        if noun_follows:
            return "ADJ"  # "striped rug", "flickering candle"
        if after_modifier and next_word != ",":
            return "NOUN" if word.endswith("ing") else "ADJ"  # "checkered flooring", "the injured"
        if after_modifier:
            return "ADJ"  # "the sparkling, crystal chandeliers"
        return "VERB"
    if _is_suffixed(word, "ly"):
        verb_follows = next_word in VERBS or next_word.endswith("ed")
        return "ADJ" if noun_follows and not verb_follows else "ADV"  # "early morning", "freshly brewed"
    if prev == "NOUN" and next_class in ("DET", "NUM"):
        return "VERB"  # "the wooden spoon and metallic ladle serve the soup"
    return "NOUN"


class RuleParser:
    """The rule-based tagger and chunker described in the module docstring (no model, no data)."""

    name = "rule-based (genalign.eval.noun_phrases)"

    def tokens(self, text: str) -> list[Token]:
        spans = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]
        words = [s.lower().replace("’", "'") for s, _, _ in spans]
        closed = [_word_class(w) for w in words]
        tags: list[str] = []
        for i, word in enumerate(words):
            if word == "can" and i and tags[i - 1] in ("DET", "NUM", "ADJ", "NOUN"):
                closed[i] = None  # "a can of soup", "a watering can"
            after = i + 1 < len(words)
            plural_subject = "and" in words[:i] or i > 0 and words[i - 1].endswith("s")
            tag = closed[i] or _open_tag(word, tags[i - 1] if i else None, (closed[i + 1] or "OPEN") if after else None,
                                         words[i + 1] if after else "", plural_subject)
            tags.append(tag)
        tokens = [Token(text, tag, start, end) for (text, start, end), tag in zip(spans, tags)]
        return _promote_heads(tokens)

    def noun_chunks(self, text: str) -> list[str]:
        return [text[start:end] for start, end in chunk_spans(self.tokens(text))]


def _chunk_run(tokens: list[Token], i: int) -> tuple[int, bool, int | None, int | None]:
    """The noun-chunk candidate starting at token i: (end index, exclusive; whether it opens with
    an article or a number; its last NOUN; its last ADJ before any noun). A run is [DET|NUM]*
    [ADJ|ADV]* NOUN*, where a comma or conjunction between modifiers ("black and white cat",
    "sparkling, crystal chandeliers") does not end it."""
    n, has_article, last_noun, last_adj, j = len(tokens), False, None, None, i
    while j < n:
        pos, text = tokens[j].pos, tokens[j].text.lower()
        next_pos = tokens[j + 1].pos if j + 1 < n else None
        joins_modifiers = last_adj is not None and (
            pos == "CCONJ" and next_pos == "ADJ" or text == "," and next_pos in ("ADJ", "NOUN"))
        if pos in ("DET", "NUM") and last_adj is None and last_noun is None:
            has_article = has_article or pos == "NUM" or text in ("a", "an", "the")
        elif pos == "NOUN":
            last_noun = j
        elif last_noun is not None:
            break  # after the head only more nouns (compounds) belong to the chunk
        elif pos == "ADJ":
            last_adj = j
        elif pos != "ADV" and not joins_modifiers:
            break
        j += 1
    return j, has_article, last_noun, last_adj


def _promote_heads(tokens: list[Token]) -> list[Token]:
    """An article or number followed by modifiers and no noun makes the last modifier the head
    noun: "a red *orange*", "the rough *square*", "the jagged *oval*"."""
    out, i = list(tokens), 0
    while i < len(out):
        if out[i].pos not in ("DET", "NUM", "ADJ", "NOUN"):
            i += 1
            continue
        end, has_article, last_noun, last_adj = _chunk_run(out, i)
        if last_noun is None and has_article and last_adj is not None:
            head = out[last_adj]
            out[last_adj] = Token(head.text, "NOUN", head.start, head.end)
        i = max(end, i + 1)
    return out


def chunk_spans(tokens: list[Token]) -> list[tuple[int, int]]:
    """Character spans of the noun chunks of tagged tokens: each run of :func:`_chunk_run` that
    has a noun, from its first token to its last noun."""
    chunks: list[tuple[int, int]] = []
    i = 0
    while i < len(tokens):
        if tokens[i].pos not in ("DET", "NUM", "ADJ", "NOUN"):
            i += 1
            continue
        end, _, last_noun, _ = _chunk_run(tokens, i)
        if last_noun is not None:
            chunks.append((tokens[i].start, tokens[last_noun].end))
        i = max(end, i + 1)
    return chunks


class SpacyParser:
    """spaCy with a loaded pipeline (``spacy.load("en_core_web_sm")``): the official evaluators'
    own tags and chunks, PROPN kept: the official evaluators take NOUN only for 2D / 3D objects and
    PROPN only as a fall-back in complex prompts."""

    def __init__(self, nlp: Any, name: str = "spacy en_core_web_sm"):
        self.nlp = nlp
        self.name = name

    def tokens(self, text: str) -> list[Token]:
        out = []
        for token in self.nlp(text):
            out.append(Token(token.text, token.pos_, token.idx, token.idx + len(token.text)))
        return out

    def noun_chunks(self, text: str) -> list[str]:
        return [chunk.text for chunk in self.nlp(text).noun_chunks]


def load_parser(prefer_spacy: bool = True) -> Parser:
    """spaCy's ``en_core_web_sm`` when it is installed (and ``prefer_spacy``), else the rule parser."""
    if prefer_spacy:
        try:
            import spacy

            nlp = spacy.load("en_core_web_sm")
        except (ImportError, OSError):
            pass
        else:
            return SpacyParser(nlp, f"spacy {spacy.__version__} en_core_web_sm {nlp.meta.get('version', '?')}")
    return RuleParser()


def nouns(parser: Parser, text: str) -> list[str]:
    """The NOUN tokens of ``text`` in order (what the official ``token.pos_ == 'NOUN'`` filters)."""
    return [token.text for token in parser.tokens(text) if token.pos == "NOUN"]


def without_adjectives(parser: Parser, text: str) -> str:
    """The tokens that are not ADJ, joined by single spaces (CLIPScore_eval/CLIP_similarity.py,
    ``--complex``)."""
    return " ".join(token.text for token in parser.tokens(text) if token.pos != "ADJ")
