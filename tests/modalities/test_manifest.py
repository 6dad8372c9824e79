"""CSV manifests of generated PNG, WAV and text files, and the WAV reader's conversions and errors."""
from __future__ import annotations

import logging
import struct
import wave

import numpy as np
import pytest
import torch
from PIL import Image
from torchaudio.functional import resample

from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.data import DataError
from mmkd.modalities import audio_io, manifest as mf
from mmkd.modalities.audio_io import AudioError, read_wav
from mmkd.registry import DATASETS


def write_wav(path, samples: np.ndarray, rate: int, width: int = 2) -> None:
    """Write integer PCM ``samples`` ``[frames, channels]`` (already in the file's integer range)."""
    if width == 3:
        b = samples.astype("<i4").view(np.uint8).reshape(*samples.shape, 4)[..., :3]
        data = b.tobytes()
    else:
        data = samples.astype({1: "u1", 2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data)


def fake_tokenize(texts, tokenizer, max_length):
    """Token ids: the text's length, then zeros; enough to check that each item got its own text."""
    ids = torch.zeros(len(texts), max_length, dtype=torch.long)
    ids[:, 0] = torch.tensor([len(t) for t in texts])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@pytest.fixture
def files(tmp_path):
    """12 items (labels b, a, c in turn) of grey 6x5 PNGs, 16-bit 16 kHz WAVs and captions; the CSV
    lies in ``data/lists`` and names files relative to itself (``../media``)."""
    rng = np.random.default_rng(0)
    (tmp_path / "data" / "lists").mkdir(parents=True)
    media = tmp_path / "data" / "media"
    media.mkdir()
    rows, pixels, sounds = ["img,snd,caption,label,split"], [], []
    for i in range(12):
        px = rng.integers(0, 256, (6, 5), dtype=np.uint8)
        Image.fromarray(px).save(media / f"{i}.png")
        snd = rng.integers(-20000, 20000, (1600 + 400 * i, 1))
        write_wav(media / f"{i}.wav", snd, 16000)
        pixels.append(px)
        sounds.append(snd[:, 0] / 32768)
        split = ["train"] * 6 + ["val"] * 3 + ["test"] * 3
        rows.append(f"../media/{i}.png,../media/{i}.wav,\"caption, number {'x' * i}\",{'bac'[i % 3]},{split[i]}")
    (tmp_path / "data" / "lists" / "all.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "data", pixels, sounds


def load(root, **kw):
    args = dict(columns={"img": "image", "snd": "audio", "caption": "text"}, csv="lists/all.csv",
                seconds=0.2, n_mels=16, n_fft=256, hop=128, max_length=8)
    return DATASETS["manifest"](root=root, **{**args, **kw})


def test_a_manifest_gives_images_audio_text_and_labels(files, monkeypatch):
    monkeypatch.setattr(mf, "tokenize", fake_tokenize)
    root, pixels, sounds = files
    d = load(root, waveform=True)
    assert (len(d.train), len(d.val), len(d.test)) == (6, 3, 3)
    assert d.class_names == ["a", "b", "c"] and d.num_classes == 3
    assert d.shapes == {"img": (1, 6, 5), "snd": (1, 3200), "caption_input_ids": (8,), "caption_attention_mask": (8,)}
    for ds, first in ((d.train, 0), (d.val, 6), (d.test, 9)):
        t = ds.tensors
        for j in range(len(ds)):
            i = first + j
            assert t["label"][j] == "abc".index("bac"[i % 3])
            assert torch.equal(t["img"][j, 0], torch.from_numpy(pixels[i]).float() / 255)
            ref = np.zeros(3200)
            ref[:min(3200, len(sounds[i]))] = sounds[i][:3200]
            torch.testing.assert_close(t["snd"][j, 0], torch.from_numpy(ref).float())
            assert t["caption_input_ids"][j, 0] == len(f"caption, number {'x' * i}")


def test_audio_becomes_standardised_log_mel_and_text_real_tokens(files):
    root, _, sounds = files
    d = load(root)
    assert d.shapes["snd"] == (1, 16, 26)  # 3200 samples // hop 128 + 1 frames
    train = d.train.tensors["snd"]
    assert abs(train.mean().item()) < 1e-5 and abs(train.std().item() - 1) < 1e-4
    step = d.preprocessing["snd"][0]
    raw = audio_io.log_mel(torch.from_numpy(sounds[10][:3200]).float()[None], 16000, 16, 256, 128)
    torch.testing.assert_close(d.test.tensors["snd"][1], (raw[0] - step["mean"][0]) / step["std"][0])
    ids = d.train.tensors["caption_input_ids"][0]
    assert ids[0] == 101 and (ids == 102).sum() == 1  # [CLS] ... [SEP] of the MiniLM word pieces


def test_one_csv_per_split_and_a_carved_validation_set(files, monkeypatch):
    monkeypatch.setattr(mf, "tokenize", fake_tokenize)
    root, _, _ = files
    lines = (root / "lists" / "all.csv").read_text().splitlines()
    (root / "lists" / "train.csv").write_text("\n".join([lines[0]] + lines[1:10]) + "\n")
    (root / "lists" / "test.csv").write_text("\n".join([lines[0]] + lines[10:]) + "\n")
    d = load(root, csv=None, train="lists/train.csv", test="lists/test.csv", val_fraction=1 / 3)
    assert (len(d.train), len(d.val), len(d.test)) == (6, 3, 3)
    assert sorted(d.val.tensors["label"].tolist()) == [0, 1, 2]  # stratified: one of each class
    both = torch.cat([d.train.tensors["caption_input_ids"][:, 0], d.val.tensors["caption_input_ids"][:, 0]])
    assert sorted(both.tolist()) == [len(f"caption, number {'x' * i}") for i in range(9)]


def test_empty_labels_are_unlabelled_and_integer_labels_sort_as_numbers(files, monkeypatch):
    monkeypatch.setattr(mf, "tokenize", fake_tokenize)
    root, _, _ = files
    csv = root / "lists" / "all.csv"
    lines = csv.read_text().splitlines()
    lines[2] = lines[2].replace(",a,train", ",,train")  # item 1
    csv.write_text("\n".join(lines) + "\n")
    d = load(root)
    assert d.class_names == ["a", "b", "c"] and d.train.tensors["label"].tolist() == [1, -1, 2, 1, 0, 2]
    assert mf.class_names(["10", "9", "", "2", "9"]) == ["2", "9", "10"]


def test_bad_manifests_are_one_clear_error_naming_the_file(files, monkeypatch):
    monkeypatch.setattr(mf, "tokenize", fake_tokenize)
    root, _, _ = files
    (root / "media" / "4.wav").unlink()
    with pytest.raises(DataError, match=r"all.csv:6: column 'snd': no such file .*media/4.wav"):
        load(root)
    write_wav(root / "media" / "4.wav", np.zeros((800, 1)), 16000)
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(root / "media" / "7.png")
    with pytest.raises(DataError, match=r"7.png: image of shape \(1, 5, 6\) in column 'img'; expected \(1, 6, 5\)"):
        load(root)
    (root / "media" / "7.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"7.png: not a readable image"):
        load(root)
    with pytest.raises(DataError, match=r"all.csv: no column 'text'"):
        load(root, columns={"text": "text"})
    with pytest.raises(ConfigError, match="data.args.columns: map each input column to one of"):
        load(root, columns={"img": "picture"})
    with pytest.raises(ConfigError, match="data.args: give the manifest's train and test CSV files"):
        load(root, csv=None, train="lists/all.csv")
    csv = root / "lists" / "all.csv"
    csv.write_text(csv.read_text().replace(",val\n", ",valid\n", 1))
    with pytest.raises(DataError, match=r"all.csv:8: split is 'valid'; expected one of train, val, test"):
        load(root)


def test_a_missing_or_non_utf8_csv_is_a_data_error_naming_it(files):
    root, _, _ = files
    with pytest.raises(DataError, match=r"no such CSV file '.*lists/none.csv' \(a relative path is taken from"):
        load(root, csv="lists/none.csv")
    csv = root / "lists" / "all.csv"
    csv.write_bytes(csv.read_bytes().replace(b"caption, number", "légende".encode("latin-1"), 1))
    with pytest.raises(DataError, match=r"all.csv: not UTF-8 text \(.*byte 0xe9\); save the CSV as UTF-8"):
        load(root)


def test_wav_formats_are_read_exactly(tmp_path):
    rng = np.random.default_rng(1)
    for width, lo, hi in ((1, 0, 256), (2, -2**15, 2**15), (3, -2**23, 2**23), (4, -2**31, 2**31)):
        samples = rng.integers(lo, hi, (50, 2), dtype=np.int64)
        samples[0] = lo, hi - 1  # both extremes
        write_wav(tmp_path / "x.wav", samples, 11025, width)
        x, rate = read_wav(tmp_path / "x.wav")
        ref = (samples - 128) / 128 if width == 1 else samples / 2.0 ** (8 * width - 1)
        assert rate == 11025 and x.shape == (2, 50)
        torch.testing.assert_close(x, torch.from_numpy(ref.T).float())


def test_other_rates_and_channels_are_converted_on_request_with_a_note(tmp_path, caplog):
    rng = np.random.default_rng(2)
    stereo = rng.integers(-2**15, 2**15, (1000, 2))
    write_wav(tmp_path / "a.wav", stereo, 16000)
    write_wav(tmp_path / "b.wav", stereo[:, :1], 8000)
    with caplog.at_level(logging.INFO, logger="mmkd"):
        out = audio_io.load_audios([tmp_path / "a.wav", tmp_path / "b.wav"], 8000, 600, convert=True)
    mono = torch.from_numpy(stereo.mean(1) / 32768).float()
    torch.testing.assert_close(out[0, :500], resample(mono[None], 16000, 8000)[0])  # 1000 samples at 16 kHz
    assert out[0, 500:].eq(0).all()  # padded to 600
    torch.testing.assert_close(out[1], torch.from_numpy(stereo[:600, 0] / 32768).float())  # cut to 600
    assert f"resampled 1 of 2 WAV files to 8000 Hz (from 16000 Hz: 1): {tmp_path / 'a.wav'}" in caplog.text
    assert f"averaged 1 of 2 multi-channel WAV files to mono: {tmp_path / 'a.wav'}" in caplog.text


def test_other_rates_and_channels_are_an_error_by_default(tmp_path, files, monkeypatch):
    rng = np.random.default_rng(3)
    write_wav(tmp_path / "mono.wav", rng.integers(-2**15, 2**15, (1000, 1)), 8000)
    write_wav(tmp_path / "stereo.wav", rng.integers(-2**15, 2**15, (1000, 2)), 8000)
    write_wav(tmp_path / "fast.wav", rng.integers(-2**15, 2**15, (1000, 1)), 16000)
    assert audio_io.load_audios([tmp_path / "mono.wav"], 8000, 100).shape == (1, 100)
    with pytest.raises(AudioError, match=r"stereo.wav: 8000 Hz, 2 channel\(s\); expected 8000 Hz mono: convert "
                                         r"the file, or set data.args.convert_audio=true"):
        audio_io.load_audios([tmp_path / "mono.wav", tmp_path / "stereo.wav"], 8000, 100)
    with pytest.raises(AudioError, match=r"fast.wav: 16000 Hz, 1 channel\(s\); expected 8000 Hz mono"):
        audio_io.load_audios([tmp_path / "fast.wav"], 8000, 100)
    monkeypatch.setattr(mf, "tokenize", fake_tokenize)  # through the manifest: an error, or converted on request
    root, _, _ = files
    with pytest.raises(AudioError, match=r"media/0.wav: 16000 Hz, 1 channel\(s\); expected 8000 Hz mono"):
        load(root, sample_rate=8000)
    assert load(root, sample_rate=8000, convert_audio=True, waveform=True).shapes["snd"] == (1, 1600)


def test_unreadable_wavs_are_one_clear_error_naming_the_file(tmp_path):
    (tmp_path / "noise.wav").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(AudioError, match=r"noise.wav: not a readable PCM WAV file"):
        read_wav(tmp_path / "noise.wav")
    write_wav(tmp_path / "cut.wav", np.zeros((1000, 1)), 8000)
    data = (tmp_path / "cut.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:-500])
    with pytest.raises(AudioError, match=r"cut.wav: truncated WAV file: .* 1000 frames, it holds 750"):
        read_wav(tmp_path / "cut.wav")
    floats = np.zeros(100, "<f4").tobytes()  # IEEE-float WAV (format 3): not integer PCM
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)
    header = b"RIFF" + struct.pack("<I", 36 + len(floats)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
    (tmp_path / "float.wav").write_bytes(header + b"data" + struct.pack("<I", len(floats)) + floats)
    with pytest.raises(AudioError, match=r"float.wav: not a readable PCM WAV file \(unknown format: 3\)"):
        read_wav(tmp_path / "float.wav")
    with pytest.raises(AudioError, match=r"float.wav"):  # through a data set too
        audio_io.load_audios([tmp_path / "float.wav"], 8000, 100)


def patched_wav(path, offset: int, fmt: str, value: int):
    """A valid 16-bit mono 8 kHz WAV of 1000 frames (the ``wave`` module's 44-byte header), with the
    header field at ``offset`` overwritten by ``value`` packed as ``fmt``."""
    write_wav(path, np.zeros((1000, 1)), 8000)
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


HEADER = "damaged or unsupported WAV header: "


@pytest.mark.parametrize("offset,fmt,value,message", [
    (22, "<H", 0, r"not a readable PCM WAV file \(bad # of channels\)"),
    (22, "<H", 100, HEADER + r"100 channels \(at most 64\)"),
    (24, "<I", 0, HEADER + r"a sample rate of 0 Hz \(expected 1000 Hz to 1000000 Hz\)"),
    (24, "<I", 5_000_000, HEADER + r"a sample rate of 5000000 Hz \(expected 1000 Hz to 1000000 Hz\)"),
    (34, "<H", 80, HEADER + r"80-bit samples; replace it with an intact 8/16/24/32-bit integer PCM WAV file"),
    (34, "<H", 0, r"not a readable PCM WAV file \(bad sample width\)"),
    (40, "<I", 0, HEADER + "no audio frames"),
    (40, "<I", 1, HEADER + "no audio frames"),  # less than one frame
    (40, "<I", 10**9, r"truncated WAV file: its header announces 500000000 frames, it holds 1000"),
], ids=["0 channels", "100 channels", "0 Hz", "5 MHz", "80 bit", "0 bit", "0 bytes", "1 byte", "1 GB"])
def test_damaged_wav_headers_are_one_clear_error_naming_the_file(tmp_path, offset, fmt, value, message):
    path = patched_wav(tmp_path / "damaged.wav", offset, fmt, value)
    with pytest.raises(AudioError, match=r"^\S*damaged.wav: " + message) as e:
        read_wav(path)
    assert "\n" not in str(e.value) and isinstance(e.value, DataError)


def test_a_missing_wav_and_an_unexpected_failure_name_the_file(tmp_path, monkeypatch):
    with pytest.raises(AudioError, match=r"gone.wav: not a readable PCM WAV file \(.*No such file"):
        read_wav(tmp_path / "gone.wav")
    path = patched_wav(tmp_path / "odd.wav", 22, "<H", 1)

    def broken(self, n):
        raise RuntimeError("unexpected\nfailure")

    monkeypatch.setattr(wave.Wave_read, "readframes", broken)
    with pytest.raises(AudioError, match=r"odd.wav: not a readable PCM WAV file \(unexpected failure\)"):
        read_wav(path)


def test_a_data_error_is_one_line_and_exit_code_2_through_the_cli(files, capsys):
    root, _, _ = files
    (root / "media" / "3.wav").write_bytes(b"RIFF")
    code = main(["run", "experiment=quickstart", f"data_root={root}", f"out_dir={root.parent / 'runs'}",
                 "data.name=manifest", "data.args={columns: {snd: audio}, csv: lists/all.csv, seconds: 0.2}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("mmkd: error: ") and "media/3.wav: not a readable PCM WAV file" in last
