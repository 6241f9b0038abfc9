"""Synthetic language: a seeded pretraining corpus and downstream classification tasks.

One small grammar with hidden structure generates every text; tasks and corpus share its
vocabulary (VOCAB_SIZE ids, PAD/CLS/MASK specials).

The grammar. A text is a hidden topic z (one of 4) and a few clauses, each ended by ".":
    clause := NP(n) [ "(" clause ")" | "[" clause "]" ] verb(n) NP(n')
    NP(n)  := [det(n)] [adj] noun(n)        n: singular or plural, chosen per noun phrase
The verb agrees in number with its subject, possibly across a bracketed clause between them
(long-distance agreement); brackets nest (up to depth 3); nouns, verbs and adjectives come
from topic z's own words with probability TOPIC_P, else from any topic's.

Pretraining objective: masked tokens, BERT-style (15 % of real tokens; of those 80 % -> MASK,
10 % -> a random word, 10 % kept). We follow the paper, whose adapters sit in a post-LN BERT
trained this way. Filling a masked verb needs the subject's number, a masked bracket needs the
stack of open brackets, a masked noun needs the topic: the base has to learn the structure.
And because [CLS] (position 0) is never a masked-token target, its final state is never trained
by pretraining: a linear probe on it ("head" only, pooling "first") sees features nobody shaped
for the task, while adapters can route what the base knows to it.

Downstream tasks (pooling "first", classes balanced by construction). Three of them are cloze
questions: a token is replaced by MASK, as in pretraining, and the class is a property of what
belongs there, which the base has learned to work out *at that position*:
    topic      4 classes: which topic generated the (clean) text
    agreement  2: one verb is masked; is it singular or plural (its subject decides, possibly
               across a bracketed clause in between)
    brackets   2: one ")" and one "]" are masked; which of the two closes first (needs the
               stack of open brackets; both labels leave the same token counts)
    nesting    2: one verb is masked; does it sit inside brackets or in a main clause
Only topic can be read off the bag of words; it is the control task, where a linear probe on
[CLS] should already do well. For the others the answer lives at the masked position, and a
probe on the untrained [CLS] state gets little of it, while an adapter can learn to route it.

What we tried first: corruption detection. agreement = "was one
verb's number flipped", brackets = "were two closers of different types swapped", shuffle =
"were two adjacent tokens swapped". With a 4000-step base, 400 steps, bottleneck 8: topic
test accuracy head-only 0.968, adapter 0.971, full 0.964; agreement head-only 0.537, adapter
0.506 (chance; full fine-tuning not measured, the run was cut short). Adapters could not find
one wrong token among thirty in that budget, so the tasks now ask what the base computes.

Measured with the shipped base, 300 steps, seed 0, adapter m=8 (train.METHOD_LR), test accuracy
from `python -m minitransformer --quiet --task <name>` (about 35 s each on 2 cores):
    task        head only   adapter (10k params, 4.7 %)   full fine-tuning (209k)
    topic         0.972          0.973                       0.964
    agreement     0.586          0.997                       0.993
    brackets      0.521          0.944                       0.981
    nesting       0.541          0.986                       0.999
With the adapter's first learning rate (1e-3) nesting stayed at 0.574 and brackets at 0.713
after 300 steps; 3e-3 is what they needed. Control, the same runs on an untrained base
(Transformer(pretrain.BASE_CONFIG, seed=0), then train.prepare and train.fit as in the demo):
adapter 0.500 on agreement, nesting and brackets; full fine-tuning 0.717, 0.829, 0.917. The
pretrained representations are what the adapters use.

Shapes: N examples, T = MAX_LEN positions ([CLS] + text + PAD).
"""
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------- vocabulary

PAD, CLS, MASK, DOT = 0, 1, 2, 3
OPEN, CLOSE = (4, 6), (5, 7)  # "(" "[" and their closers ")" "]"
N_TOPICS = 4
NOUNS_PER_TOPIC, VERBS_PER_TOPIC, ADJS_PER_TOPIC = 6, 3, 4
_NOUN0 = 8  # noun lemma k: singular id _NOUN0 + 2k, plural id _NOUN0 + 2k + 1
_VERB0 = _NOUN0 + 2 * N_TOPICS * NOUNS_PER_TOPIC  # verb lemma k: same layout
_ADJ0 = _VERB0 + 2 * N_TOPICS * VERBS_PER_TOPIC
_DET0 = _ADJ0 + N_TOPICS * ADJS_PER_TOPIC  # "a" (singular only), "some" (plural only), "the"
DET_SING, DET_PLUR, DET_THE = _DET0, _DET0 + 1, _DET0 + 2
VOCAB_SIZE = _DET0 + 3  # 99 ids
WORDS = np.arange(_NOUN0, VOCAB_SIZE)  # the ids a random replacement may draw
MAX_LEN = 32  # T, including [CLS]
TOPIC_P = 0.6  # probability that a content word comes from the text's own topic
MAX_DEPTH = 3  # deepest bracket nesting

TASKS = ("topic", "agreement", "brackets", "nesting")
DESCRIPTIONS = {
    "topic": "which of 4 hidden topics generated the text",
    "agreement": "one verb is masked: is it singular (0) or plural (1), as its subject demands",
    "brackets": "one ')' and one ']' are masked: does ')' (0) or ']' (1) close first",
    "nesting": "one verb is masked: is it in a main clause (0) or inside brackets (1)",
}
N_CLASSES = {"topic": N_TOPICS, "agreement": 2, "brackets": 2, "nesting": 2}
SIZES = {"train": 2000, "val": 500, "test": 1000}  # examples per split


# ----------------------------------------------------------------------------- the grammar


class _Text:
    """One generated text: its tokens and, for making task examples, where its verbs and
    bracket pairs are."""

    def __init__(self, rng, topic):
        self.rng, self.topic = rng, topic
        self.tokens, self.verbs, self.pairs = [], [], []  # verbs: positions; pairs: (open, close)

    def _lemma(self, per_topic):
        z = self.topic if self.rng.random() < TOPIC_P else self.rng.integers(N_TOPICS)
        return z * per_topic + self.rng.integers(per_topic)

    def noun_phrase(self):
        plural = int(self.rng.random() < 0.5)
        if self.rng.random() < 0.5:
            self.tokens.append((DET_SING, DET_PLUR)[plural] if self.rng.random() < 0.5 else DET_THE)
        if self.rng.random() < 0.3:
            self.tokens.append(_ADJ0 + self._lemma(ADJS_PER_TOPIC))
        self.tokens.append(_NOUN0 + 2 * self._lemma(NOUNS_PER_TOPIC) + plural)
        return plural

    def clause(self, depth):
        plural = self.noun_phrase()
        if depth < MAX_DEPTH and self.rng.random() < 0.5 / (depth + 1):
            kind = self.rng.integers(2)
            start = len(self.tokens)
            self.tokens.append(OPEN[kind])
            self.clause(depth + 1)
            self.pairs.append((start, len(self.tokens)))
            self.tokens.append(CLOSE[kind])
        self.verbs.append(len(self.tokens))
        self.tokens.append(_VERB0 + 2 * self._lemma(VERBS_PER_TOPIC) + plural)
        self.noun_phrase()


def _generate(rng, topic, length):
    """A clean text of at most `length` tokens (>= 1 clause) -> _Text."""
    while True:
        text = _Text(rng, topic)
        text.clause(0)
        text.tokens.append(DOT)
        if len(text.tokens) <= length:
            break
    while True:  # add whole clauses while they fit
        more = _Text(rng, topic)
        more.clause(0)
        more.tokens.append(DOT)
        if len(text.tokens) + len(more.tokens) > length:
            return text
        off = len(text.tokens)
        text.tokens += more.tokens
        text.verbs += [v + off for v in more.verbs]
        text.pairs += [(a + off, b + off) for a, b in more.pairs]


def _random_length(rng, T):
    return int(rng.integers(T // 2, T))  # text tokens, leaving room for [CLS]


# ----------------------------------------------------------------------------- examples


def _inside(pos, pairs):
    return any(a < pos < b for a, b in pairs)


def _make_example(task, text, label, rng):
    """Turn the clean `text` into an example of class `label`, in place; False if this text
    cannot be one (the caller draws another)."""
    tok = text.tokens
    if task == "topic":
        return True  # the text was generated from topic `label`
    if task == "agreement":  # a masked verb whose number is `label`
        spots = [v for v in text.verbs if (tok[v] - _VERB0) % 2 == label]
    elif task == "nesting":  # a masked verb inside brackets (1) or in a main clause (0)
        if not text.pairs:
            return False
        spots = [v for v in text.verbs if _inside(v, text.pairs) == bool(label)]
    elif task == "brackets":  # one ")" and one "]" masked; label 1 when "]" comes first
        if len(text.pairs) < 2:
            return False
        i, k = rng.choice(len(text.pairs), size=2, replace=False)
        (a1, b1), (a2, b2) = sorted([text.pairs[i], text.pairs[k]], key=lambda pair: pair[1])
        # bracket types are drawn uniformly and independently, so re-drawing these two is fair:
        # the pair that closes first gets type `label`, the other the other type
        tok[a1], tok[a2] = OPEN[label], OPEN[1 - label]
        tok[b1] = tok[b2] = MASK
        return True
    else:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if not spots:
        return False
    tok[spots[rng.integers(len(spots))]] = MASK
    return True


# ----------------------------------------------------------------------------- arrays


@dataclass
class Split:
    """ids (N, T) int64 with [CLS] first, pad_mask (N, T) bool (True = real token),
    labels (N,) int64."""
    ids: np.ndarray
    pad_mask: np.ndarray
    labels: np.ndarray

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return Split(self.ids[index], self.pad_mask[index], self.labels[index])


@dataclass
class Task:
    name: str
    n_classes: int
    description: str
    train: Split
    val: Split
    test: Split


def _pack(texts, T):
    """Lists of token ids -> ids (N, T) with [CLS] first and PAD after, pad_mask (N, T)."""
    ids = np.full((len(texts), T), PAD, np.int64)
    for n, tok in enumerate(texts):
        ids[n, 0] = CLS
        ids[n, 1:1 + len(tok)] = tok
    return ids, ids != PAD


CORPUS_STREAM = 4  # the corpus's random stream: fixed, so the shipped base stays reproducible


def _stream(name):
    i = TASKS.index(name)
    return i if i < CORPUS_STREAM else i + 1  # a task added later never shares the corpus's


def _check_seed(seed):
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")


def load_task(name, seed=0):
    """The task `name` (see TASKS) with train/val/test splits; same seed -> same arrays.

    Labels are balanced within each split, and no text appears in two splits.
    """
    if name not in TASKS:
        raise ValueError(f"name: expected one of {TASKS}, got {name!r}")
    _check_seed(seed)
    rng = np.random.default_rng([seed, _stream(name), 4])  # its own stream per task
    K, T = N_CLASSES[name], MAX_LEN
    seen, splits = set(), {}
    for split, n in SIZES.items():
        texts, labels = [], np.arange(n) % K  # balanced: every class n / K times
        for label in labels:
            while True:
                topic = label if name == "topic" else rng.integers(N_TOPICS)
                text = _generate(rng, topic, _random_length(rng, T))
                if not _make_example(name, text, label, rng):
                    continue
                key = bytes(text.tokens)
                if key not in seen:  # no duplicates within or across splits
                    seen.add(key)
                    break
            texts.append(text.tokens)
        order = rng.permutation(n)
        ids, pad_mask = _pack([texts[i] for i in order], T)
        splits[split] = Split(ids, pad_mask, labels[order].astype(np.int64))
    return Task(name, K, DESCRIPTIONS[name], splits["train"], splits["val"], splits["test"])


# ----------------------------------------------------------------------------- pretraining


def pretraining_corpus(n=20000, seed=0):
    """n clean texts for masked-token pretraining -> Split (labels: the hidden topics)."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    _check_seed(seed)
    rng = np.random.default_rng([seed, CORPUS_STREAM, 4])  # a stream no task uses
    topics = rng.integers(N_TOPICS, size=n)
    texts = [_generate(rng, z, _random_length(rng, MAX_LEN)).tokens for z in topics]
    ids, pad_mask = _pack(texts, MAX_LEN)
    return Split(ids, pad_mask, topics.astype(np.int64))


def mask_tokens(ids, pad_mask, rng, p=0.15):
    """BERT's masking -> (inputs (B, T), targets (B, T) with -100 where nothing is predicted).

    Each real token except [CLS] is chosen with probability p (at least one per row); a chosen
    token becomes MASK 80 % of the time, a random word 10 %, and stays itself 10 %.
    """
    B, T = ids.shape
    can = pad_mask & (ids != CLS)  # (B,T)
    chosen = can & (rng.random((B, T)) < p)
    # rows where nothing was chosen get one token, so every row teaches something
    empty = ~chosen.any(axis=1)
    if empty.any():
        scores = np.where(can[empty], rng.random((int(empty.sum()), T)), -1.0)
        chosen[np.flatnonzero(empty), scores.argmax(axis=1)] = True
    targets = np.where(chosen, ids, -100)
    r = rng.random((B, T))
    inputs = ids.copy()
    inputs[chosen & (r < 0.8)] = MASK
    swap = chosen & (r >= 0.8) & (r < 0.9)
    inputs[swap] = rng.choice(WORDS, size=int(swap.sum()))
    return inputs, targets


def batches(split, batch_size, rng):
    """Endless shuffled minibatches of a Split: each epoch visits every example once."""
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
    n = len(split)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield split[order[start:start + batch_size]]
