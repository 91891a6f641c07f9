"""Dataset mixer: fractions, counts, JSON form, local files and folders, mix dir, and bad inputs."""
import json

import datasets
import pytest

from tulu.chat import DataError
from tulu.data import build_sft_data
from tulu.mixer import load_mixture, load_source, parse_mixer
from tulu.model import load_tokenizer


def _msgs(i):
    return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]


@pytest.fixture()
def files(tmp_path):
    rows = [{"messages": _msgs(i)} for i in range(40)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:20]) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows[20:]))
    datasets.Dataset.from_list(rows[:10]).to_parquet(str(tmp_path / "c.parquet"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "part1.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:5]))
    (folder / "part2.jsonl").write_text("\n".join(json.dumps(r) for r in rows[5:12]))
    return tmp_path


def test_parse_list_and_json_forms():
    assert parse_mixer(["x", "1.0", "y", "5000", "z", "0.25"]) == {"x": 1.0, "y": 5000, "z": 0.25}
    assert parse_mixer(mixer='{"x": 0.5, "y": 3}') == {"x": 0.5, "y": 3}
    # `1` is the whole dataset (the original read 1 as a fraction unless another value was a count > 1)
    assert parse_mixer(["x", "1"]) == parse_mixer(mixer='{"x": 1}') == {"x": 1.0}
    for bad in (["x"], ["x", "abc"], ["x", "1.5"], ["x", "0"]):
        with pytest.raises(ValueError):
            parse_mixer(bad)
    with pytest.raises(ValueError, match="exactly one"):
        parse_mixer(["x", "1.0"], '{"x": 1.0}')


def test_fractions_counts_local_files_folders_and_mix_dir(files, tmp_path):
    mixer = {str(files / "a.jsonl"): 0.5, str(files / "b.json"): 7, str(files / "c.parquet"): 1.0,
             str(files / "folder"): 12}
    parts = load_mixture(mixer, mix_dir=str(tmp_path / "mix"))
    assert [len(ds) for _, ds in parts] == [10, 7, 10, 12]
    # seed-42 shuffle, then the first rows: a subset of the source, no duplicates
    a_contents = {m[0]["content"] for m in parts[0][1]["messages"]}
    assert len(a_contents) == 10 and a_contents <= {f"q{i}" for i in range(20)}
    assert {r["id"] for r in parts[3][1]} == {f"{files / 'folder'}_{i}" for i in range(12)}
    written = [json.loads(x) for x in (tmp_path / "mix" / "mixed_ds_train.jsonl").read_text().splitlines()]
    assert len(written) == 39 and all("messages" in r and "id" in r for r in written)


def test_embedded_synthetic_names_load():
    assert len(load_source("tulu/synth-sft")) == 4000
    assert set(load_source("tulu/synth-pref-eval").column_names) >= {"chosen", "rejected"}


@pytest.mark.parametrize("content, error", [
    ('{"messages": []}', "row 0 .*field 'messages' must be a non-empty list"),
    ('{"text": "x"}', "row 0 .*missing field 'messages'"),
    ('{"messages": [{"content": "x"}]}', "row 0 .*field 'messages\\[0\\]' needs 'role' and 'content'"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "row 0 .*messages\\[0\\].role' is 'bot'"),
])
def test_bad_rows_name_dataset_row_and_field_or_are_skipped(tmp_path, content, error):
    tok = load_tokenizer("tulu/tiny")
    good = json.dumps({"messages": _msgs(0)})
    path = tmp_path / "bad.jsonl"
    path.write_text(content + "\n" + good + "\n")
    with pytest.raises(DataError, match=error) as info:
        build_sft_data({str(path): 1.0}, tok, 64)
    assert str(path) in str(info.value)
    data = build_sft_data({str(path): 1.0}, tok, 64, skip_bad_rows=True)
    assert len(data) == 1 and data.skipped == 1


def test_unreadable_json_missing_file_and_unknown_name(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(DataError, match="broken.jsonl, line 2: unreadable JSON"):
        load_source(str(path))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_source(str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="not an embedded name"):
        load_source("no-such-org/no-such-dataset")
    with pytest.raises(DataError, match="asks for 100 rows but it has 1"):
        (tmp_path / "one.jsonl").write_text(json.dumps({"messages": _msgs(0)}))
        load_mixture({str(tmp_path / "one.jsonl"): 100})


def test_tokenization_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("TULU_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer("tulu/tiny")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"messages": _msgs(i)}) for i in range(5)))
    first = build_sft_data({str(path): 1.0}, tok, 64)
    cached = list((tmp_path / "cache" / "tokenized").iterdir())
    second = build_sft_data({str(path): 1.0}, tok, 64)
    assert len(cached) == 1 and list((tmp_path / "cache" / "tokenized").iterdir()) == cached
    assert first.ds["input_ids"] == second.ds["input_ids"]
    build_sft_data({str(path): 1.0}, tok, 32)  # another max length is another cache entry
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 2


def test_integer_one_takes_the_whole_dataset(files):
    parts = load_mixture(parse_mixer([str(files / "a.jsonl"), "1"]))
    assert len(parts[0][1]) == 20


def test_sources_with_conflicting_columns_and_foreign_ids_mix(tmp_path, monkeypatch):
    """Sources are tokenized one by one, so columns we never read may disagree (a string `source`
    here, an int there); integer and missing ids become strings, and errors still name the row."""
    monkeypatch.setenv("TULU_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer("tulu/tiny")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"messages": _msgs(i), "source": "web", "id": 100 + i}) for i in range(6)))
    b.write_text("\n".join(json.dumps({"messages": _msgs(i), "source": 7, **({"id": f"b{i}"} if i % 2 else {})})
                           for i in range(4)))
    data = build_sft_data({str(a): 1.0, str(b): 1.0}, tok, 64)
    assert len(data) == 10
    assert sorted(data.ds["id"]) == sorted([str(100 + i) for i in range(6)] + ["b1", "b3", f"{b}_0", f"{b}_2"])
    # the rows are the sources' rows: decode one and find its question
    assert {tok.decode(ids).split("q")[1][0] for ids in data.ds["input_ids"]} <= set("012345")
    rows = [json.dumps({"messages": _msgs(0), "id": 5}), json.dumps({"messages": [], "id": 6})]
    (tmp_path / "bad.jsonl").write_text("\n".join(rows))
    with pytest.raises(DataError, match=r"bad.jsonl', row 1 \(id 6\): field 'messages' must be a non-empty list"):
        build_sft_data({str(tmp_path / "bad.jsonl"): 1.0}, tok, 64)


def test_mix_dir_is_written_on_a_cache_hit_too(files, tmp_path, monkeypatch):
    monkeypatch.setenv("TULU_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer("tulu/tiny")
    mixer = {str(files / "a.jsonl"): 0.5}
    build_sft_data(mixer, tok, 64)
    build_sft_data(mixer, tok, 64, mix_dir=str(tmp_path / "mix"))  # cached tokens; the mix file still appears
    written = [json.loads(x) for x in (tmp_path / "mix" / "mixed_ds_train.jsonl").read_text().splitlines()]
    assert len(written) == 10 and set(written[0]) == {"messages", "id"}


def test_data_with_no_row_left_is_an_error(files, tmp_path, monkeypatch):
    monkeypatch.setenv("TULU_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer("tulu/tiny")
    prompt_only = tmp_path / "long.jsonl"  # every row's assistant turn starts after token 8
    prompt_only.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "word " * 50},
                                                               {"role": "assistant", "content": "a"}]})
                                     for _ in range(3)))
    with pytest.raises(DataError, match=r"no row is left \(3 dropped"):
        build_sft_data({str(prompt_only): 1.0}, tok, 8)
