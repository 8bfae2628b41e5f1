"""Token stores in LongCrawl64's layout, corruption checks, the paper's batching, the embedded corpus."""

import json

import numpy as np
import pytest

from sympow import data
from sympow.data import embedded

DOCUMENTS, ROW = 6, 64


@pytest.fixture
def store(tmp_path):
    """A small store with LongCrawl64's metadata: uint16, zarr v2, blosc-lz4. Token = 1000 * doc + column."""
    tokens = 1000 * np.arange(DOCUMENTS)[:, None] + np.arange(ROW)[None, :] + 1
    data.write_split(str(tmp_path), "train", tokens)
    data.write_split(str(tmp_path), "heldout", tokens[:2])
    return str(tmp_path)


def test_layout_matches_longcrawl64(store):
    meta = json.loads(open(f"{store}/train.zarr/.zarray").read())
    assert meta["dtype"] == "<u2" and meta["zarr_format"] == 2
    assert meta["compressor"]["id"] == "blosc" and meta["compressor"]["cname"] == "lz4"
    array = data.open_split(store, "train")
    assert array.shape == (DOCUMENTS, ROW)


def test_windows_go_column_by_column_with_end_of_text_first(store):
    stream = data.WindowStream(data.open_split(store, "train"), context=16, batch_size=4)
    inputs, targets, mask = stream.next_batch()  # documents 0-3, window 0
    assert mask.all()  # every target of text counts
    np.testing.assert_array_equal(targets[:, 0], [1, 1001, 2001, 3001])
    np.testing.assert_array_equal(inputs[:, 0], data.END_OF_TEXT)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    _, targets, _ = stream.next_batch()  # documents 4, 5 of window 0, then documents 0, 1 of window 1
    np.testing.assert_array_equal(targets[:, 0], [4001, 5001, 17, 1017])
    assert stream.position == 8 and stream.examples == DOCUMENTS * ROW // 16


def test_stream_resumes_from_its_position_and_wraps(store):
    array = data.open_split(store, "train")
    straight = data.WindowStream(array, context=16, batch_size=5)
    batches = [straight.next_batch()[1] for _ in range(6)]  # 30 examples: past one pass of 24
    resumed = data.WindowStream(array, context=16, batch_size=5, position=15)
    for expected in batches[3:]:
        np.testing.assert_array_equal(resumed.next_batch()[1], expected)


def test_each_process_reads_its_own_share(store):
    array = data.open_split(store, "train")
    whole = data.WindowStream(array, context=32, batch_size=4).next_batch()[1]
    streams = [data.WindowStream(array, 32, 4, process_index=i, process_count=2) for i in range(2)]
    shares = [stream.next_batch()[1] for stream in streams]
    np.testing.assert_array_equal(np.concatenate(shares), whole)
    assert [stream.windows_read for stream in streams] == [2, 2]  # its half of the batch, nothing more


def test_missing_chunk_and_bad_ids_are_caught(tmp_path):
    tokens = np.ones((4, 64), np.uint16)
    tokens[2] = 0
    data.write_split(str(tmp_path), "train", tokens)
    stream = data.WindowStream(data.open_split(str(tmp_path), "train"), context=32, batch_size=4)
    with pytest.raises(data.CorruptData, match="all-zero row"):
        stream.next_batch()
    with pytest.raises(data.CorruptData, match="past the model's vocabulary"):
        data.check_tokens(np.array([[5, 50257]], np.uint16), "here")


def test_a_damaged_chunk_is_reported_with_the_array_and_chunk_named(tmp_path):
    data.write_split(str(tmp_path), "train", np.ones((4, 64)))  # one chunk: (0, 0)
    (tmp_path / "train.zarr" / "0.0").write_bytes(b"not what blosc wrote")
    stream = data.WindowStream(data.open_split(str(tmp_path), "train"), context=32, batch_size=2)
    with pytest.raises(data.CorruptData, match=r"train.zarr: documents 0..1, columns 0..: zarr chunk \(0, 0\)"):
        stream.next_batch()


def test_ids_past_a_models_smaller_vocabulary_are_caught(store):
    stream = data.WindowStream(data.open_split(store, "train"), context=16, batch_size=2, vocab_size=1000)
    with pytest.raises(data.CorruptData, match=r"token id 1016 is past the model's vocabulary \(ids 0..999\)"):
        stream.next_batch()  # documents 0 and 1: ids up to 1016


def test_a_store_with_no_documents_is_refused_when_opened(tmp_path):
    data.write_split(str(tmp_path), "heldout", np.ones((0, 64)))
    with pytest.raises(data.CorruptData, match="holds no tokens"):
        data.open_split(str(tmp_path), "heldout")


def test_bad_arguments(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no token array"):
        data.open_split(str(tmp_path / "nowhere"), "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.open_split(store, "valid")
    with pytest.raises(ValueError, match="must divide the row length"):
        data.WindowStream(data.open_split(store, "train"), context=48, batch_size=2)


def test_gpt2_tokeniser():
    encoding = data.gpt2_encoding()
    assert encoding.n_vocab == data.VOCAB_SIZE
    assert encoding.encode("Hello world") == [15496, 995]
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [data.END_OF_TEXT]


def test_embedded_corpus_build(tmp_path):
    sources = embedded.stdlib_sources()
    assert len(sources) > 500 and all(p.suffix == ".py" for p in sources)
    root = embedded.build(tmp_path / "corpus", sources[:20], row_length=1024)
    train, heldout = data.open_split(str(root), "train"), data.open_split(str(root), "heldout")
    assert train.shape[1] == heldout.shape[1] == 1024 and train.shape[0] >= 1 and heldout.shape[0] >= 1
    tokens = np.concatenate([train[:], heldout[:]])
    data.check_tokens(tokens, "embedded")
    assert np.sum(tokens == data.END_OF_TEXT) >= 10  # documents are separated
    text = data.gpt2_encoding().decode(train[0].tolist())
    assert "def " in text or "import " in text


def test_hugging_face_dataset_is_streamed_tokenised_and_packed_offline(tmp_path, monkeypatch):
    """`--data hf:NAME` on a local folder of JSON lines, with the hub switched off."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SYMPOW_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "my_texts"
    folder.mkdir()
    lines = [json.dumps({"text": f"Document number {i} says hello to the world. " * 20}) for i in range(40)]
    (folder / "train.jsonl").write_text("\n".join(lines))
    root = data.hf_store(str(folder), max_rows=3, row_length=2048)
    train, heldout = data.open_split(root, "train"), data.open_split(root, "heldout")
    assert (train.shape, heldout.shape) == ((2, 2048), (1, 2048))
    assert "hello to the world" in data.gpt2_encoding().decode(train[0].tolist())
    assert data.hf_store(str(folder), max_rows=3, row_length=2048) == root  # cached: built once
    with pytest.raises(FileNotFoundError, match="could not read the Hugging Face dataset 'no-such/dataset'.*offline"):
        data.hf_store("no-such/dataset")


def test_embedded_corpus_as_bytes(tmp_path):
    sources = embedded.stdlib_sources()[:10]
    root = embedded.build(tmp_path / "bytes", sources, row_length=1024, vocabulary="bytes")
    train, heldout = data.open_split(str(root), "train"), data.open_split(str(root), "heldout")
    tokens = np.concatenate([train[:], heldout[:]])
    data.check_tokens(tokens, "embedded-bytes", vocab_size=256)
    # Every byte of the sources is there (less the dropped tail), each file ending in byte 0.
    stream = b"".join(p.read_bytes() + b"\0" for p in sources)
    assert tokens.size == len(stream) // 1024 * 1024
    assert np.sum(tokens == 0) in (len(sources), len(sources) - 1)
    assert bytes(train[0].tolist()).decode("utf-8", errors="replace").count("def ") > 0
    assert data.vocab_size("embedded-bytes") == 256 and data.vocab_size("embedded") == data.VOCAB_SIZE


def test_byte_windows_start_with_byte_zero(tmp_path):
    rows = np.arange(2 * 64).reshape(2, 64) % 255 + 1
    data.write_split(str(tmp_path), "train", rows)
    stream = data.WindowStream(data.open_split(str(tmp_path), "train"), 16, 2, vocab_size=256)
    inputs, targets, _ = stream.next_batch()
    np.testing.assert_array_equal(inputs[:, 0], [0, 0])
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    with pytest.raises(data.CorruptData, match="past the model's vocabulary"):
        data.WindowStream(data.open_split(str(tmp_path), "train"), 16, 2, vocab_size=64).next_batch()
