"""Any Hugging Face text dataset as a token store: streamed, tokenised with GPT-2 BPE, packed
into rows in LongCrawl64's layout and cached, so training reads it like LongCrawl64.

`--data hf:NAME` (a hub name, or a local folder or script that `datasets.load_dataset` accepts);
`hf:NAME:CONFIG` picks a configuration. Only the first `max_rows` rows are packed."""

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sympow.data.embedded import pack_rows, write_store
from sympow.data.store import ROW_LENGTH
from sympow.data.tokenizer import END_OF_TEXT, cache_dir, gpt2_encoding

DEFAULT_MAX_ROWS = 256


def token_stream(records: Iterable[dict], text_field: str, needed: int) -> np.ndarray:
    """The first `needed` tokens of the records' texts, each text followed by end-of-text."""
    encoding, pieces, count = gpt2_encoding(), [], 0
    with tqdm(total=needed, desc="tokenising", unit="tok", unit_scale=True) as progress:
        for record in records:
            if text_field not in record:
                raise KeyError(f"records have no {text_field!r} field; they have {sorted(record)}")
            ids = np.asarray(encoding.encode_ordinary(record[text_field]) + [END_OF_TEXT], np.uint16)
            pieces.append(ids)
            count += len(ids)
            progress.update(len(ids))
            if count >= needed:
                break
    return np.concatenate(pieces) if pieces else np.zeros(0, np.uint16)


def pack_records(
    records: Iterable[dict], root: Path, *, text_field="text", row_length=ROW_LENGTH, max_rows=DEFAULT_MAX_ROWS, seed=0
) -> Path:
    """Write train.zarr and heldout.zarr under root from an iterable of records (a streamed dataset)."""
    rows = pack_rows(token_stream(records, text_field, row_length * max_rows), row_length, seed)
    return write_store(root, rows, f"the dataset (rows of {row_length} tokens)")


def hf_store(spec: str, *, max_rows=DEFAULT_MAX_ROWS, row_length=ROW_LENGTH) -> str:
    """The cached store for "NAME" or "NAME:CONFIG", packing the streamed dataset on first use."""
    import datasets  # imported here: it is slow to import and only this path needs it

    name, _, config = spec.partition(":")
    key = hashlib.sha1(f"{spec}|{max_rows}|{row_length}".encode()).hexdigest()[:12]
    root = cache_dir() / "hf" / f"{Path(name).name}-{key}"
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        try:
            records = datasets.load_dataset(name, config or None, split="train", streaming=True)
            pack_records(records, root, row_length=row_length, max_rows=max_rows)
        except Exception as error:  # the hub's, the network's or the records': all stop the run the same way
            raise FileNotFoundError(
                f"could not read the Hugging Face dataset {spec!r} ({type(error).__name__}: {error}); "
                "is this machine offline, or the name wrong?"
            ) from error
    return str(root)
