"""``minigpt data analyze / check / convert`` on hand-made datasets written by the tests."""

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from conftest import logged
from minigpt.cli import main
from minigpt.data.analyze import (
    analyze_samples,
    length_stats,
    measure,
    percentile,
    recommend_max_len,
    truncated_fraction,
)
from minigpt.data.check import PROBLEM_KINDS, check_dataset, write_clean
from minigpt.data.conversation import Conversation, Sample
from minigpt.data.convert import ConvertOptions, convert_dataset, read_captions_csv
from minigpt.data.formats import (
    read_captions_json,
    read_cc_sbu_align,
    read_llava_json,
    read_minigpt4qwen_json,
    read_webdataset,
)
from minigpt.data.templates import get_template
from minigpt.data.tokenize import IGNORE_INDEX, encode_conversation

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def save_image(path: Path, fmt: str = "PNG", color=(200, 30, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("RGB", size, color).save(path, fmt)
    return path


def noisy_jpeg(size=64) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    PILImage.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def convs(samples) -> list:
    return [s.conversation for s in samples]


@pytest.fixture(scope="module")
def llama_tok_dir(tmp_path_factory, llama_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("llama-tok")
    llama_tokenizer.save_pretrained(folder)
    return folder


# ============================================================================================ analyze


def test_percentiles_recommendation_and_truncation_on_known_values():
    values = np.arange(1, 101)
    assert [percentile(values, p) for p in (50, 90, 95, 99, 100)] == [50, 90, 95, 99, 100]
    assert percentile([7, 1, 3], 50) == 3 and percentile([5], 99) == 5
    assert length_stats(values) == {
        "count": 100,
        "mean": 50.5,
        "min": 1,
        "p50": 50,
        "p90": 90,
        "p95": 95,
        "p99": 99,
        "max": 100,
    }
    assert recommend_max_len(values) == 128  # p99 = 99 -> next multiple of 32
    assert recommend_max_len(np.r_[np.full(99, 64), 1000]) == 64  # exactly 99 % covered by 64
    assert recommend_max_len([3]) == 32
    assert truncated_fraction(values, 96) == 0.04 and truncated_fraction(values, 100) == 0.0


def caption_dataset(tmp_path: Path, n: int = 100) -> Path:
    """Captions of k = 1..n words "a": with the caption template each answer is k + 1 tokens ("▁a" x k, "\\n")."""
    return write_json(
        tmp_path / "caps.json", [{"image": f"img/{k}.jpg", "caption": " ".join(["a"] * k)} for k in range(1, n + 1)]
    )


def test_analyze_exact_counts_on_hand_made_captions(tmp_path, llama_tokenizer):
    data = read_captions_json(caption_dataset(tmp_path))
    report = analyze_samples(data, llama_tokenizer, "caption", image_tokens=32, max_len=96)
    k = np.arange(1, 101)
    assert (report.lengths["prompt"] == 33).all()  # BOS + 32 image positions
    assert (report.lengths["answer"] == k + 1).all() and (report.lengths["txt_len"] == k + 1).all()
    assert (report.lengths["total"] == k + 34).all()
    d = report.to_dict()
    assert d["lengths"]["txt_len"] == {
        "count": 100,
        "mean": 51.5,
        "min": 2,
        "p50": 51,
        "p90": 91,
        "p95": 96,
        "p99": 100,
        "max": 101,
    }
    assert d["lengths"]["total"]["p99"] == 133 and d["lengths"]["total"]["max"] == 134
    assert d["truncated_fraction"] == 0.05  # k + 1 > 96 for k = 96..100
    assert d["truncated"]["96"] == {"samples": 5, "fraction": 0.05}
    assert d["recommended_max_len"] == 128 and d["truncated"]["128"]["samples"] == 0
    assert "recommended max_txt_len: 128" in report.summary()


@pytest.mark.parametrize("template,tok", [("vicuna0", "llama"), ("llama2", "llama"), ("chatml", "qwen")])
def test_measure_equals_training_encoding(template, tok, llama_tokenizer, qwen_tokenizer):
    tokenizer = llama_tokenizer if tok == "llama" else qwen_tokenizer
    tpl = get_template(template)
    samples = [
        Sample(
            Conversation.single(
                "<Img><ImageHere></Img> Describe this image in detail.",
                "A red bus parked by a brick wall, with three people waiting.",
            ),
            ["x.jpg"],
        ),
        Sample(
            Conversation.single("<image>\nWhat is it?", "A cat.")
            .add("user", "And <image> this?")
            .add("assistant", "A dog sitting on a very long sofa next to a window."),
            ["a.jpg", "b.jpg"],
        ),
        Sample(Conversation.single("Hi", "Hello there, how can I help?", system="Be brief."), []),
    ]
    lengths = list(measure(samples, tpl, tokenizer, image_tokens=32, batch_size=2))
    for sample, m in zip(samples, lengths):
        enc = encode_conversation(sample.conversation, tpl, tokenizer, 32, None)
        assert m.total == len(enc) and m.prompt + m.answer == m.total
        assert m.answer == sum(label != IGNORE_INDEX for label in enc.labels)
        assert m.images == len(sample.images)
        if tpl.truncation == "total":
            assert m.txt_len == m.total
        for n in {m.txt_len - 1, m.txt_len, 8, 40}:
            try:
                cut = len(encode_conversation(sample.conversation, tpl, tokenizer, 32, n)) < len(enc)
            except ValueError:  # "total" truncation through an image: truncated as well
                cut = True
            assert cut == (m.txt_len > n), (n, m)


def test_analyze_cli_writes_report_and_png(tmp_path, llama_tok_dir, capsys):
    path = caption_dataset(tmp_path)
    out = tmp_path / "analysis"
    rc = main(
        [
            "data",
            "analyze",
            str(path),
            "--format",
            "captions_json",
            "--tokenizer",
            str(llama_tok_dir),
            "--template",
            "caption",
            "--max-len",
            "96",
            "--out",
            str(out),
            "--limit",
            "50",
        ]
    )
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 50 and report["template"] == "caption" and report["truncation"] == "answer"
    assert report["lengths"]["txt_len"]["max"] == 51 and report["truncated_fraction"] == 0.0
    assert report["recommended_max_len"] == 64  # p99 of 2..51 = 51
    assert (out / "lengths.png").read_bytes()[:8] == PNG_MAGIC
    assert "recommended max_txt_len: 64" in capsys.readouterr().out


def test_analyze_counts_samples_the_template_rejects(llama_tokenizer):
    good = Sample(Conversation.single("<image> Hi", "Yo"), ["a.jpg"], origin="f.json:0")
    bad = Sample(Conversation.single("Hi", "Yo"), ["a.jpg"], origin="f.json:1")  # an image without a slot
    report = analyze_samples([good, bad], llama_tokenizer, "vicuna0")
    assert report.samples == 1 and [r.origin for r in report.rejected] == ["f.json:1"]
    assert report.to_dict()["template_rejected"]["count"] == 1
    with pytest.raises(ValueError, match="no sample could be measured"):
        analyze_samples([bad], llama_tokenizer, "vicuna0")


# ============================================================================================ check


def test_check_reports_paths_outside_the_root_and_oversized_images(tmp_path):
    from test_images import png_bomb

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "bomb.png").write_bytes(png_bomb(13000, 13000))
    save_image(tmp_path / "secret.png")  # a readable image, but above the image root
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
    path = write_json(
        tmp_path / "data" / "llava.json",
        [{"image": "../secret.png", "conversations": conv}, {"image": "bomb.png", "conversations": conv}],
    )
    report = check_dataset("llava", path, image_root=tmp_path / "imgs", workers=1)
    assert report.good == [] and report.records == 2
    assert {p.kind: p.origin for p in report.problems} == {"outside_root": f"{path}:0", "oversized_image": f"{path}:1"}
    assert "169,000,000 pixels" in report.summary() and "'../secret.png' leaves the image root" in report.summary()


def problem_llava(tmp_path: Path) -> Path:
    """Records 0 and 6 good; 1 missing image; 2 truncated JPEG; 3 not an image; 4 empty answer; 5 malformed."""
    img = tmp_path / "imgs"
    save_image(img / "good.png")
    (img / "trunc.jpg").write_bytes(noisy_jpeg()[:1500])
    (img / "text.jpg").write_bytes(b"this is not an image\n")

    def rec(i, image, answer="A red square."):
        r = {
            "id": str(i),
            "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": answer}],
        }
        if image:
            r["image"] = image
        return r

    return write_json(
        tmp_path / "data" / "llava.json",
        [
            rec(0, "good.png"),
            rec(1, "missing.png"),
            rec(2, "trunc.jpg"),
            rec(3, "text.jpg"),
            rec(4, "good.png", answer="  "),
            {"id": "5", "image": "good.png"},
            rec(6, "good.png", answer="Red."),
        ],
    )


def test_check_finds_each_problem_kind_with_origins(tmp_path):
    path = problem_llava(tmp_path)
    report = check_dataset("llava", path, image_root=tmp_path / "imgs", workers=2)
    assert report.records == 7 and report.good == [f"{path}:0", f"{path}:6"] and not report.clean
    assert report.counts() == {
        "malformed": 1,
        "outside_root": 0,
        "missing_image": 1,
        "corrupt_image": 1,
        "undecodable_image": 1,
        "oversized_image": 0,
        "empty_answer": 1,
    }
    origins = {p.kind: p.origin for p in report.problems}
    assert origins == {
        "malformed": f"{path}:5",
        "missing_image": f"{path}:1",
        "corrupt_image": f"{path}:2",
        "undecodable_image": f"{path}:3",
        "empty_answer": f"{path}:4",
    }
    text = report.summary()
    assert all(kind in text for kind in PROBLEM_KINDS) and f"{path}:2" in text and "truncated" in text


def test_check_cli_exit_codes_and_clean_copy_reads_back_clean(tmp_path, capsys):
    path = problem_llava(tmp_path)
    clean = tmp_path / "out" / "clean.json"
    args = ["data", "check", str(path), "--format", "llava", "--image-root", str(tmp_path / "imgs")]
    assert main(args + ["--write-clean", str(clean), "--workers", "1", "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "wrote 2 good records" in out and "missing_image" in out and "problems found in 5 of 7" in out
    assert json.loads((tmp_path / "r.json").read_text())["counts"]["corrupt_image"] == 1
    original = json.loads(path.read_text())
    assert json.loads(clean.read_text()) == [original[0], original[6]]  # records kept verbatim
    assert main(["data", "check", str(clean), "--format", "llava", "--image-root", str(tmp_path / "imgs")]) == 0
    assert "clean" in capsys.readouterr().out
    assert main(args + ["--write-clean", str(clean)]) == 2  # refuses to overwrite


def test_check_webdataset_and_cc_sbu_clean_copies(tmp_path):
    shard = tmp_path / "wds" / "00000.tar"
    shard.parent.mkdir()
    good = noisy_jpeg(16)
    with tarfile.open(shard, "w") as tar:
        for name, data in [
            ("a.jpg", good),
            ("a.txt", b"good one"),
            ("b.jpg", b"\xff\xd8\xff garbage"),
            ("b.txt", b"bad image"),
            ("c.jpg", good),
            ("d.jpg", good),
            ("d.txt", b"fine"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = check_dataset("webdataset", tmp_path / "wds", workers=2)
    assert report.good == [f"{shard}/a", f"{shard}/d"]
    assert {(p.kind, p.origin) for p in report.problems} == {
        ("malformed", f"{shard}/c"),
        ("undecodable_image", f"{shard}/b"),
    }
    assert write_clean(report, tmp_path / "wds_clean") == 2
    back = list(read_webdataset(tmp_path / "wds_clean"))
    assert [(s.id, s.images[0]) for s in back] == [("a", good), ("d", good)]
    assert check_dataset("webdataset", tmp_path / "wds_clean").clean

    root = tmp_path / "cc"
    save_image(root / "image" / "1.jpg", "JPEG")
    write_json(
        root / "filter_cap.json",
        {"annotations": [{"image_id": "1", "caption": "A red square."}, {"image_id": "2", "caption": "Missing."}]},
    )
    report = check_dataset("cc_sbu_align", root)
    assert [(p.kind, p.origin) for p in report.problems] == [("missing_image", f"{root / 'filter_cap.json'}:1")]
    assert write_clean(report, tmp_path / "cc_clean") == 1
    assert check_dataset("cc_sbu_align", tmp_path / "cc_clean").clean
    assert [s.conversation.turns[1].text for s in read_cc_sbu_align(tmp_path / "cc_clean")] == ["A red square."]


# ============================================================================================ convert


def llava_source(tmp_path: Path) -> Path:
    img = tmp_path / "imgs"
    for name in ("a.png", "b.png"):
        save_image(img / name)
    turn = lambda who, text: {"from": who, "value": text}  # noqa: E731
    return write_json(
        img / "llava.json",
        [
            {
                "id": "single",
                "image": "a.png",
                "conversations": [turn("human", "<image>\nWhat is it?"), turn("gpt", "A red square.")],
            },
            {
                "id": "multi",
                "image": "b.png",
                "conversations": [
                    turn("human", "Look: <image> What colour?"),
                    turn("gpt", "Red."),
                    turn("human", "And the shape?"),
                    turn("gpt", "A square, 8 x 6 pixels."),
                ],
            },
            {
                "id": "system",
                "image": "a.png",
                "conversations": [turn("system", "Be brief."), turn("human", "<image>"), turn("gpt", "Red.")],
            },
            {
                "id": "two",
                "image": ["a.png", "b.png"],
                "conversations": [turn("human", "<image> vs <image>?"), turn("gpt", "Same.")],
            },
            {"id": "text", "conversations": [turn("human", "Hi"), turn("gpt", "Hello.")]},
        ],
    )


def test_llava_round_trips_and_minigpt4qwen_skips_what_it_cannot_hold(tmp_path):
    src = llava_source(tmp_path)
    original = read_llava_json(src)
    report = convert_dataset(src, "llava", tmp_path / "same.json", "llava")
    assert report.written == 5 and convs(read_llava_json(tmp_path / "same.json", tmp_path / "imgs")) == convs(original)
    assert [s.images for s in read_llava_json(tmp_path / "same.json", tmp_path / "imgs")] == [
        s.images for s in original
    ]

    report = convert_dataset(src, "llava", tmp_path / "q" / "qwen.json", "minigpt4qwen")
    assert (report.read, report.written) == (5, 2) and sum(report.skipped.values()) == 3
    assert report.image_root == str(tmp_path / "imgs")
    qwen = read_minigpt4qwen_json(tmp_path / "q" / "qwen.json", image_root=tmp_path / "imgs")
    assert convs(qwen) == convs(original)[:2] and [s.images for s in qwen] == [s.images for s in original[:2]]
    records = json.loads((tmp_path / "q" / "qwen.json").read_text())
    assert records[0]["instruction"] == "<Img><ImageHere></Img>\nWhat is it?" and records[0]["image"] == "a.png"
    assert records[1]["output"] == ["Red.", "A square, 8 x 6 pixels."]

    convert_dataset(
        tmp_path / "q" / "qwen.json",
        "minigpt4qwen",
        tmp_path / "back.json",
        "llava",
        image_root=tmp_path / "imgs",
        options=ConvertOptions(out_image_root=tmp_path),
    )
    back = read_llava_json(tmp_path / "back.json")  # paths now relative to its own folder
    assert convs(back) == convs(original)[:2] and [s.images for s in back] == [s.images for s in original[:2]]


def test_cc_sbu_align_round_trip_symlinked_and_copied(tmp_path):
    root = tmp_path / "cc"
    for i in range(3):
        save_image(root / "image" / f"{i}.jpg", "JPEG", color=(i * 80, 10, 10))
    write_json(
        root / "filter_cap.json",
        {"annotations": [{"image_id": str(i), "caption": f"Caption number {i}."} for i in range(3)]},
    )
    original = read_cc_sbu_align(root)
    convert_dataset(root, "cc_sbu_align", root / "llava.json", "llava")
    via = read_llava_json(root / "llava.json")
    assert convs(via) == convs(original) and [s.images for s in via] == [s.images for s in original]
    for copy in (False, True):
        out = tmp_path / f"cc_{copy}"
        report = convert_dataset(
            root / "llava.json", "llava", out, "cc_sbu_align", options=ConvertOptions(copy_images=copy)
        )
        assert report.written == 3 and not report.notes  # alignment instructions are not "dropped" text
        back = read_cc_sbu_align(out)
        assert convs(back) == convs(original)  # same index -> same drawn instruction
        for i in range(3):
            made = out / "image" / f"{i}.jpg"
            assert not made.is_symlink() and made.read_bytes() == (root / "image" / f"{i}.jpg").read_bytes()
            assert (made.stat().st_ino == (root / "image" / f"{i}.jpg").stat().st_ino) != copy  # hard link or copy


def test_multi_turn_to_cc_sbu_align_is_skipped_with_a_counted_warning(tmp_path, capsys):
    src = llava_source(tmp_path)
    rc = main(
        ["data", "convert", str(src), "--from", "llava", "--to", "cc_sbu_align", str(tmp_path / "cc"), "--copy-images"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 2" in out and "1 sample(s) skipped: multi-turn conversation" in out and f"{src}:1" in out
    assert "1 sample(s) skipped: 2 images" in out and "1 sample(s) skipped: 0 images" in out
    # "What is it?" (not an alignment instruction) and "Be brief." (system) are not stored
    assert "2 sample(s): instruction/system text not stored" in out
    back = read_cc_sbu_align(tmp_path / "cc", mode="captions")
    assert [s.conversation.turns[1].text for s in back] == ["A red square.", "Red."]
    assert [s.id for s in back] == ["single", "system"]


def caption_pairs(tmp_path: Path) -> list[dict]:
    pairs = []
    for i in range(5):
        fmt, ext = ("PNG", "png") if i == 3 else ("JPEG", "jpg")
        save_image(tmp_path / "pics" / f"p{i}.{ext}", fmt, color=(40 * i, 100, 200), size=(10 + i, 7))
        pairs.append({"image": f"pics/p{i}.{ext}", "caption": f"Picture {i}, a blue-ish rectangle."})
    return pairs


def test_captions_to_webdataset_shards_round_trip(tmp_path):
    pairs = caption_pairs(tmp_path)
    src = write_json(tmp_path / "pairs.json", pairs)
    report = convert_dataset(src, "captions_json", tmp_path / "wds", "webdataset", options=ConvertOptions(shard_size=2))
    assert report.written == 5 and [Path(f).name for f in report.files] == ["00000.tar", "00001.tar", "00002.tar"]
    with tarfile.open(tmp_path / "wds" / "00001.tar") as tar:
        assert tar.getnames() == [
            "000010000.jpg",
            "000010000.txt",
            "000010000.json",
            "000010001.png",
            "000010001.txt",
            "000010001.json",
        ]
        meta = json.loads(tar.extractfile("000010000.json").read())
    assert meta["caption"] == pairs[2]["caption"] and (meta["width"], meta["height"]) == (12, 7)
    back = list(read_webdataset(tmp_path / "wds"))
    assert [s.conversation.turns[1].text for s in back] == [p["caption"] for p in pairs]
    assert [s.images[0] for s in back] == [(tmp_path / p["image"]).read_bytes() for p in pairs]
    assert convs(back) == convs(read_captions_json(src))


def test_csv_to_webdataset_cli_and_back_to_llava(tmp_path, capsys):
    pairs = caption_pairs(tmp_path)
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "caption"])
        writer.writeheader()
        writer.writerows(pairs)
        writer.writerow({"image": "pics/p0.jpg", "caption": ""})  # malformed: empty caption
    with logged(r"pairs.csv:7: caption must be a non-empty string"):
        assert len(read_captions_csv(tmp_path / "pairs.csv")) == 5
    rc = main(
        [
            "data",
            "convert",
            str(tmp_path / "pairs.csv"),
            "--from",
            "captions_csv",
            "--to",
            "webdataset",
            str(tmp_path / "wds"),
            "--shard-size",
            "3",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "wrote 5" in out and f"{tmp_path / 'pairs.csv'}:7" in out  # the reader's skip, named by line
    back = list(read_webdataset(tmp_path / "wds"))
    assert [s.conversation.turns[1].text for s in back] == [p["caption"] for p in pairs]
    assert [s.images[0] for s in back] == [(tmp_path / p["image"]).read_bytes() for p in pairs]

    # webdataset -> llava: the image bytes are written next to the JSON
    convert_dataset(tmp_path / "wds", "webdataset", tmp_path / "j" / "llava.json", "llava")
    via = read_llava_json(tmp_path / "j" / "llava.json")
    assert convs(via) == convs(back)
    assert [Path(s.images[0]).read_bytes() for s in via] == [s.images[0] for s in back]
    assert Path(via[3].images[0]).suffix == ".png"


def test_convert_errors(tmp_path):
    src = llava_source(tmp_path)
    with pytest.raises(ValueError, match="cannot write format"):
        convert_dataset(src, "llava", tmp_path / "o", "csv")
    with pytest.raises(FileExistsError):
        convert_dataset(src, "llava", src, "llava")
    with pytest.raises(ValueError, match="--image-root does not apply"):
        convert_dataset(tmp_path, "cc_sbu_align", tmp_path / "o.json", "llava", image_root=tmp_path)
    assert main(["data", "convert", str(src), "--from", "nope", "--to", "llava", str(tmp_path / "x.json")]) == 2


def test_nothing_fits_is_an_error_and_leaves_nothing(tmp_path):
    src = write_json(
        tmp_path / "q.json", [{"image": "a.png", "instruction": ["<image> A?", "B?"], "output": ["a", "b"]}]
    )
    with pytest.raises(ValueError, match="nothing written .* multi-turn"):
        convert_dataset(src, "minigpt4qwen", tmp_path / "cc", "cc_sbu_align")
    assert not (tmp_path / "cc").exists()
