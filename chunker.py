"""A rule-based English noun chunker for T2I-CompBench-style prompts: a stand-in for spaCy's noun
chunks, so nothing is downloaded and the result is deterministic. Used by attribute concentration
(segment.parse: which objects get a mask) and by the benchmark's scoring when spaCy is not
installed (compbench.analyse).
Usage: [c.words for c in chunks("a red cat and a blue dog")] == [("red", "cat"), ("blue", "dog")]
"""
import re
from typing import NamedTuple

# Copulas: an adjective-only chunk after one describes the previous noun ("a dog that is red").
COPULA = set("is are was were be being been looks look appears appear seems seem".split())
# Determiners end the chunk before them and open the next one (spaCy puts them in its text).
DET = set("""a an the one two three four five six some several many each every this that these
those its his her their my our your""".split())
# Words that end a noun chunk: determiners, pronouns, conjunctions, prepositions, copulas.
BREAK = COPULA | DET | set("""it they he she we i you there here and or but nor with without while
as has have had which who whose on in at of to from by for into onto over under above below behind
beside besides near next between among around across against along atop beneath underneath inside
outside through toward towards up down off than then""".split())
# Words, hyphenated words, "'s", and single other characters (punctuation, digits).
TOKEN = re.compile(r"'s\b|[a-z]+(?:-[a-z]+)*|[^\sa-z]")
# Adjectives (colour, shape, size, material, texture): they never end a chunk, so a participle
# after them is a noun-ish word ("a tall building"), and "black and white" stays one chunk.
# "square" is left out on purpose: it is a noun in the toy world ("a red square and ...").
ADJ = set("""red orange yellow green blue purple pink brown black white gray grey cyan magenta
violet golden gold silver beige round circular rectangular triangular oval spherical cubic
cylindrical hexagonal big small large tiny tall short long huge little giant old new young
wooden metallic metal plastic glass leather fluffy furry fabric rubber ceramic stone marble paper
woolen wool cotton silk velvet denim shiny smooth rough soft hard striped spotted dotted checkered
transparent bright dark light""".split())
# Nouns ending in -ing that the participle rule must not take for verbs.
ING_NOUNS = set("""building painting ceiling clothing earring wedding pudding dumpling string swing
sling railing stocking frosting icing sibling""".split())
# Irregular participles the -ed rule misses, where benchmark prompts need them: 3d_spatial_val's
# "a chair hidden by a mouse" (the chair is the noun).
PARTICIPLES = {"hidden"}


def is_verb(w: str, cur: list, after: str) -> bool:
    """A participle ending a chunk: "a cat sitting", "a man is holding", not "a tall building"."""
    if w not in PARTICIPLES and (len(w) <= 4 or not w.endswith(("ing", "ed")) or w in ING_NOUNS):
        return False
    return (bool(cur) and cur[-1] not in ADJ) or (not cur and after in COPULA)


class Chunk(NamedTuple):
    start: int              # character span in the prompt, a determiner right before included
    end: int
    words: tuple[str, ...]  # lower-cased: attribute words, then the noun


def chunks(prompt: str) -> list[Chunk]:
    """Noun chunks by rule, a stand-in for spaCy's (evaluate.py asks BLIP about them too).

    The prompt is cut at BREAK words, punctuation and verbs; a chunk's last word is its noun
    (English heads come last), the words before it its attributes. Adjectives alone after a
    copula go to the noun before ("a dog that is red"). A possessive ends a chunk."""
    toks = [(m.group(), m.start(), m.end()) for m in TOKEN.finditer(prompt.lower())]
    out, cur, after, begin, end, prev = [], [], "", 0, 0, 0  # after: the break word before cur
    for w, s, e in toks + [(".", len(prompt), len(prompt))]:
        if not (w in BREAK or not w[0].isalpha() or is_verb(w, cur, after)):
            begin = begin if cur else prev if after in DET else s
            cur, end = cur + [w], e
            continue
        if w in ("and", "or", ",") and cur and set(cur) <= ADJ:
            continue  # "a black and white cat": the adjective run goes on
        if cur and after in COPULA and set(cur) <= ADJ and out:
            out[-1] = out[-1]._replace(words=out[-1].words[:-1] + tuple(cur) + out[-1].words[-1:])
        elif cur:
            out.append(Chunk(begin, end, tuple(cur)))
        cur, after, prev = [], w, s
    return out
