import json

import pytest

from almak.errors import AlmakError
from almak.modeling.text.data import WMT22_PAIRS, calibration_pairs, load_testset, load_testsets, read_lines


@pytest.mark.parametrize("pair", WMT22_PAIRS)
def test_bundled_wmt22(pair):
    ts = load_testset(f"wmt22:{pair}")
    assert ts.lang_pair == pair and len(ts.sources) == len(ts.references) > 1000
    assert all(isinstance(s, str) and s for s in ts.sources[:50])


def test_head_and_bad_limit():
    assert len(load_testset("wmt22:de-en").head(5).sources) == 5
    with pytest.raises(AlmakError, match="--limit must be positive"):
        load_testset("wmt22:de-en").head(0)


def test_alma_json_array_and_jsonl(tmp_path):
    recs = [{"translation": {"de": "Hallo", "en": "Hello"}}, {"translation": {"de": "Welt", "en": "World"}}]
    (tmp_path / "test.de-en.json").write_text(json.dumps(recs), encoding="utf-8")
    ts = load_testset(str(tmp_path / "test.de-en.json"))
    assert (ts.src, ts.tgt, ts.sources, ts.references) == ("de", "en", ["Hallo", "Welt"], ["Hello", "World"])
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in recs), encoding="utf-8")
    ts = load_testset(str(tmp_path / "pairs.jsonl"), "en-de")  # direction from the caller
    assert ts.sources == ["Hello", "World"]
    with pytest.raises(AlmakError, match="cannot tell the direction"):
        load_testset(str(tmp_path / "pairs.jsonl"))


def test_course_project_jsonl_uses_ref_not_mt(tmp_path):
    rows = [{"langs": "en-de", "src": "Hi", "ref": "Hallo", "mt": "Servus"},
            {"langs": "en-ru", "src": "Hi", "ref": "Привет", "mt": "x"}]
    path = tmp_path / "subset.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    ts = load_testset(str(path), "en-de")
    assert ts.sources == ["Hi"] and ts.references == ["Hallo"]
    with pytest.raises(AlmakError, match="several directions"):
        load_testset(str(path))


def test_shared_course_project_file_reads():
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[4] / "shared/data/wmt24/subset_6ff2c07_with_refA.jsonl"
    if not path.is_file():
        pytest.skip("../shared is not beside this checkout")
    ts = load_testset(str(path), "en-ru")
    assert ts.src == "en" and ts.tgt == "ru" and len(ts.sources) > 0


def test_tsv(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("Hallo\tHello\nWelt\tWorld\n", encoding="utf-8")
    assert load_testset(str(path), "de-en").references == ["Hello", "World"]
    path.write_text("Hallo\n", encoding="utf-8")
    with pytest.raises(AlmakError, match="line 1 does not have exactly two"):
        load_testset(str(path), "de-en")


def test_tsv_direction_from_its_name(tmp_path):
    path = tmp_path / "news.en-de.tsv"
    path.write_text("Hello\tHallo\n", encoding="utf-8")
    assert load_testset(str(path)).lang_pair == "en-de"
    assert load_testset(str(path), "de-en").lang_pair == "de-en"  # --lang-pair wins, as for ALMA's files
    unnamed = tmp_path / "t.tsv"
    unnamed.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(AlmakError, match="needs --lang-pair"):
        load_testset(str(unnamed))


def test_several_test_sets(tmp_path):
    assert [ts.lang_pair for ts in load_testsets("wmt22:all")] == list(WMT22_PAIRS)
    path = tmp_path / "mine.de-en.tsv"
    path.write_text("Hallo\tHello\n", encoding="utf-8")
    testsets = load_testsets(f"wmt22:en-zh, {path}")
    assert [(ts.name, ts.lang_pair) for ts in testsets] == [("wmt22:en-zh", "en-zh"), (str(path), "de-en")]
    with pytest.raises(AlmakError, match=r"names the direction de-en twice \(wmt22:de-en and .*mine.de-en.tsv\)"):
        load_testsets(f"wmt22:all,{path}")
    with pytest.raises(AlmakError, match="has an empty item"):
        load_testsets("wmt22:de-en,")
    with pytest.raises(AlmakError, match="no bundled WMT22 set 'xx-en'"):
        load_testsets("wmt22:de-en,wmt22:xx-en")


@pytest.mark.parametrize("spec, message", [
    ("wmt22:de-fr", "no bundled WMT22 set"),
    ("nope/missing.json", "neither a bundled set"),
])
def test_bad_specs(spec, message):
    with pytest.raises(AlmakError, match=message):
        load_testset(spec)


def test_empty_and_unrecognised_files(tmp_path):
    (tmp_path / "empty.json").write_text("", encoding="utf-8")
    with pytest.raises(AlmakError, match="is empty"):
        load_testset(str(tmp_path / "empty.json"))
    (tmp_path / "other.json").write_text('[{"a": 1}]', encoding="utf-8")
    with pytest.raises(AlmakError, match="unrecognised format"):
        load_testset(str(tmp_path / "other.json"))
    with pytest.raises(AlmakError, match="does not exist"):
        read_lines(tmp_path / "missing.txt")


def test_calibration_sample_is_bundled():
    pairs = calibration_pairs()
    assert set(pairs) == {"cs", "de", "is", "ru", "zh"}
    assert all(len(v) == 500 and all(a and b for a, b in v) for v in pairs.values())
