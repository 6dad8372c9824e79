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
    with pytest.raises(FileNotFoundError, match=r"all.csv:6: column 'snd': no such file .*media/4.wav"):
        load(root)
    write_wav(root / "media" / "4.wav", np.zeros((800, 1)), 16000)
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(root / "media" / "7.png")
    with pytest.raises(ValueError, match=r"7.png: image of shape \(1, 5, 6\) in column 'img'; expected \(1, 6, 5\)"):
        load(root)
    (root / "media" / "7.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"7.png: not a readable image"):
        load(root)
    with pytest.raises(ValueError, match=r"all.csv: no column 'text'"):
        load(root, columns={"text": "text"})
    with pytest.raises(ValueError, match="columns must map"):
        load(root, columns={"img": "picture"})
    csv = root / "lists" / "all.csv"
    csv.write_text(csv.read_text().replace(",val\n", ",valid\n", 1))
    with pytest.raises(ValueError, match=r"all.csv:8: split is 'valid'; expected one of train, val, test"):
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


def test_other_rates_and_channels_are_converted_with_a_note(tmp_path, caplog):
    rng = np.random.default_rng(2)
    stereo = rng.integers(-2**15, 2**15, (1000, 2))
    write_wav(tmp_path / "a.wav", stereo, 16000)
    write_wav(tmp_path / "b.wav", stereo[:, :1], 8000)
    with caplog.at_level(logging.INFO, logger="mmkd"):
        out = audio_io.load_audios([tmp_path / "a.wav", tmp_path / "b.wav"], 8000, 600)
    mono = torch.from_numpy(stereo.mean(1) / 32768).float()
    torch.testing.assert_close(out[0, :500], resample(mono[None], 16000, 8000)[0])  # 1000 samples at 16 kHz
    assert out[0, 500:].eq(0).all()  # padded to 600
    torch.testing.assert_close(out[1], torch.from_numpy(stereo[:600, 0] / 32768).float())  # cut to 600
    assert "resampled 1 of 2 WAV files to 8000 Hz (from 16000 Hz: 1)" in caplog.text
    assert "averaged 1 of 2 multi-channel WAV files to mono" in caplog.text


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
