import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage

from conftest import logged
from minigpt.data.conversation import Image, Text
from minigpt.data.formats import (
    ALIGNMENT_INSTRUCTIONS,
    MixedDataset,
    MixedStream,
    SampleList,
    WebDatasetReader,
    read_captions_json,
    read_cc_sbu_align,
    read_dataset,
    read_llava_json,
    read_minigpt4qwen_json,
    read_mixture,
    read_webdataset,
    resolve_image,
)
from minigpt.data.images import load_image


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def jpeg_bytes(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (8, 6), color).save(buf, "JPEG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def roles_and_parts(sample):
    return [(t.role, t.parts) for t in sample.conversation.turns]


# ------------------------------------------------------------------------------------------ LLaVA


def test_llava_parses_turns_images_and_origins(tmp_path):
    path = write_json(
        tmp_path / "llava.json",
        [
            {
                "id": "000000033471",
                "image": "coco/33471.jpg",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                    {"from": "gpt", "value": "White and red."},
                    {"from": "human", "value": "Any people?"},
                    {"from": "gpt", "value": "No."},
                ],
            },
            {
                "id": 7,
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ],
            },
        ],
    )
    data = read_llava_json(path, image_root=tmp_path / "imgs")
    assert isinstance(data, SampleList) and len(data) == 2 and data.report.read == 2 and data.report.skipped == []
    s = data[0]
    assert roles_and_parts(s) == [
        ("user", [Image(), Text("\nWhat are the colors of the bus?")]),
        ("assistant", [Text("White and red.")]),
        ("user", [Text("Any people?")]),
        ("assistant", [Text("No.")]),
    ]
    assert s.images == [str(tmp_path / "imgs" / "coco/33471.jpg")]
    assert (s.id, s.origin) == ("000000033471", f"{path}:0")
    t = data[1]
    assert t.images == [] and t.id == "7" and t.conversation.system == "Be brief."


def test_llava_image_root_defaults_to_json_folder(tmp_path):
    path = write_json(
        tmp_path / "d.json",
        [{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]}],
    )
    assert read_llava_json(path)[0].images == [str(tmp_path / "a.jpg")]


def test_llava_skips_malformed_records_with_warnings(tmp_path):
    good = {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image> Q"}, {"from": "gpt", "value": "A"}]}
    records = [
        good,
        {"image": "a.jpg"},  # 1: missing conversations
        {"conversations": [{"from": "bot", "value": "hi"}]},  # 2: unknown role
        {"conversations": [{"from": ["human"], "value": "hi"}]},  # 3: unknown role (not even a string)
        {"conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},  # 4: order
        {"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "A"}]},  # 5: wrong type
        {**good, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},  # 6: no slot
        {"conversations": [{"from": "human", "value": "<image> Q"}, {"from": "gpt", "value": "A"}]},  # 7: no image
        {"conversations": [{"from": "human", "value": "Q"}]},  # 8: no answer
        "not an object",  # 9
        {"image": 3, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A"}]},  # 10
        good,
    ]
    path = write_json(tmp_path / "bad.json", records)
    with logged() as caught:
        data = read_llava_json(path)
    assert len(data) == 2 and [s.origin for s in data] == [f"{path}:0", f"{path}:11"]
    skipped = dict(data.report.skipped)
    assert [o for o, _ in data.report.skipped] == [f"{path}:{i}" for i in range(1, 11)]
    assert "missing key 'conversations'" in skipped[f"{path}:1"]
    assert "unknown role 'bot'" in skipped[f"{path}:2"]
    assert "unknown role ['human']" in skipped[f"{path}:3"]
    assert "expected 'user'" in skipped[f"{path}:4"]
    assert "must be a string" in skipped[f"{path}:5"]
    assert "no image placeholder" in skipped[f"{path}:6"]
    assert "only 0 image" in skipped[f"{path}:7"]
    assert "ends with a user turn" in skipped[f"{path}:8"]
    assert "not an object" in skipped[f"{path}:9"]
    assert "a string or a list of strings" in skipped[f"{path}:10"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 10 and messages[0].startswith(f"skipped {path}:1: ")


def test_many_skips_are_summarised(tmp_path):
    good = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    path = write_json(tmp_path / "many.json", [{}] * 25 + [good])
    with logged() as caught:
        data = read_llava_json(path)
    assert len(data.report.skipped) == 25 and len(data) == 1
    assert len(caught) == 11 and "15 more records skipped" in str(caught[-1].message)


def test_jsonl_origins_are_lines_and_bad_lines_skipped(tmp_path):
    rec = {"image": "x.jpg", "caption": "a dog"}
    path = tmp_path / "caps.jsonl"
    path.write_text(json.dumps(rec) + "\n\n{broken\n" + json.dumps({**rec, "id": 9}) + "\n")
    with logged(r"caps.jsonl:3: invalid JSON"):
        data = read_captions_json(path)
    assert [s.origin for s in data] == [f"{path}:1", f"{path}:4"]
    assert data[1].id == "9"
    assert roles_and_parts(data[0]) == [("user", [Image()]), ("assistant", [Text("a dog")])]


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[\n  {"a": 1},\n  {"b": }\n]')
    with pytest.raises(ValueError, match=r"broken.json: invalid JSON at line 3 column 9"):
        read_llava_json(bad)
    obj = write_json(tmp_path / "obj.json", {"conversations": []})
    with pytest.raises(ValueError, match=r"obj.json: expected a JSON list"):
        read_llava_json(obj)
    none_valid = write_json(tmp_path / "none.json", [{"x": 1}, {"y": 2}])
    with logged(), pytest.raises(ValueError, match=r"none.json: no valid record \(2 skipped; first: "):
        read_llava_json(none_valid)
    with pytest.raises(ValueError, match=r"empty.json: no valid record \(0 skipped\)"):
        read_llava_json(write_json(tmp_path / "empty.json", []))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_llava_json(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------ cc_sbu_align


def make_cc_sbu(root: Path, n: int = 8, extra=()) -> Path:
    root.mkdir()
    anns = [{"image_id": str(i), "caption": f"The image shows thing {i}."} for i in range(n)] + list(extra)
    write_json(root / "filter_cap.json", {"annotations": anns})
    return root


def test_cc_sbu_align_instructions_deterministic(tmp_path):
    root = make_cc_sbu(tmp_path / "cc_sbu_align", n=40)
    data = read_cc_sbu_align(root)
    again = read_cc_sbu_align(root)
    other = read_cc_sbu_align(root, seed=1)
    s = data[2]
    assert s.images == [str(root / "image" / "2.jpg")] and s.id == "2"
    assert s.origin == f"{root / 'filter_cap.json'}:2"
    user, answer = s.conversation.turns
    assert user.role == "user" and user.parts[0] == Image() and len(user.parts) == 2
    assert user.parts[1].text in [" " + i for i in ALIGNMENT_INSTRUCTIONS]
    assert answer.parts == [Text("The image shows thing 2.")]
    texts = [x.conversation.turns[0].text for x in data]
    assert texts == [x.conversation.turns[0].text for x in again]
    assert texts != [x.conversation.turns[0].text for x in other]
    assert len(set(texts)) == 4  # all four prompts used over 40 records


def test_cc_sbu_align_custom_instructions_and_captions_mode(tmp_path):
    root = make_cc_sbu(tmp_path / "cc", n=3)
    data = read_cc_sbu_align(root, instructions=["<image>\nDescribe it."])
    assert data[0].conversation.turns[0].parts == [Image(), Text("\nDescribe it.")]
    caps = read_cc_sbu_align(root, mode="captions")
    assert roles_and_parts(caps[1]) == [("user", [Image()]), ("assistant", [Text("The image shows thing 1.")])]
    with pytest.raises(ValueError, match="mode"):
        read_cc_sbu_align(root, mode="chat")


def test_cc_sbu_align_skips_and_bad_layout(tmp_path):
    root = make_cc_sbu(
        tmp_path / "cc",
        n=2,
        extra=[{"caption": "no id"}, {"image_id": "9", "caption": ""}, {"image_id": 10, "caption": "int id ok"}],
    )
    with logged():
        data = read_cc_sbu_align(root)
    assert [s.id for s in data] == ["0", "1", "10"]
    assert [o.rsplit(":", 1)[1] for o, _ in data.report.skipped] == ["2", "3"]
    write_json(root / "filter_cap.json", [{"image_id": "1", "caption": "x"}])
    with pytest.raises(ValueError, match=r"filter_cap.json: expected \{\"annotations\""):
        read_cc_sbu_align(root)


# ------------------------------------------------------------------------------------------ MiniGPT4Qwen


def test_minigpt4qwen_single_and_multi_turn(tmp_path):
    path = write_json(
        tmp_path / "q.json",
        [
            {"image": "a.jpg", "instruction": "<Img><ImageHere></Img> Describe this image.", "output": "A boat."},
            {
                "image": "b.jpg",
                "instruction": ["<Img><ImageHere></Img> What animal?", "Doing what?"],
                "output": ["A dog.", "Running."],
            },
            {"image": "c.jpg", "instruction": ["<Img><ImageHere></Img> Q"], "output": ["A", "B"]},  # mismatch
            {"image": "c.jpg", "instruction": "<Img><ImageHere></Img> Q", "output": ["A"]},  # str vs list
            {"instruction": "<Img><ImageHere></Img> Q", "output": "A"},  # no image
        ],
    )
    with logged():
        data = read_minigpt4qwen_json(path, image_root="/data/imgs")
    assert len(data) == 2
    assert roles_and_parts(data[0]) == [
        ("user", [Image(), Text(" Describe this image.")]),
        ("assistant", [Text("A boat.")]),
    ]
    turns = [t.text for t in data[1].conversation.turns]
    assert turns == ["<ImageHere> What animal?", "A dog.", "Doing what?", "Running."]
    assert data[1].images == ["/data/imgs/b.jpg"]
    reasons = dict(data.report.skipped)
    assert "1 instruction(s) but 2 output(s)" in reasons[f"{path}:2"]
    assert "must both be strings or both lists" in reasons[f"{path}:3"]
    assert "missing key 'image'" in reasons[f"{path}:4"]


# ------------------------------------------------------------------------------------------ webdataset


def test_webdataset_reads_json_and_txt_captions(tmp_path):
    img = jpeg_bytes()
    shard = write_tar(
        tmp_path / "00000.tar",
        [
            ("000000000.jpg", img),
            ("000000000.json", json.dumps({"caption": "from json", "url": "u"}).encode()),
            ("000000000.txt", b"from txt"),
            ("000000001.jpg", img),
            ("000000001.txt", b"only txt"),
            ("000000002.txt", b"no image"),
            ("000000003.jpg", img),  # no caption
            ("000000004.jpg", img),
            ("000000004.json", b"{bad json"),
        ],
    )
    reader = read_webdataset(tmp_path)
    with logged():
        samples = list(reader)
    assert [s.id for s in samples] == ["000000000", "000000001"]
    assert [s.origin for s in samples] == [f"{shard}/000000000", f"{shard}/000000001"]
    assert roles_and_parts(samples[0]) == [("user", [Image()]), ("assistant", [Text("from json")])]
    assert samples[1].conversation.turns[1].parts == [Text("only txt")]
    assert samples[0].images == [img] and load_image(samples[0].images[0]).size == (8, 6)
    reasons = dict(reader.report.skipped)
    assert reader.report.read == 2 and len(reasons) == 3
    assert "no image member" in reasons[f"{shard}/000000002"]
    assert "no caption" in reasons[f"{shard}/000000003"]
    assert f"{shard}/000000004" in reasons


def test_webdataset_patterns_truncated_shard_and_workers(tmp_path):
    img = jpeg_bytes()
    for n in range(3):
        members = []
        for k in range(2):
            members += [(f"{n}{k}.jpg", img), (f"{n}{k}.txt", f"cap {n}{k}".encode())]
        write_tar(tmp_path / f"{n:05d}.tar", members)
    reader = read_dataset({"format": "webdataset", "urls_or_dir": str(tmp_path / "{00000..00001}.tar")})
    assert [s.conversation.turns[1].text for s in reader] == ["cap 00", "cap 01", "cap 10", "cap 11"]
    raw = (tmp_path / "00002.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(raw[:1500])  # cut inside the second member
    with logged("00002.tar: truncated or unreadable tar in sample 20 .dropped."):
        got = [s.id for s in WebDatasetReader([tmp_path / "00000.tar", tmp_path / "00002.tar"])]
    assert got == ["00", "01"]
    loader = torch.utils.data.DataLoader(
        WebDatasetReader(sorted(tmp_path.glob("0000[01].tar"))),
        batch_size=None,
        num_workers=2,
        collate_fn=lambda s: s.id,
    )
    assert sorted(loader) == ["00", "01", "10", "11"]
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        WebDatasetReader(tmp_path / "nope.tar")
    empty = write_tar(tmp_path / "x.tar", [("a.txt", b"caption without image")])
    with logged(), pytest.raises(ValueError, match="no valid record"):
        list(WebDatasetReader(empty))


def test_webdataset_cut_between_members_is_reported_and_skips_are_counted(tmp_path, caplog):
    img = jpeg_bytes()
    members = [
        ("k0.jpg", img),
        ("k0.txt", b"first"),
        ("k1.jpg", img),
        ("k1.txt", b""),
        ("k2.jpg", img),
        ("k2.txt", b"third"),
    ]
    raw = write_tar(tmp_path / "whole.tar", members).read_bytes()
    reader = WebDatasetReader(tmp_path / "whole.tar")
    with logged("k1: caption must be a non-empty string"):
        assert [s.id for s in reader] == ["k0", "k2"]
    assert reader.report.kinds == {f"{tmp_path / 'whole.tar'}/k1": "empty_answer"}
    caplog.clear()
    list(reader)  # another epoch: counted again, not logged again
    assert reader.skipped_total == 2 and len(reader.report.skipped) == 1  # all passes / the last pass
    assert [r.getMessage() for r in caplog.records if "k1" in r.getMessage()] == []
    # Cut exactly after k2.jpg's data (a member boundary): tarfile alone would end quietly and keep "k2".
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[: 5 * 1024 + 512 + 512])
    reader = WebDatasetReader(cut)
    with logged(r"cut.tar: truncated or unreadable tar in sample k2 \(dropped\): .*end-of"):
        assert [s.id for s in reader] == ["k0"]
    assert [o for o, _ in reader.report.skipped] == [f"{cut}/k1", str(cut)]


def test_empty_answers_are_skipped_as_their_own_kind(tmp_path):
    turns = [
        {"from": "human", "value": "<image> Q"},
        {"from": "gpt", "value": "A"},
        {"from": "human", "value": "Q2"},
        {"from": "gpt", "value": " \n"},
    ]
    path = write_json(
        tmp_path / "d.json",
        [{"image": "a.jpg", "conversations": turns}, {"image": "a.jpg", "conversations": turns[:2]}],
    )
    with logged(r"d.json:0: turn 4 \(assistant\) is empty"):
        data = read_llava_json(path)
    assert len(data) == 1 and data.report.kinds == {f"{path}:0": "empty_answer"}
    qwen = write_json(
        tmp_path / "q.json",
        [
            {"image": "a.jpg", "instruction": ["<Img><ImageHere></Img> Q", "Q2"], "output": ["A", ""]},
            {"image": "a.jpg", "instruction": "<ImageHere> Q", "output": "A"},
        ],
    )
    with logged("turn 4 .assistant. is empty"):
        assert len(read_minigpt4qwen_json(qwen)) == 1


def _escapes(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An image root and, by the way each leaves it, an image path (relative to the root) that resolves outside."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (root / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "out").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "in").symlink_to(root / "sub", target_is_directory=True)
    return root, {
        "..": "../secret.jpg",
        "a/../..": "a/../../secret.jpg",
        "absolute": str(tmp_path / "secret.jpg"),
        "symlinked file": "link.jpg",
        "symlinked folder": "out/x.jpg",
        "symlinked folder, then ..": "out/../secret.jpg",
    }


def test_one_rule_for_where_an_image_path_may_lead(tmp_path):
    root, escapes = _escapes(tmp_path)
    for inside in ("a.jpg", "a/../b.jpg", "in/a.jpg", "in/../a.jpg", str(root / "sub" / "a.jpg")):
        assert resolve_image(root, inside) == str(root / inside)
    how = {
        "..": "leaves",
        "a/../..": "leaves",
        "absolute": "is absolute, outside",
        "symlinked file": "is a symlink out of",
        "symlinked folder": "is a symlink out of",
        "symlinked folder, then ..": "is a symlink out of",
    }
    for name, bad in escapes.items():
        with pytest.raises(
            ValueError, match=f"image path '{re.escape(bad)}' {how[name]} the image root {root} .*allow_"
        ):
            resolve_image(root, bad)
        assert resolve_image(root, bad, allow_outside_root=True) == str(root / bad)
    (tmp_path / "rootlink").symlink_to(root, target_is_directory=True)  # the root itself may be a symlink
    assert resolve_image(tmp_path / "rootlink", "in/a.jpg") == str(tmp_path / "rootlink" / "in/a.jpg")


def _dataset(fmt: str, tmp_path: Path, image: str) -> dict:
    """A ``read_dataset`` spec of format ``fmt`` with two records: ``image`` and ``ok.jpg``."""
    conv = [{"from": "human", "value": "<image> Q"}, {"from": "gpt", "value": "A"}]
    records = [
        {"image": name, "conversations": conv, "caption": "c", "instruction": "<ImageHere> Q", "output": "A"}
        for name in (image, "ok.jpg")
    ]
    path = write_json(tmp_path / f"{fmt}.json", records)
    return {"format": fmt, "path": str(path), "image_root": str(tmp_path / "imgs")}


@pytest.mark.parametrize("fmt", ["llava", "minigpt4qwen", "captions_json", "captions_csv"])
def test_every_reader_skips_and_counts_paths_leaving_the_root(fmt, tmp_path):
    from minigpt.data.convert import read_captions_csv

    root, escapes = _escapes(tmp_path)
    for bad in escapes.values():
        spec = _dataset(fmt, tmp_path, bad)
        if fmt == "captions_csv":
            csv_path = tmp_path / "caps.csv"
            csv_path.write_text(f"image,caption\n{bad},c\nok.jpg,c\n")
            read = lambda **kw: read_captions_csv(csv_path, spec["image_root"], **kw)  # noqa: E731
        else:
            read = lambda **kw: read_dataset({**spec, **kw})  # noqa: E731
        with logged(f"image path '{re.escape(bad)}' .* the image root"):
            data = read()
        assert [s.images for s in data] == [[str(root / "ok.jpg")]]
        assert list(data.report.kinds.values()) == ["outside_root"]
        assert len(read(allow_outside_root=True)) == 2


def test_cc_sbu_align_image_ids_stay_in_its_image_folder(tmp_path):
    cc = tmp_path / "cc"
    (cc / "image").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (cc / "image" / "link.jpg").symlink_to(tmp_path / "secret.jpg")
    ids = ["../../secret", str(tmp_path / "secret"), "link", "2"]
    write_json(cc / "filter_cap.json", {"annotations": [{"image_id": i, "caption": "c"} for i in ids]})
    with logged("'../../secret.jpg' leaves the image root"):
        data = read_cc_sbu_align(cc)
    assert [s.id for s in data] == ["2"] and set(data.report.kinds.values()) == {"outside_root"}
    assert len(data.report.kinds) == 3
    assert len(read_cc_sbu_align(cc, allow_outside_root=True)) == 4


def test_data_check_counts_an_absolute_cc_sbu_image_id_and_does_not_keep_it(tmp_path, capsys):
    from minigpt.cli import main

    cc = tmp_path / "cc"
    (cc / "image").mkdir(parents=True)
    PILImage.new("RGB", (8, 8), (200, 30, 30)).save(cc / "image" / "1.jpg")
    PILImage.new("RGB", (8, 8), (30, 30, 200)).save(tmp_path / "secret.jpg")
    records = [{"image_id": str(tmp_path / "secret"), "caption": "c"}, {"image_id": "1", "caption": "c"}]
    write_json(cc / "filter_cap.json", {"annotations": records})
    argv = ["data", "check", str(cc), "--format", "cc_sbu_align", "--json", str(tmp_path / "r.json")]
    assert main([*argv, "--write-clean", str(tmp_path / "clean")]) == 1
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["outside_root"] == 1
    kept = json.loads((tmp_path / "clean" / "filter_cap.json").read_text())["annotations"]
    assert kept == [{"image_id": "1", "caption": "c"}]


# ------------------------------------------------------------------------------------------ dispatch, mixing


def test_read_dataset_dispatch_and_errors(tmp_path):
    path = write_json(tmp_path / "caps.json", [{"image": "a.jpg", "caption": "c"}])
    data = read_dataset({"format": "captions_json", "path": str(path), "ratio": 3})
    assert data[0].images == [str(tmp_path / "a.jpg")]
    with pytest.raises(ValueError, match="unknown dataset format 'coco'.*llava"):
        read_dataset({"format": "coco", "path": str(path)})
    with pytest.raises(ValueError, match="format 'llava'.*accepted keys: path, image_root"):
        read_dataset({"format": "llava", "path": str(path), "root": "x"})


def caption_list(tmp_path: Path, name: str, n: int) -> SampleList:
    path = write_json(tmp_path / f"{name}.json", [{"image": f"{i}.jpg", "caption": f"{name}{i}"} for i in range(n)])
    return read_captions_json(path)


def test_mixed_dataset_exact_ratio_deterministic(tmp_path):
    a, b = caption_list(tmp_path, "a", 10), caption_list(tmp_path, "b", 3)
    mix = MixedDataset([a, b], ratios=[1, 3], seed=5, length=100)
    names = [mix[i].conversation.turns[1].text for i in range(len(mix))]
    counts = Counter(n[0] for n in names)
    assert len(mix) == 100 and counts == {"a": 25, "b": 75}
    assert Counter(n for n in names if n[0] == "b") == {"b0": 25, "b1": 25, "b2": 25}  # full cycles
    assert len({n for n in names if n[0] == "a"}) == 10
    same = MixedDataset([a, b], ratios=[1, 3], seed=5, length=100)
    assert names == [same[i].conversation.turns[1].text for i in range(100)]
    other = MixedDataset([a, b], ratios=[1, 3], seed=6, length=100)
    assert names != [other[i].conversation.turns[1].text for i in range(100)]
    same.set_epoch(1)
    assert names != [same[i].conversation.turns[1].text for i in range(100)]
    by_size = MixedDataset([a, b])
    assert len(by_size) == 13 and sorted(s.conversation.turns[1].text for s in by_size) == sorted(
        [f"a{i}" for i in range(10)] + ["b0", "b1", "b2"]
    )
    with pytest.raises(ValueError, match="ratio"):
        MixedDataset([a, b], ratios=[1])


def test_mixed_stream_and_read_mixture(tmp_path):
    a, b = caption_list(tmp_path, "a", 2), caption_list(tmp_path, "b", 2)
    stream = MixedStream([a, b], ratios=[9, 1], seed=0)
    first = [s.conversation.turns[1].text for s, _ in zip(stream, range(400))]
    assert first == [s.conversation.turns[1].text for s, _ in zip(stream, range(400))]
    counts = Counter(t[0] for t in first)
    assert 320 < counts["a"] < 390 and counts["a"] + counts["b"] == 400  # endless: sources restart
    specs = [
        {"format": "captions_json", "path": str(tmp_path / "a.json"), "ratio": 1},
        {"format": "captions_json", "path": str(tmp_path / "b.json"), "ratio": 1},
    ]
    assert isinstance(read_mixture(specs), MixedDataset)
    assert isinstance(read_mixture(specs[:1]), SampleList)


def test_one_format_registry_drives_the_config_readers_cli_and_converter():
    from typing import get_args

    from minigpt.data import convert, formats
    from minigpt.data.cli import FORMATS_HELP
    from minigpt.train.config import DatasetSpec

    trained = tuple(name for name, f in formats.DATASET_FORMATS.items() if f.reader is not None)
    assert get_args(DatasetSpec.model_fields["format"].annotation) == trained == tuple(formats.READERS)
    assert convert.SOURCE_FORMATS == tuple(formats.DATASET_FORMATS)
    assert FORMATS_HELP == "llava, minigpt4qwen, cc_sbu_align, captions_json, captions_csv or webdataset"
    assert "captions_csv" not in convert.TARGET_FORMATS + trained and "webdataset" not in convert.ROOTED_FORMATS
