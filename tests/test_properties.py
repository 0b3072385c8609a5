"""Property-based tests (hypothesis) of the caption readers and the tokenizer: whatever a caption
file holds, a reader returns records or raises one DataError, never crashes, and never drops a
line without a warning."""

import csv
import io
import json
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captioner.data.records import DataError, read_csv, read_flickr, read_jsonl, read_karpathy
from captioner.data.vocab import Vocabulary, join_words, tokenize

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

names = st.from_regex(r"[a-z0-9_]{1,12}\.(jpg|png)", fullmatch=True)
LINE_BREAKS = "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on
captions = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters=LINE_BREAKS), max_size=60)
junk = st.text(max_size=80)


def read_with_warnings(reader, path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            records = reader(path)
        except DataError as e:
            assert "\n" not in str(e)
            records = None
    return records, [str(w.message) for w in caught]


def count_captions(records):
    return sum(len(r.captions) for r in records or [])


@SETTINGS
@given(good=st.lists(st.tuples(names, st.integers(0, 9), captions), max_size=12), bad=st.lists(junk, max_size=5),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "cp1252"]))
def test_flickr_token_file(tmp_path_factory, good, bad, encoding):
    folder = tmp_path_factory.mktemp("flickr")
    lines = [f"{n}#{k}\t{c}" for n, k, c in good] + bad
    text = "\n".join(lines) + "\n"
    (folder / "Flickr8k.token.txt").write_bytes(text.encode(encoding, errors="replace"))
    records, said = read_with_warnings(read_flickr, folder)
    lines_with_text = [line for line in text.splitlines() if line.strip()]
    if count_captions(records) < len(lines_with_text):
        assert said, "lines were dropped without a warning"
    if records is not None and encoding.startswith("utf-8"):  # well-formed, distinct, non-empty lines all arrive
        got = {(r.image.name, c) for r in records for c in r.captions}
        ids = {}
        for n, k, c in good:
            ids.setdefault(f"{n}#{k}", (n, " ".join(c.split())))
        assert {p for p in ids.values() if p[1]} <= got


@SETTINGS
@given(rows=st.lists(st.lists(st.text(max_size=30), min_size=0, max_size=4), max_size=12),
       header=st.sampled_from([["image", "caption"], ["image", "caption", "split"], ["file", "text"], ["a", "b"]]))
def test_csv_file(tmp_path_factory, rows, header):
    path = tmp_path_factory.mktemp("csv") / "captions.csv"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    path.write_text(buf.getvalue(), encoding="utf-8")
    records, said = read_with_warnings(read_csv, path)
    nonblank = [r for r in rows if any(x.strip() for x in r)]
    if records is not None and count_captions(records) < len(nonblank):
        assert said, "rows were dropped without a warning"


@SETTINGS
@given(objs=st.lists(st.one_of(
    st.fixed_dictionaries({"image": names, "caption": captions}),
    st.fixed_dictionaries({"image": names, "captions": st.lists(captions, max_size=3)}),
    st.fixed_dictionaries({"image": st.one_of(st.none(), st.integers(), names),
                           "caption": st.one_of(st.none(), captions),
                           "captions": st.one_of(st.text(max_size=10), st.integers(), st.none())}),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)), max_size=10),
    bad=st.lists(junk, max_size=3))
def test_jsonl_file(tmp_path_factory, objs, bad):
    path = tmp_path_factory.mktemp("jsonl") / "captions.jsonl"
    path.write_text("\n".join([json.dumps(o) for o in objs] + bad) + "\n", encoding="utf-8")
    records, said = read_with_warnings(read_jsonl, path)
    nonblank = sum(1 for line in path.read_text().splitlines() if line.strip())
    represented = {r.image.name for r in records or []}
    missing = [o for o in objs if not (isinstance(o.get("image"), str) and o["image"] in represented)]
    if missing or (nonblank > len(objs) and records is not None and len(represented) < nonblank):
        assert said or records is None, "objects were dropped without a warning"
    for r in records or []:
        assert r.captions and all(isinstance(c, str) and c for c in r.captions)


@SETTINGS
@given(images=st.lists(st.one_of(
    st.fixed_dictionaries({"filename": names, "split": st.sampled_from(["train", "val", "test", "restval", ""]),
                           "sentences": st.lists(st.fixed_dictionaries({"raw": captions}), max_size=3)}),
    st.dictionaries(st.sampled_from(["filename", "sentences", "split"]),
                    st.one_of(st.none(), st.integers(), st.text(max_size=8), st.lists(st.integers(), max_size=2))),
    st.integers()), max_size=8))
def test_karpathy_file(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("karpathy") / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images}), encoding="utf-8")
    records, said = read_with_warnings(read_karpathy, path)
    for r in records or []:
        assert r.split in ("train", "val", "test", "") and r.captions


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_tokenize_never_fails_and_is_stable(text):
    words = tokenize(text)
    assert all(w and w == w.lower() and not any(ch.isspace() for ch in w) for w in words)
    assert tokenize(" ".join(words)) == words


@settings(max_examples=100, deadline=None)
@given(corpus=st.lists(st.text(max_size=40), min_size=1, max_size=20), text=st.text(max_size=60))
def test_encode_decode_round_trip(corpus, text):
    vocab = Vocabulary.build(corpus, min_count=1)
    ids = vocab.encode(text)
    assert ids[0] == vocab.start and ids[-1] == vocab.end
    known = [w if w in vocab.stoi and w not in ("<pad>", "<start>", "<end>") else "<unk>" for w in tokenize(text)]
    assert vocab.decode(ids) == join_words(known)  # Chinese and Japanese characters join without spaces
