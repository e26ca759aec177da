"""Tests for the data stage: ``rdn.data.build_corpus``, ``rdn.data.iter_documents`` and
``python -m stages.data``.

Every expectation is computed here by hand, never taken from the code under test:

* the train/val split is checked against an oracle written below (sha256 of the
  document's posix path relative to the source folder, first 8 bytes big-endian, over
  2**64, compared with ``val_fraction``); rebuilding is byte-identical and adding files
  never moves an existing document;
* shards are read back with pyarrow directly: one ``text`` string column, zstd, row
  groups and shards no larger than configured; the manifest's counts, bytes and
  sha256 are recomputed from the files;
* each source (folder with .txt/.md/.py/.jsonl, parquet, stdlib) yields exactly the
  documents written, with non-UTF-8 files, short documents and null texts counted;
* every bad source raises ``CorpusError`` naming the file (and line) at fault and
  leaves a corpus built earlier byte-for-byte untouched, with no temp dirs left;
* the stage runs end to end as a subprocess, exits 2 on invalid params and non-zero
  on a bad source, keeping earlier artifacts in both cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rdn.config import DataConfig
from rdn.data import CorpusError, build_corpus, iter_documents
from tests.conftest import REPO, run_python

SPLITS = ("train", "val")


# --------------------------------------------------------------------------- helpers

def oracle_is_val(name: str, val_fraction: float) -> bool:
    """The documented split rule, written independently of rdn.data.corpus."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def write_docs(folder: Path, n: int, start: int = 0, prefix: str = "doc", ext: str = ".txt") -> dict[str, str]:
    """``n`` small unique documents spread over nested folders; returns {relative posix name: text}."""
    docs = {}
    for i in range(start, start + n):
        sub = ("", "sub/", "sub/deeper/")[i % 3]
        name = f"{sub}{prefix}_{i:03d}{ext}"
        # non-ASCII on purpose: byte counts must be UTF-8 bytes, not characters
        text = f"Document {prefix} {i}: naïve café 数据 " + "lorem ipsum (dolor) " * (i % 7 + 1)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text.encode("utf-8"))
        docs[name] = text
    return docs


def folder_cfg(path: Path | str, **kw) -> DataConfig:
    kw.setdefault("val_fraction", 0.25)
    kw.setdefault("min_chars", 8)
    return DataConfig(source="folder", path=str(path), **kw)


def shard_files(out: Path, split: str) -> list[Path]:
    return sorted((out / split).glob("*.parquet"))


def read_texts(out: Path, split: str) -> list[str]:
    """Every text of one split, read with pyarrow straight from the files on disk."""
    texts: list[str] = []
    for f in shard_files(out, split):
        texts.extend(pq.read_table(f).column("text").to_pylist())
    return texts


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def hidden_entries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def split_names(names, val_fraction: float) -> tuple[set[str], set[str]]:
    val = {n for n in names if oracle_is_val(n, val_fraction)}
    return set(names) - val, val


def write_parquet(path: Path, table: pa.Table) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# --------------------------------------------------------------------------- 1. deterministic split

def test_split_is_deterministic_matches_oracle_and_is_stable_when_files_are_added(tmp_path: Path):
    src = tmp_path / "src"
    docs = write_docs(src, 60)
    frac = 0.25
    want_train, want_val = split_names(docs, frac)
    assert want_train and want_val, "test setup: the oracle must put documents in both splits"
    cfg = folder_cfg(src, val_fraction=frac, docs_per_shard=8, row_group_docs=3)

    ma = build_corpus(cfg, tmp_path / "a" / "data", seed=7, root=tmp_path)
    mb = build_corpus(cfg, tmp_path / "b" / "data", seed=7, root=tmp_path)
    a, b = tmp_path / "a" / "data", tmp_path / "b" / "data"

    # identical manifests (split part) and byte-identical shards
    assert ma["splits"] == mb["splits"]
    assert json.loads((a / "manifest.json").read_text())["splits"] == ma["splits"]
    for split in SPLITS:
        fa, fb = shard_files(a, split), shard_files(b, split)
        assert [f.name for f in fa] == [f.name for f in fb]
        assert len(fa) >= 2 if split == "train" else len(fa) >= 1
        for x, y in zip(fa, fb):
            assert pq.read_table(x).column("text").to_pylist() == pq.read_table(y).column("text").to_pylist()
            assert x.read_bytes() == y.read_bytes(), f"{split}/{x.name} differs between two builds"

    # membership equals the oracle
    by_text = {t: n for n, t in docs.items()}
    assert {by_text[t] for t in read_texts(a, "val")} == want_val
    assert {by_text[t] for t in read_texts(a, "train")} == want_train

    # another seed reshuffles shards but never moves a document between splits
    build_corpus(cfg, tmp_path / "c" / "data", seed=8, root=tmp_path)
    assert {by_text[t] for t in read_texts(tmp_path / "c" / "data", "val")} == want_val

    # adding files: old documents stay where they were, new ones follow the oracle
    more = write_docs(src, 30, start=60, prefix="new")
    build_corpus(cfg, tmp_path / "d" / "data", seed=7, root=tmp_path)
    all_docs = {**docs, **more}
    by_text = {t: n for n, t in all_docs.items()}
    val_d = {by_text[t] for t in read_texts(tmp_path / "d" / "data", "val")}
    train_d = {by_text[t] for t in read_texts(tmp_path / "d" / "data", "train")}
    assert val_d & set(docs) == want_val
    assert train_d & set(docs) == want_train
    new_train, new_val = split_names(more, frac)
    assert val_d - set(docs) == new_val
    assert train_d - set(docs) == new_train


# --------------------------------------------------------------------------- 2. shard format + manifest

def test_shards_format_manifest_counts_and_iter_documents(tmp_path: Path):
    src = tmp_path / "src"
    docs = write_docs(src, 61)
    short = {"short_1.txt": "tiny", "short_2.md": "1234567"}  # < min_chars=8
    for name, text in short.items():
        (src / name).write_text(text, encoding="utf-8")
    exact = "12345678"  # == min_chars: kept
    (src / "exact.txt").write_text(exact, encoding="utf-8")
    expected = sorted([*docs.values(), exact])

    out = tmp_path / "art" / "data"
    docs_per_shard, row_group_docs = 7, 3
    cfg = folder_cfg(src, val_fraction=0.3, min_chars=8, docs_per_shard=docs_per_shard,
                     row_group_docs=row_group_docs)
    returned = build_corpus(cfg, out, seed=1, root=tmp_path)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["splits"] == returned["splits"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train", "val"]
    assert hidden_entries(out.parent) == []
    assert manifest["skipped"] == {"not_utf8": 0, "too_short": 2, "null_text": 0}

    for split in SPLITS:
        info = manifest["splits"][split]
        listed = [s["file"] for s in info["shards"]]
        assert sorted(listed) == sorted(p.name for p in (out / split).iterdir()), "manifest lists exactly the files"
        total_docs = total_bytes = 0
        for i, shard in enumerate(info["shards"]):
            path = out / split / shard["file"]
            pf = pq.ParquetFile(path)
            assert pf.schema_arrow.names == ["text"]
            assert pf.schema_arrow.field("text").type == pa.string()
            n = pf.metadata.num_rows
            assert n <= docs_per_shard
            if i < len(info["shards"]) - 1:
                assert n == docs_per_shard, "only the last shard of a split may be partial"
            for g in range(pf.metadata.num_row_groups):
                rg = pf.metadata.row_group(g)
                assert 1 <= rg.num_rows <= row_group_docs
                assert rg.column(0).compression == "ZSTD"
            texts = pf.read().column("text").to_pylist()
            assert None not in texts
            nbytes = sum(len(t.encode("utf-8")) for t in texts)
            assert shard["documents"] == n == len(texts)
            assert shard["bytes"] == nbytes
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            total_docs += n
            total_bytes += nbytes
        assert info["documents"] == total_docs
        assert info["bytes"] == total_bytes

    train, val = list(iter_documents(out, "train")), list(iter_documents(out, "val"))
    assert sorted(train + val) == expected
    assert len(train) + len(val) == len(expected), "no document twice"
    # iter_documents yields the same texts as the files hold, shard by shard in manifest order
    for split, got in (("train", train), ("val", val)):
        want = []
        for shard in manifest["splits"][split]["shards"]:
            want.extend(pq.read_table(out / split / shard["file"]).column("text").to_pylist())
        assert got == want
    names = {**{n: t for n, t in docs.items()}, "exact.txt": exact}
    assert sorted(val) == sorted(t for n, t in names.items() if oracle_is_val(n, 0.3))

    with pytest.raises(ValueError):
        list(iter_documents(out, "test"))


# --------------------------------------------------------------------------- 3. sources

JSONL_LINES = [
    json.dumps({"text": "jsonl object document one", "meta": {"id": 1}}),
    "",
    json.dumps("a jsonl line that is a bare JSON string"),
    json.dumps({"text": "x"}),  # too short
    json.dumps({"text": 'line with "quotes", a newline\nand unicode é', "other": None}),
]
JSONL_TEXTS = ["jsonl object document one", "a jsonl line that is a bare JSON string",
               'line with "quotes", a newline\nand unicode é']


def make_mixed_folder(src: Path) -> dict[str, str]:
    """Files of every kind; returns {relative name: text} of the one-document-per-file ones."""
    files = {
        "a.txt": "plain text document number one",
        "b.md": "# Title\n\nSome *markdown* body text.\n",
        "code/c.py": "def add(a, b):\n    return (a + b)\n",
        "crlf.txt": "windows line\r\nendings are kept\r\n",
    }
    for name, text in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(text.encode("utf-8"))
    (src / "d.jsonl").write_text("\n".join(JSONL_LINES) + "\n", encoding="utf-8")
    (src / "e.rst").write_text("restructured text is not in the extension list", encoding="utf-8")
    (src / "bad.txt").write_bytes(b"\xff\xfe bad")
    (src / "short.txt").write_text("tiny", encoding="utf-8")
    (src / ".hidden").mkdir()
    (src / ".hidden" / "secret.txt").write_text("hidden folder document must be ignored", encoding="utf-8")
    fillers = {}
    for i in range(30):
        fillers.update(write_docs(src, 1, start=i, prefix="fill", ext=(".txt", ".md")[i % 2]))
    return {**files, **fillers}


def all_texts(out: Path) -> list[str]:
    return sorted(read_texts(out, "train") + read_texts(out, "val"))


def test_folder_source_mixed_kinds(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    files = make_mixed_folder(src)
    cfg = folder_cfg(src, val_fraction=0.3, min_chars=8)
    m = build_corpus(cfg, tmp_path / "out", seed=3, root=tmp_path)
    assert all_texts(tmp_path / "out") == sorted([*files.values(), *JSONL_TEXTS])
    assert m["skipped"] == {"not_utf8": 1, "too_short": 2, "null_text": 0}
    # the one-document files also follow the split rule
    val = set(read_texts(tmp_path / "out", "val"))
    for name, text in files.items():
        assert (text in val) == oracle_is_val(name, 0.3), name


def test_folder_source_extensions_filter(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    files = make_mixed_folder(src)
    md = {n: t for n, t in files.items() if n.endswith(".md")}
    train, val = split_names(md, 0.3)
    assert train and val, "test setup: both splits need a .md document"
    cfg = folder_cfg(src, val_fraction=0.3, min_chars=8, extensions=[".md", ".jsonl"])
    m = build_corpus(cfg, tmp_path / "out", seed=3, root=tmp_path)
    assert all_texts(tmp_path / "out") == sorted([*md.values(), *JSONL_TEXTS])
    # bad.txt and short.txt are not even read
    assert m["skipped"] == {"not_utf8": 0, "too_short": 1, "null_text": 0}


def test_jsonl_with_unicode_line_separators_inside_strings(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    texts = ["first paragraph\u2028second paragraph", "next line\x85after NEL", "para\u2029graph separator"]
    # json.dumps(ensure_ascii=False) legally leaves these characters raw inside the string
    (src / "web.jsonl").write_text("\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\n",
                                   encoding="utf-8")
    fillers = write_docs(src, 20)
    build_corpus(folder_cfg(src, val_fraction=0.3), tmp_path / "out", seed=0, root=tmp_path)
    assert all_texts(tmp_path / "out") == sorted([*texts, *fillers.values()])


def test_parquet_source(tmp_path: Path):
    src = tmp_path / "pq"
    fill = [f"parquet filler document {i} with (brackets) [{i}]" for i in range(30)]
    t1 = ["parquet doc one, long enough", None, "tiny", *fill[:15]]
    write_parquet(src / "p1.parquet", pa.table({"id": pa.array(range(len(t1)), pa.int64()), "text": t1}))
    t2 = ["nested large_string document ü", *fill[15:]]
    write_parquet(src / "nested" / "p2.parquet",
                  pa.table({"text": pa.array(t2, pa.large_string()), "score": [0.5] * len(t2)}))
    (src / "README.txt").write_text("not a parquet file, ignored by the parquet source", encoding="utf-8")

    m = build_corpus(DataConfig(source="parquet", path="pq", val_fraction=0.3, min_chars=8),
                     tmp_path / "out", seed=5, root=tmp_path)
    want = [t for t in t1 + t2 if t is not None and len(t) >= 8]
    assert all_texts(tmp_path / "out") == sorted(want)
    assert m["skipped"] == {"not_utf8": 0, "too_short": 1, "null_text": 1}


def test_text_column_option(tmp_path: Path):
    src = tmp_path / "pq"
    texts = [f"content column document number {i}" for i in range(30)]
    write_parquet(src / "a.parquet", pa.table({"text": ["wrong column"] * 30, "content": texts}))
    build_corpus(DataConfig(source="parquet", path=str(src), text_column="content", val_fraction=0.3),
                 tmp_path / "out", seed=5, root=tmp_path)
    assert all_texts(tmp_path / "out") == sorted(texts)

    jsrc = tmp_path / "js"
    jsrc.mkdir()
    (jsrc / "a.jsonl").write_text("".join(json.dumps({"body": t, "text": "no"}) + "\n" for t in texts))
    build_corpus(DataConfig(source="folder", path=str(jsrc), text_column="body", val_fraction=0.3),
                 tmp_path / "out2", seed=5, root=tmp_path)
    assert all_texts(tmp_path / "out2") == sorted(texts)


def _stdlib_hashes() -> tuple[set[str], set[str]]:
    """sha256 of every stdlib .py text outside and inside test folders (independent walk)."""
    root = Path(os.__file__).resolve().parent
    normal, tests = set(), set()
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts[:-1]
        if {"site-packages", "dist-packages", "__pycache__"} & set(parts):
            continue
        try:
            digest = hashlib.sha256(path.read_bytes().decode("utf-8").encode("utf-8")).hexdigest()
        except UnicodeDecodeError:
            continue
        (tests if {"test", "tests", "idle_test"} & set(parts) else normal).add(digest)
    return normal, tests - normal


def test_stdlib_source(tmp_path: Path):
    normal, test_only = _stdlib_hashes()
    cfg = DataConfig(source="stdlib", include_tests=False, max_total_bytes=2_000_000, val_fraction=0.1)
    m = build_corpus(cfg, tmp_path / "a", seed=1, root=tmp_path)
    docs = all_texts(tmp_path / "a")
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert 2_000_000 <= total < 2_000_000 + 2_000_000, "stops soon after max_total_bytes"
    assert m["splits"]["train"]["bytes"] + m["splits"]["val"]["bytes"] == total
    assert len(docs) >= 20
    assert sum(("def " in d or "class " in d or "import " in d) for d in docs) >= 0.8 * len(docs)
    assert sum("def " in d for d in docs) >= len(docs) // 3
    hashes = {hashlib.sha256(d.encode("utf-8")).hexdigest() for d in docs}
    assert hashes <= normal | test_only, "every document is a stdlib file's text"
    assert not hashes & test_only, "include_tests=False must not read test folders"

    if test_only:  # the interpreter ships its test suite: include_tests=True must read some of it
        cfg = DataConfig(source="stdlib", include_tests=True, max_total_bytes=2_000_000, val_fraction=0.1)
        build_corpus(cfg, tmp_path / "b", seed=1, root=tmp_path)
        with_tests = {hashlib.sha256(d.encode("utf-8")).hexdigest() for d in all_texts(tmp_path / "b")}
        assert with_tests & test_only


# --------------------------------------------------------------------------- 4. errors keep earlier work

def _case_missing(tmp: Path):
    return folder_cfg("no_such_folder"), [str((tmp / "no_such_folder").resolve())]


def _case_file(tmp: Path):
    f = tmp / "a_file.txt"
    f.write_text("I am a file, not a folder", encoding="utf-8")
    return folder_cfg(f), [str(f.resolve())]


def _case_empty(tmp: Path):
    d = tmp / "empty"
    d.mkdir()
    (d / "data.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    return folder_cfg(d), ["empty corpus", str(d.resolve())]


def _case_corrupt_parquet(tmp: Path):
    d = tmp / "pq"
    write_parquet(d / "good.parquet", pa.table({"text": [f"good parquet document {i}" for i in range(40)]}))
    (d / "broken.parquet").write_bytes(os.urandom(2048))
    return DataConfig(source="parquet", path=str(d)), [str((d / "broken.parquet").resolve())]


def _case_parquet_no_column(tmp: Path):
    d = tmp / "pq"
    write_parquet(d / "a.parquet", pa.table({"text": [f"good parquet document {i}" for i in range(40)]}))
    write_parquet(d / "z_body.parquet", pa.table({"body": ["text lives elsewhere here"]}))
    return DataConfig(source="parquet", path=str(d)), [str((d / "z_body.parquet").resolve()), "'text'"]


def _jsonl_case(tmp: Path, bad_line: str):
    d = tmp / "js"
    write_docs(d, 60)  # many good files, so the failure comes mid-build
    lines = [json.dumps({"text": "first good jsonl document"}), json.dumps("second good jsonl document"), bad_line]
    (d / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder_cfg(d), [f"{(d / 'bad.jsonl').resolve()}:3"]


def _case_jsonl_invalid(tmp: Path):
    return _jsonl_case(tmp, '{"text": "unterminated')


def _case_jsonl_number(tmp: Path):
    return _jsonl_case(tmp, "42")


def _case_jsonl_missing_key(tmp: Path):
    return _jsonl_case(tmp, json.dumps({"content": "the text key is missing"}))


def _case_all_too_short(tmp: Path):
    d = tmp / "short"
    d.mkdir()
    for i in range(20):
        (d / f"s{i}.txt").write_text(f"tiny {i}", encoding="utf-8")
    return folder_cfg(d, min_chars=100), ["empty corpus"]


ERROR_CASES = {
    "path_missing": _case_missing,
    "path_is_file": _case_file,
    "empty_folder": _case_empty,
    "corrupt_parquet": _case_corrupt_parquet,
    "parquet_without_text_column": _case_parquet_no_column,
    "jsonl_invalid_json": _case_jsonl_invalid,
    "jsonl_number": _case_jsonl_number,
    "jsonl_missing_key": _case_jsonl_missing_key,
    "all_too_short": _case_all_too_short,
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_source_raises_and_keeps_earlier_corpus(tmp_path: Path, case: str):
    good = tmp_path / "good"
    write_docs(good, 30)
    out = tmp_path / "artifacts" / "data"
    build_corpus(folder_cfg(good, val_fraction=0.3), out, seed=0, root=tmp_path)
    before = snapshot(out)
    assert "manifest.json" in before and len(before) >= 3
    assert hidden_entries(out.parent) == []

    cfg, needles = ERROR_CASES[case](tmp_path)
    with pytest.raises(CorpusError) as info:
        build_corpus(cfg, out, seed=0, root=tmp_path)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in error message {msg!r}"
    assert snapshot(out) == before, "a failed build must leave the earlier corpus untouched"
    assert hidden_entries(out.parent) == [], "no temp dirs left beside out_dir"
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]


# --------------------------------------------------------------------------- 5. the stage as a subprocess

def write_params(project: Path, **data) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["data"].update(data)
    return params


def dump(project: Path, params: dict) -> None:
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def check_stage_outputs(project: Path, docs: dict[str, str], frac: float) -> dict:
    manifest = json.loads((project / "artifacts" / "data" / "manifest.json").read_text(encoding="utf-8"))
    metrics = json.loads((project / "metrics" / "data.json").read_text(encoding="utf-8"))
    t, v = manifest["splits"]["train"], manifest["splits"]["val"]
    assert metrics["train_documents"] == t["documents"]
    assert metrics["val_documents"] == v["documents"]
    assert metrics["train_bytes"] == t["bytes"]
    assert metrics["val_bytes"] == v["bytes"]
    assert metrics["shards"] == len(t["shards"]) + len(v["shards"])
    for k, n in manifest["skipped"].items():
        assert metrics[f"skipped_{k}"] == n
    # and against hand-made figures
    train, val = split_names(docs, frac)
    assert metrics["val_documents"] == len(val)
    assert metrics["train_documents"] == len(train)
    assert metrics["train_bytes"] + metrics["val_bytes"] == sum(len(x.encode("utf-8")) for x in docs.values())
    assert metrics["skipped_not_utf8"] == 1
    return metrics


def test_stage_end_to_end_invalid_params_and_bad_source(project: Path):
    docs = write_docs(project / "corpus", 40)
    (project / "corpus" / "binary.txt").write_bytes(b"\xff\xfe bad")
    frac = 0.3
    params = write_params(project, source="folder", path="corpus", val_fraction=frac, docs_per_shard=10,
                          row_group_docs=4)
    params["tracking"]["enabled"] = False
    dump(project, params)

    r = run_python("-m", "stages.data", cwd=project, timeout=120)
    assert r.returncode == 0, r.stderr
    check_stage_outputs(project, docs, frac)
    assert not (project / "mlflow").exists(), "tracking disabled: no MLflow files"
    before = snapshot(project / "artifacts")
    metrics_before = (project / "metrics" / "data.json").read_bytes()

    # invalid params: exit 2, the key is named, nothing touched
    bad = json.loads(json.dumps(params))
    bad["data"]["val_fraction"] = 2
    dump(project, bad)
    r = run_python("-m", "stages.data", cwd=project, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "data.val_fraction" in r.stderr
    assert snapshot(project / "artifacts") == before
    assert (project / "metrics" / "data.json").read_bytes() == metrics_before

    # bad source: non-zero exit naming the folder, nothing touched
    bad = json.loads(json.dumps(params))
    bad["data"]["path"] = "gone_folder"
    dump(project, bad)
    r = run_python("-m", "stages.data", cwd=project, timeout=120)
    assert r.returncode != 0
    assert str(project.resolve() / "gone_folder") in r.stderr
    assert snapshot(project / "artifacts") == before
    assert hidden_entries(project / "artifacts") == []
    assert (project / "metrics" / "data.json").read_bytes() == metrics_before


def test_stage_with_default_sqlite_tracking(project: Path):
    docs = write_docs(project / "corpus", 30)
    (project / "corpus" / "binary.txt").write_bytes(b"\xff\xfe bad")
    frac = 0.3
    params = write_params(project, source="folder", path="corpus", val_fraction=frac)
    assert params["tracking"]["enabled"] is True and params["tracking"]["uri"] is None
    dump(project, params)

    r = run_python("-m", "stages.data", cwd=project, timeout=180)
    assert r.returncode == 0, r.stderr
    metrics = check_stage_outputs(project, docs, frac)

    db = project / "mlflow" / "mlflow.db"
    assert db.is_file()
    with sqlite3.connect(db) as con:
        runs = con.execute("SELECT run_uuid, name, status FROM runs").fetchall()
        assert len(runs) == 1 and runs[0][1:] == ("data", "FINISHED")
        run_id = runs[0][0]
        latest = dict(con.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)))
        logged = dict(con.execute("SELECT key, value FROM params WHERE run_uuid = ?", (run_id,)))
    assert latest["data/train_documents"] == metrics["train_documents"]
    assert latest["data/val_documents"] == metrics["val_documents"]
    assert latest["data/val_bytes"] == metrics["val_bytes"]
    assert logged["data.source"] == "folder"
    assert logged["data.path"] == "corpus"
    assert logged["data.val_fraction"] == "0.3"
    assert logged["run.seed"] == "1337"
    uploaded = list((project / "mlflow").rglob("manifest.json"))
    assert len(uploaded) == 1
    assert uploaded[0].read_bytes() == (project / "artifacts" / "data" / "manifest.json").read_bytes()
