"""AV-digits on the real MNIST test set and Free Spoken Digit recordings (``MMKD_DATA``; those tests
skip without it), and its errors and cache on a small generated data root."""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchaudio

from mmkd import io
from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.data import DataError
from mmkd.modalities import audio_io, avdigits as av
from mmkd.modalities.audio_io import AudioError
from mmkd.modalities.avdigits import MNIST_FILES, avdigits
from mmkd.registry import DATASETS

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None
REC = "fsdd/recordings"


def data_root() -> Path:
    """The real data root; skips the test without ``MMKD_DATA``."""
    if DATA is None:
        pytest.skip("set MMKD_DATA to the data root (for example ../shared/data)")
    return DATA


class Counted:
    """Wraps ``audio_io.read_wav`` and counts its calls."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after, self.read = 0, fail_after, audio_io.read_wav

    def __call__(self, path):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("read a WAV file")
        return self.read(path)


def build(mp, **kw):
    """Build AV-digits with ``read_wav`` counted; returns the splits and the number of WAV reads."""
    count = Counted()
    mp.setattr(audio_io, "read_wav", count)
    return avdigits(**kw), count.calls


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The full data set built twice into a fresh cache (second time from the cache), and with another seed."""
    data_root()
    cache = tmp_path_factory.mktemp("avcache")
    with pytest.MonkeyPatch.context() as mp:
        first, first_reads = build(mp, root=DATA, cache_dir=cache)
        again, again_reads = build(mp, root=DATA, cache_dir=cache)
        other, other_reads = build(mp, root=DATA, cache_dir=cache, seed=1)
    return dict(first=first, again=again, other=other, reads=(first_reads, again_reads, other_reads), cache=cache)


def mnist_reference():
    """MNIST test images and labels read naively: 16- and 8-byte headers, then uint8."""
    with gzip.open(DATA / "mnist" / MNIST_FILES[0]) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(DATA / "mnist" / MNIST_FILES[1]) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def test_splits_follow_the_official_fsdd_split(real):
    d = real["first"]
    assert (len(d.train), len(d.val), len(d.test)) == (2400, 300, 300)
    assert d.num_classes == 10 and d.class_names[0] == "zero" and d.class_names[9] == "nine"
    assert d.shapes == {"image": (1, 28, 28), "audio": (1, 40, 101)}
    takes = {s: getattr(d, s).tensors["take"] for s in ("train", "val", "test")}
    assert sorted(takes["test"].unique().tolist()) == [0, 1, 2, 3, 4]
    assert sorted(takes["val"].unique().tolist()) == [5, 6, 7, 8, 9]
    assert sorted(takes["train"].unique().tolist()) == list(range(10, 50))
    t = d.test.tensors  # every speaker says every digit in every test take exactly once
    combos = {(s, l, k) for s, l, k in zip(t["speaker"].tolist(), t["label"].tolist(), t["take"].tolist())}
    assert len(combos) == 300 and t["speaker"].unique().numel() == 6


def test_images_are_disjoint_across_splits_and_match_their_labels(real):
    d = real["first"]
    images, labels = mnist_reference()
    used = torch.cat([s.tensors["mnist_index"] for s in (d.train, d.val, d.test)])
    assert used.unique().numel() == used.numel() == 3000
    for s in (d.train, d.val, d.test):
        t = s.tensors
        assert torch.equal(labels[t["mnist_index"]], t["label"])  # image label == item label, every item
        assert torch.equal(t["image"], images[t["mnist_index"]].unsqueeze(1).float() / 255)
        assert t["label"].dtype == torch.int64 and t["image"].dtype == torch.float32


def test_audio_is_the_recording_of_the_items_digit(real):
    """Recompute a few items' features from their WAV file with the standard library and torchaudio."""
    d = real["first"]
    speakers = sorted({f.split("_")[1] for f in os.listdir(DATA / REC)})
    step = d.preprocessing["audio"][0]
    mel = torchaudio.transforms.MelSpectrogram(8000, n_fft=200, hop_length=80, n_mels=40)
    for s, i in (("train", 0), ("train", 1234), ("val", 77), ("test", 299)):
        item = getattr(d, s)[i]
        name = f"{item['label']}_{speakers[item['speaker']]}_{item['take']}.wav"
        with wave.open(str(DATA / REC / name)) as w:
            x = torch.from_numpy(np.frombuffer(w.readframes(w.getnframes()), "<i2") / 32768.0).float()
        x = torch.cat([x, torch.zeros(8000)])[:8000]
        ref = ((mel(x) + 1e-6).log() - step["mean"][0]) / step["std"][0]
        torch.testing.assert_close(item["audio"][0], ref, atol=1e-4, rtol=1e-4)
    train = d.train.tensors["audio"]
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-4


def test_pairing_is_deterministic_for_a_seed_and_changes_with_it(real):
    first, again, other = real["first"], real["again"], real["other"]
    for s in ("train", "val", "test"):
        assert getattr(first, s).fingerprint == getattr(again, s).fingerprint
        a, b = getattr(first, s).tensors, getattr(other, s).tensors
        assert torch.equal(a["audio"], b["audio"]) and torch.equal(a["label"], b["label"])
        assert (a["mnist_index"] != b["mnist_index"]).float().mean() > 0.5
        assert getattr(first, s).fingerprint != getattr(other, s).fingerprint


def test_the_cache_is_reused_and_invalidated_by_a_parameter(real, monkeypatch):
    assert real["reads"] == (3000, 0, 0)  # the second build and another seed read no WAV file
    assert len(list(real["cache"].glob("avdigits-*.pt"))) == 1
    monkeypatch.setattr(audio_io, "read_wav", Counted(fail_after=0))
    with pytest.raises(RuntimeError, match="read a WAV"):
        avdigits(DATA, cache_dir=real["cache"], n_mels=20)
    with pytest.raises(RuntimeError, match="read a WAV"):
        avdigits(DATA, cache_dir=real["cache"], seconds=0.5)


@pytest.fixture
def small_root(tmp_path):
    """A data root with the MNIST files and one recording per digit and split (30 files)."""
    data_root()
    root = tmp_path / "data"
    (root / REC).mkdir(parents=True)
    shutil.copytree(DATA / "mnist", root / "mnist")
    for digit in range(10):
        for take in (0, 5, 10):
            shutil.copy(DATA / REC / f"{digit}_george_{take}.wav", root / REC)
    return root


def test_a_changed_recording_invalidates_the_cache(small_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    d, reads = build(monkeypatch, root=small_root, cache_dir=cache)
    assert (len(d.train), len(d.val), len(d.test)) == (10, 10, 10) and reads == 30
    assert build(monkeypatch, root=small_root, cache_dir=cache)[1] == 0
    shutil.copy(DATA / REC / "3_george_11.wav", small_root / REC / "3_george_10.wav")  # other contents
    d2, reads = build(monkeypatch, root=small_root, cache_dir=cache)
    assert reads == 30 and not torch.equal(d.train.tensors["audio"], d2.train.tensors["audio"])


def test_waveform_items_are_the_recordings_and_cached_too(small_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    d, reads = build(monkeypatch, root=small_root, cache_dir=cache, waveform=True, seconds=0.5)
    assert reads == 30 and d.shapes["audio_wave"] == (1, 4000) and d.shapes["audio"] == (1, 40, 51)
    for s in ("train", "test"):
        item = getattr(d, s)[3]
        with wave.open(str(small_root / REC / f"{item['label']}_george_{item['take']}.wav")) as w:
            x = np.frombuffer(w.readframes(w.getnframes()), "<i2")[:4000] / 32768.0
        assert torch.equal(item["audio_wave"][0, :len(x)], torch.from_numpy(x).float())
        assert item["audio_wave"][0, len(x):].eq(0).all()
    again, reads = build(monkeypatch, root=small_root, cache_dir=cache, waveform=True, seconds=0.5)
    assert reads == 0 and torch.equal(again.val.tensors["audio_wave"], d.val.tensors["audio_wave"])
    assert sorted(p.name.split("-")[1] for p in cache.glob("avdigits-*.pt")) == ["logmel", "wave"]


class Killed(BaseException):
    """The process dying in the middle of a write."""


def test_a_crash_while_writing_the_cache_leaves_nothing_that_is_read_back(small_root, tmp_path, monkeypatch):
    cache, write = tmp_path / "cache", Path.write_bytes

    def dying(path, data):  # write half of the file, then die
        write(path, bytes(data)[: len(data) // 2])
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(Path, "write_bytes", dying)
        with pytest.raises(Killed):  # an error: the temporary file is removed
            avdigits(small_root, cache_dir=cache)
        assert list(cache.iterdir()) == []
        # a kill: no clean-up runs at all, the half-written temporary file stays
        m.setattr(io, "os", SimpleNamespace(close=os.close, chmod=os.chmod, replace=os.replace, path=os.path,
                                            unlink=lambda path: None))
        with pytest.raises(Killed):
            avdigits(small_root, cache_dir=cache)
    leftovers = list(cache.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".avdigits-logmel-")
    d, reads = build(monkeypatch, root=small_root, cache_dir=cache)
    assert reads == 30  # the partial file was not taken for a cache
    clean, _ = build(monkeypatch, root=small_root, cache_dir=tmp_path / "fresh")
    assert d.train.fingerprint == clean.train.fingerprint

    final = next(cache.glob("avdigits-*.pt"))  # a cache damaged by anything else is rebuilt too
    final.write_bytes(final.read_bytes()[:1000])
    d, reads = build(monkeypatch, root=small_root, cache_dir=cache)
    assert reads == 30 and d.test.fingerprint == clean.test.fingerprint


def test_limit_per_class_keeps_the_lowest_takes_of_every_split(tmp_path):
    d = avdigits(data_root(), cache_dir=tmp_path / "c", limit_per_class=7)
    for s, takes in (("train", [10, 11]), ("val", [5, 6]), ("test", [0, 1])):
        t = getattr(d, s).tensors
        assert torch.bincount(t["label"]).tolist() == [7] * 10
        assert torch.bincount(t["take"])[takes].tolist() == [60, 10]  # 6 speakers in the first take


def write_idx(path: Path, values: np.ndarray) -> None:
    """Write uint8 ``values`` as a gzipped IDX file (type 0x08)."""
    header = bytes([0, 0, 0x08, values.ndim]) + np.array(values.shape, ">i4").tobytes()
    path.write_bytes(gzip.compress(header + values.astype(np.uint8).tobytes()))


def write_wav(path: Path, rate: int = 8000, channels: int = 1, seconds: float = 0.1) -> None:
    """A 16-bit WAV file of noise."""
    samples = np.random.default_rng(len(path.name)).integers(-2**15, 2**15, (round(rate * seconds), channels))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())


@pytest.fixture
def fake_root(tmp_path):
    """A generated data root: 40 random 28x28 MNIST-format images (digits 0-9 in turn) and 30 short
    8 kHz mono recordings, one per digit and split."""
    root = tmp_path / "fake"
    (root / "mnist").mkdir(parents=True)
    (root / REC).mkdir(parents=True)
    write_idx(root / "mnist" / MNIST_FILES[0], np.random.default_rng(0).integers(0, 256, (40, 28, 28)))
    write_idx(root / "mnist" / MNIST_FILES[1], np.arange(40) % 10)
    for digit in range(10):
        for take in (0, 5, 10):
            write_wav(root / REC / f"{digit}_alice_{take}.wav")
    return root


def test_missing_files_and_a_cache_inside_the_data_root_are_refused(fake_root, tmp_path):
    with pytest.raises(DataError, match=r"avdigits: missing \S*nothing/mnist/t10k-images-idx3-ubyte.gz, .*fsdd"):
        DATASETS["avdigits"](root=tmp_path / "nothing", cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="data.args.cache_dir: .* lies inside the data root"):
        avdigits(fake_root, cache_dir=fake_root / "cache")
    assert len(avdigits(fake_root, cache_dir=tmp_path / "c", seconds=0.1).test) == 10


@pytest.mark.parametrize("name,contents,message", [
    (MNIST_FILES[1], gzip.compress(b"\x08\x08\x01\x00junk"), r"labels-idx1-ubyte.gz: not an IDX file \(bad header"),
    (MNIST_FILES[1], gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 41]) + bytes(40)),
     r"labels-idx1-ubyte.gz: IDX header announces shape \(41,\), the file holds 40 values"),
    (MNIST_FILES[0], gzip.compress(bytes([0, 0, 8, 3, 0, 0, 0, 1]))[:-6], r"images-idx3-ubyte.gz: unreadable"),
    (MNIST_FILES[0], b"not gzip", r"images-idx3-ubyte.gz: unreadable \(Not a gzipped file"),
    (MNIST_FILES[0], gzip.compress(bytes([0, 0, 8, 3, 0, 0, 0, 40, 0, 0, 0, 20, 0, 0, 0, 20]) + bytes(16000)),
     r"images-idx3-ubyte.gz: images of shape \(40, 20, 20\); expected \[N, 28, 28\]"),
    (MNIST_FILES[1], gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 30]) + bytes(range(10)) * 3),
     r"labels-idx1-ubyte.gz: 30 labels for the 40 images of t10k-images-idx3-ubyte.gz"),
], ids=["bad magic", "short", "truncated gzip", "not gzip", "20x20 images", "fewer labels"])
def test_malformed_mnist_files_are_a_data_error_naming_the_file(fake_root, tmp_path, name, contents, message):
    (fake_root / "mnist" / name).write_bytes(contents)
    with pytest.raises(DataError, match=r"^\S*/fake/mnist/t10k-" + message):
        avdigits(fake_root, cache_dir=tmp_path / "c", seconds=0.1)


def test_other_rates_and_channels_are_an_error_unless_converted(fake_root, tmp_path, caplog):
    write_wav(fake_root / REC / "3_alice_10.wav", rate=16000)
    write_wav(fake_root / REC / "4_alice_5.wav", channels=2)
    with pytest.raises(AudioError, match=r"3_alice_10.wav: 16000 Hz, 1 channel\(s\); expected 8000 Hz mono: "
                                         r"convert the file, or set data.args.convert_audio=true"):
        avdigits(fake_root, cache_dir=tmp_path / "c", seconds=0.1)
    with caplog.at_level(logging.INFO, logger="mmkd"):
        d = avdigits(fake_root, cache_dir=tmp_path / "c", seconds=0.1, convert_audio=True)
    assert d.shapes["audio"] == (1, 40, 11)
    assert "resampled 1 of 30 WAV files to 8000 Hz (from 16000 Hz: 1): " in caplog.text
    assert "averaged 1 of 30 multi-channel WAV files to mono: " in caplog.text


def test_the_feature_version_is_part_of_the_cache_key_and_a_build_is_timed(fake_root, tmp_path, monkeypatch, caplog):
    cache = tmp_path / "c"
    with caplog.at_level(logging.INFO, logger="mmkd"):
        assert build(monkeypatch, root=fake_root, cache_dir=cache, seconds=0.1)[1] == 30
    assert build(monkeypatch, root=fake_root, cache_dir=cache, seconds=0.1)[1] == 0
    assert len([r for r in caplog.records if "avdigits: built the logmel cache of 30 files in" in r.message]) == 1
    monkeypatch.setattr(av, "FEATURE_VERSION", av.FEATURE_VERSION + 1)
    assert build(monkeypatch, root=fake_root, cache_dir=cache, seconds=0.1)[1] == 30


def test_missing_data_through_the_cli_is_one_line_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = main(["run", "experiment=av_image_kd_mm", f"data_root={tmp_path / 'empty'}", f"out_dir={tmp_path / 'runs'}",
                 f"data.args.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1", "trainer.tensorboard=false"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("mmkd: error: avdigits: missing ")
    assert str(tmp_path / "empty" / "mnist" / MNIST_FILES[0]) in last
