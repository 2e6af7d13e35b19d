"""Novel-risk descriptions on CPU: the post's salient noun phrase, so emerging-risk alerts can cluster.

MiniLM does not generate, so the description is extractive. The post's first words (the previous
baseline) cluster badly: two posts about one trend rarely start alike. Instead, candidate phrases are the
runs of content words between stop words and verbs (a crude noun-phrase chunker, at most
``MAX_PHRASE_WORDS`` words, keeping the end of a run, where English puts its head noun), and the one whose
embedding is closest to the whole post's embedding wins: it is the phrase that says what the post is about
("blackout challenge", "fainting game").
"""

from __future__ import annotations

import re

import numpy as np

from guard.embeddings import Embedder, FloatArray

MAX_PHRASE_WORDS = 3
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
# Function words and very common verbs/adverbs: they end a candidate phrase (a cheap stand-in for a
# part-of-speech tagger, which the CPU engine does not ship).
_STOP = frozenset(
    " ".join(
        (
            "a an the and or but if then so because as of at by for with about against between into",
            "through during before after above below to from up down in out on off over under again",
            "further once here there when where why how all any both each few more most other some",
            "such no nor not only own same than too very can will just don should now i me my myself",
            "we our ours you your yours he him his she her it its they them their what which who whom",
            "this that these those am is are was were be been being have has had having do does did",
            "doing would could ought yourself yourselves himself herself itself themselves ourselves",
            "im youre hes shes its were theyre ive youve weve theyve id youd hed shed wed theyd ill",
            "youll hell shell well theyll isnt arent wasnt werent hasnt havent hadnt doesnt dont",
            "didnt wont wouldnt shant shouldnt cant cannot couldnt mustnt lets thats whos whats heres",
            "theres whens wheres whys hows try tried trying get got getting go going gone went make",
            "made making do doing done let take took taking give gave put see saw seen watch watched",
            "post posted posting share shared tag tagged film filmed upload uploaded join everyone",
            "everybody someone anyone nobody people guys kids new last next night today tonight",
            "tomorrow yesterday week back really still even also like lol omg ok okay yeah who's next",
            "until till while accepted viral",
        )
    ).split()
)


def candidates(text: str) -> list[str]:
    runs: list[list[str]] = [[]]
    for token in re.findall(r"[A-Za-z][A-Za-z'-]*|[^\sA-Za-z]", text):
        w = token.lower().replace("'", "")
        if not _WORD.fullmatch(token) or w in _STOP or len(w) < 3:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append(token.lower())
    out: list[str] = []
    for run in runs:
        if run:
            phrase = " ".join(run[-MAX_PHRASE_WORDS:])
            if phrase not in out:
                out.append(phrase)
    return out


def salient_phrase(text: str, text_vec: FloatArray, embedder: Embedder) -> str:
    """The candidate phrase nearest in meaning to the whole post (``text_vec``: its unit embedding).

    Multi-word phrases get a small bonus: "blackout challenge" says more than "challenge" alone.
    """
    return salient_phrases([text], text_vec[None, :], embedder)[0]


def salient_phrases(texts: list[str], text_vecs: FloatArray, embedder: Embedder) -> list[str]:
    """``salient_phrase`` for several posts with one encoder call for all their candidates."""
    per_post = [candidates(t) for t in texts]
    flat = [c for cands in per_post for c in cands]
    vecs = embedder.encode(flat, batch_size=64) if flat else np.zeros((0, 384), dtype=np.float32)
    out: list[str] = []
    k = 0
    for text, vec, cands in zip(texts, text_vecs, per_post, strict=True):
        if not cands:
            out.append(" ".join(text.split()[:MAX_PHRASE_WORDS]))
            continue
        score = vecs[k : k + len(cands)] @ vec + 0.04 * np.array([min(len(c.split()), 2) for c in cands])
        out.append(cands[int(score.argmax())])
        k += len(cands)
    return out
