"""The synthetic language: determinism, shapes, disjoint and balanced splits, and that every
corruption breaks exactly the rule its task asks about (checked by an independent parser)."""
import numpy as np
import pytest

from minitransformer.tools import data

NOUN0, VERB0, ADJ0 = 8, data._VERB0, data._ADJ0


# ----------------------------------------------------------------------------- a parser


def parses(tokens):
    """Is `tokens` (no CLS, no PAD) a sequence of grammatical clauses, each ended by '.'?
    Written from the grammar in data.py's docstring, not from its generator."""
    pos = 0

    def noun_phrase():
        nonlocal pos
        det = None
        if pos < len(tokens) and tokens[pos] in (data.DET_SING, data.DET_PLUR, data.DET_THE):
            det, pos = tokens[pos], pos + 1
        if pos < len(tokens) and ADJ0 <= tokens[pos] < data._DET0:
            pos += 1
        if pos >= len(tokens) or not NOUN0 <= tokens[pos] < VERB0:
            return None
        number = (tokens[pos] - NOUN0) % 2
        pos += 1
        if (det == data.DET_SING and number) or (det == data.DET_PLUR and not number):
            return None
        return number

    def clause():
        nonlocal pos
        number = noun_phrase()
        if number is None:
            return False
        if pos < len(tokens) and tokens[pos] in data.OPEN:
            kind = data.OPEN.index(tokens[pos])
            pos += 1
            if not clause() or pos >= len(tokens) or tokens[pos] != data.CLOSE[kind]:
                return False
            pos += 1
        if pos >= len(tokens) or not VERB0 <= tokens[pos] < ADJ0 or (tokens[pos] - VERB0) % 2 != number:
            return False
        pos += 1
        return noun_phrase() is not None

    while pos < len(tokens):
        if not clause() or pos >= len(tokens) or tokens[pos] != data.DOT:
            return False
        pos += 1
    return len(tokens) > 0


def texts(split):
    return [list(row[1:][mask[1:]]) for row, mask in zip(split.ids, split.pad_mask)]


@pytest.fixture(scope="module")
def tasks():
    return {name: data.load_task(name) for name in data.TASKS}


# ----------------------------------------------------------------------------- tasks


def test_at_least_four_tasks_and_unknown_name(tasks):
    assert len(data.TASKS) >= 4
    with pytest.raises(ValueError, match="name.*topic.*nope"):
        data.load_task("nope")
    with pytest.raises(ValueError, match="seed"):
        data.load_task("topic", seed=-1)


def test_shapes_dtypes_and_padding(tasks):
    for task in tasks.values():
        for split, n in zip((task.train, task.val, task.test), data.SIZES.values()):
            assert split.ids.shape == split.pad_mask.shape == (n, data.MAX_LEN)
            assert split.ids.dtype == np.int64 and split.labels.dtype == np.int64
            assert split.pad_mask.dtype == bool and split.labels.shape == (n,)
            assert (split.ids[:, 0] == data.CLS).all()
            assert (split.pad_mask == (split.ids != data.PAD)).all()
            # real tokens first, then padding: the mask never turns back on
            assert not (np.diff(split.pad_mask.astype(int), axis=1) > 0).any()
            assert split.ids.max() < data.VOCAB_SIZE and split.labels.max() < task.n_classes


def test_deterministic_per_seed(tasks):
    again = data.load_task("agreement", seed=0)
    other = data.load_task("agreement", seed=1)
    for s in ("train", "val", "test"):
        a, b = getattr(tasks["agreement"], s), getattr(again, s)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(tasks["agreement"].train.ids, other.train.ids)


def test_splits_disjoint_and_balanced(tasks):
    for task in tasks.values():
        seen = [set(map(bytes, s.ids)) for s in (task.train, task.val, task.test)]
        assert sum(map(len, seen)) == sum(map(len, (task.train, task.val, task.test)))  # no duplicates
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
        for s in (task.train, task.val, task.test):
            counts = np.bincount(s.labels, minlength=task.n_classes)
            assert counts.max() - counts.min() <= 1


def filled(text, *tokens):
    """`text` with its MASKs replaced by `tokens`, left to right."""
    out, fill = list(text), iter(tokens)
    return [next(fill) if t == data.MASK else t for t in out]


def test_labels_mean_what_they_say(tasks):
    assert all(parses(t) for t in texts(tasks["topic"].train))
    verb = {0: VERB0, 1: VERB0 + 1}  # the singular and plural forms of verb lemma 0
    for t, y in zip(texts(tasks["agreement"].train), tasks["agreement"].train.labels):
        assert t.count(data.MASK) == 1
        assert parses(filled(t, verb[y])) and not parses(filled(t, verb[1 - y]))
    for t, y in zip(texts(tasks["brackets"].train), tasks["brackets"].train.labels):
        assert t.count(data.MASK) == 2
        assert parses(filled(t, data.CLOSE[y], data.CLOSE[1 - y]))
        assert not parses(filled(t, data.CLOSE[1 - y], data.CLOSE[y]))
    for t, y in zip(texts(tasks["nesting"].train), tasks["nesting"].train.labels):
        m = t.index(data.MASK)
        depth = sum(tok in data.OPEN for tok in t[:m]) - sum(tok in data.CLOSE for tok in t[:m])
        assert (depth > 0) == y
        assert parses(filled(t, verb[0])) or parses(filled(t, verb[1]))
        assert data.OPEN[0] in t or data.OPEN[1] in t  # brackets in every text, either label


def test_topic_is_visible_in_the_words(tasks):
    split = tasks["topic"].test
    per_topic = np.zeros((len(split), data.N_TOPICS))
    for n, t in enumerate(texts(split)):
        for tok in t:
            if NOUN0 <= tok < VERB0:
                per_topic[n, (tok - NOUN0) // 2 // data.NOUNS_PER_TOPIC] += 1
    guess = per_topic.argmax(axis=1)
    assert (guess == split.labels).mean() > 0.5  # 4 classes: chance is 0.25


# ----------------------------------------------------------------------------- pretraining


def test_corpus_deterministic_and_grammatical():
    a, b = data.pretraining_corpus(300, seed=3), data.pretraining_corpus(300, seed=3)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.ids, data.pretraining_corpus(300, seed=4).ids)
    assert all(parses(t) for t in texts(a))
    with pytest.raises(ValueError, match="n"):
        data.pretraining_corpus(0)


def test_mask_tokens():
    corpus = data.pretraining_corpus(2000, seed=0)
    inputs, targets = data.mask_tokens(corpus.ids, corpus.pad_mask, np.random.default_rng(0))
    chosen = targets != -100
    assert not chosen[:, 0].any() and not chosen[~corpus.pad_mask].any()  # never CLS or PAD
    assert chosen.any(axis=1).all()  # every row predicts something
    assert np.array_equal(targets[chosen], corpus.ids[chosen])
    assert np.array_equal(inputs[~chosen], corpus.ids[~chosen])  # the rest untouched
    rate = chosen.sum() / (corpus.pad_mask.sum() - len(corpus))
    assert 0.13 < rate < 0.18
    masked = (inputs[chosen] == data.MASK).mean()
    assert 0.75 < masked < 0.85
    again, _ = data.mask_tokens(corpus.ids, corpus.pad_mask, np.random.default_rng(0))
    assert np.array_equal(inputs, again)


def test_batches_cover_an_epoch():
    split = data.pretraining_corpus(100, seed=0)
    stream = data.batches(split, 10, np.random.default_rng(0))
    rows = np.concatenate([next(stream).ids for _ in range(10)])
    assert sorted(map(bytes, rows)) == sorted(map(bytes, split.ids))
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(split, 0, np.random.default_rng(0)))
