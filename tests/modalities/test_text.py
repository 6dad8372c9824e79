"""Text inputs (mmkd.modalities.text): ids paired with their own mask by name, dynamic padding against
fixed padding on the same batches, and the frozen encoder's embedding cache against the live encoder.
Tiny random BERTs (vocabulary of 50, width 16) on a dozen short sequences."""
from __future__ import annotations

import copy

import pytest
import torch

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.build import build_model
from mmkd.cache import cache_teacher
from mmkd.config import ModelConfig
from mmkd.data import loader
from mmkd.modalities import text as tx
from mmkd.registry import MODELS
from mmkd.routers import ConstantRouter

TINY = {"vocab_size": 50, "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}
WIDTH = 12  # stored width (max_length)


def padded(lengths, width=WIDTH, seed=0, pad_id=0):
    """Right-padded ids in [1, 50) and 0/1 masks for sequences of ``lengths``; padding holds ``pad_id``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)), mask


def tiny(seed=0, in_shape=(WIDTH,), **kw):
    torch.manual_seed(seed)
    return MODELS["text_transformer"](num_classes=3, in_shape=in_shape, **{**TINY, **kw})


# ------------------------------------------------------------------ input names
def test_mask_pairs_and_text_keys_pair_by_prefix():
    keys = ["title_input_ids", "body_attention_mask", "title_attention_mask", "body_input_ids", "input_ids", "label"]
    assert tx.mask_pairs(keys) == {"title_input_ids": "title_attention_mask", "body_input_ids": "body_attention_mask"}
    assert tx.text_keys(["title_input_ids", "title_attention_mask"]) == ("title_input_ids", "title_attention_mask")
    assert tx.text_keys(["c_input_ids"]) == ("c_input_ids", None)
    assert tx.text_keys(["ids", "mask"]) == ("ids", "mask")  # other names: ids first, as before
    with pytest.raises(ValueError, match=r"do not pair .*give \['a_input_ids', 'a_attention_mask'\]"):
        tx.text_keys(["a_input_ids", "b_attention_mask"])
    with pytest.raises(ValueError, match=r"do not pair .*give \['a_input_ids', 'a_attention_mask'\]"):
        tx.text_keys(["a_attention_mask", "a_input_ids"])
    with pytest.raises(ValueError, match="reads one text"):
        tx.text_keys(["a_input_ids", "a_attention_mask", "b_input_ids"])


def test_an_encoder_reads_a_named_text_column_with_its_own_mask():
    """``inputs: [c_input_ids, c_attention_mask]`` builds (it was ``KeyError: 'input_ids'``) and the
    model uses the mask: changing padded ids changes nothing; without the mask they count."""
    meta = {"num_classes": 3, "shapes": {"c_input_ids": [WIDTH], "c_attention_mask": [WIDTH], "label": []}}
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="text_transformer", inputs=["c_input_ids", "c_attention_mask"],
                                    args=TINY), meta, "student").eval()
    ids, mask = padded([3, 7, 12])
    other = torch.where(mask.bool(), ids, torch.full_like(ids, 7))  # padding positions hold another id
    with torch.no_grad():
        out = Net(model, ["c_input_ids", "c_attention_mask"])({"c_input_ids": ids, "c_attention_mask": mask}).logits
        torch.testing.assert_close(model(other, mask), out)
        assert not torch.allclose(model(other), out)  # no mask: id 7 is not padding, so it counts
    with pytest.raises(ValueError, match="do not pair"):
        tiny(in_shape={"c_input_ids": (WIDTH,), "d_attention_mask": (WIDTH,)})
    for name in ("text_transformer", "text_minilm"):  # the length check reads the named ids
        with pytest.raises(ValueError, match="600 tokens exceed"):
            MODELS[name](num_classes=2, in_shape={"c_input_ids": (600,), "c_attention_mask": (600,)}, **(
                TINY if name == "text_transformer" else {}))


# ------------------------------------------------------------------ dynamic padding
def test_trim_padding_by_hand():
    batch = {"a_input_ids": torch.tensor([[5, 6, 0, 0, 0], [5, 0, 0, 0, 0]]),
             "a_attention_mask": torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]),
             "b_input_ids": torch.tensor([[5, 6, 7, 8, 0], [0, 0, 0, 9, 0]]),
             "b_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 1, 0]]),  # a real token at 3: kept
             "image": torch.zeros(2, 5), "index": torch.tensor([4, 2])}
    out = tx.trim_padding(batch)
    assert out["a_input_ids"].tolist() == [[5, 6], [5, 0]] and out["a_attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert out["b_input_ids"].tolist() == [[5, 6, 7, 8], [0, 0, 0, 9]] and out["b_attention_mask"].shape == (2, 4)
    assert out["image"].shape == (2, 5) and out["index"].tolist() == [4, 2]
    empty = tx.trim_padding({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5)})
    assert empty["input_ids"].shape == (2, 1)  # never zero-width


def datasets(lengths, seed=0):
    ids, mask = padded(lengths, seed=seed)
    labels = torch.arange(len(lengths)) % 3
    fixed = TensorDictDataset("pad", input_ids=ids, attention_mask=mask, label=labels)
    dynamic = tx.TextDataset("pad", input_ids=ids, attention_mask=mask, label=labels)
    return fixed, dynamic


def test_dynamic_padding_gives_the_losses_of_fixed_padding_on_the_same_batch():
    """CE + KD of a student on a teacher (both masked, mean-pooled BERTs, dropout 0 so training mode is
    deterministic), on the same items padded to 12 and to their longest (5): equal up to rounding."""
    fixed, dynamic = datasets([2, 5, 3, 4, 1, 5])
    keys = ["input_ids", "attention_mask"]
    student, teacher = tiny(0, dropout=0.0), tiny(1, dropout=0.0)
    distiller = Distiller(Net(student, keys), [Teacher(teacher, keys)], [Term("ce"), Term("kd", 0.5)],
                          ConstantRouter())
    idx = [5, 0, 2, 3]
    a, b = fixed.__getitems__(idx), dynamic.__getitems__(idx)
    assert a["input_ids"].shape == (4, WIDTH) and b["input_ids"].shape == (4, 5)
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["label"], b["label"])
    for mode in (True, False):
        distiller.train(mode)
        la, lb = distiller(a), distiller(b)
        assert set(la) == set(lb) == {"loss", "ce", "kd"}
        for k in la:
            torch.testing.assert_close(la[k], lb[k], atol=1e-5, rtol=1e-5)
    # whole evaluations (loader batches of the trainer) agree too, with the default dropout in eval mode
    trainer = Trainer(run_dir="unused", device="cpu", progress="off", tensorboard=False)
    module = Distiller(Net(tiny(0), keys), [], [Term("ce")])
    ra, rb = trainer.evaluate(module, fixed), trainer.evaluate(module, dynamic)
    assert ra["acc"] == rb["acc"] and abs(ra["loss"] - rb["loss"]) < 1e-5


def test_text_datasets_batch_narrow_and_cache_teachers(tmp_path):
    fixed, dynamic = datasets([2, 5, 3, 4, 1, 5, 2, 2])
    widths = [b["input_ids"].shape[1] for b in loader(dynamic, 3)]
    assert widths == [5, 5, 2]  # rows 0-2, 3-5, 6-7: each batch as wide as its longest sequence
    assert dynamic[0]["input_ids"].shape == (WIDTH,)  # single items keep the stored width
    assert tx.TextDataset("pad", dynamic_padding=False, **fixed.tensors).fingerprint == fixed.fingerprint
    assert dynamic.fingerprint != fixed.fingerprint  # the two paddings are two cache entries
    assert isinstance(tx.text_dataset("x", False, **fixed.tensors), TensorDictDataset)
    assert not isinstance(tx.text_dataset("x", False, **fixed.tensors), tx.TextDataset)
    teacher = Teacher(tiny(1), ["input_ids", "attention_mask"], ["pool"])
    a, b = cache_teacher(teacher, fixed, tmp_path, batch_size=3), cache_teacher(teacher, dynamic, tmp_path, batch_size=3)
    assert a.path != b.path
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.features["pool"], b.features["pool"], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the frozen encoder's embedding cache
def encoder(seed=0):
    return copy.deepcopy(tiny(seed).encoder)


def probe_pair(seed=0):
    """The same frozen encoder and head twice: cached (FrozenTextClassifier) and live (TextClassifier)."""
    enc = encoder(seed)
    cached = tx.FrozenTextClassifier(copy.deepcopy(enc), 3, dropout=0.2)
    live = tx.TextClassifier(copy.deepcopy(enc), 3, dropout=0.2, freeze=True)
    live.head.load_state_dict(cached.head.state_dict())
    return cached, live


def count_rows(model):
    """Wrap the encoder's forward (not a hook: hooks make the probe run live) to count the rows it sees."""
    seen = []
    forward = model.encoder.forward
    model.encoder.forward = lambda *a, **k: seen.append(len(k["input_ids"])) or forward(*a, **k)
    return seen


def test_a_frozen_probe_trains_as_the_live_one_and_embeds_each_sentence_once(tmp_path):
    lengths = [2, 5, 3, 12, 1, 5, 7, 4, 9, 6]
    ids, mask = padded(lengths)
    ids[7], mask[7] = ids[1], mask[1]  # a repeated sentence: one entry
    labels = torch.arange(len(lengths)) % 3
    train = tx.TextDataset("probe", input_ids=ids, attention_mask=mask, label=labels)
    val = TensorDictDataset("probe-val", input_ids=ids[:4], attention_mask=mask[:4], label=labels[:4])  # fixed width
    keys = ["input_ids", "attention_mask"]
    results = {}
    for name, model in zip(("cached", "live"), probe_pair()):
        seen = count_rows(model)
        trainer = Trainer(run_dir=tmp_path / name, max_epochs=3, batch_size=4, lr=1e-2, device="cpu",
                          progress="off", tensorboard=False, seed=0)
        result = trainer.fit(Distiller(Net(model, keys), [], [Term("ce")]), train, val)
        results[name] = (result.history, model.head.weight.detach().clone(), sum(seen))
    (h_c, w_c, rows_c), (h_l, w_l, rows_l) = results["cached"], results["live"]
    for a, b in zip(h_c, h_l):  # same losses and metrics every epoch (dropout draws the same)
        for k in ("train/loss", "val/loss", "val/acc"):
            assert abs(a[k] - b[k]) < 1e-5, (k, a[k], b[k])
    torch.testing.assert_close(w_c, w_l, atol=1e-5, rtol=1e-5)
    assert rows_l == 3 * (10 + 4)  # live: every training and validation row, every epoch
    assert rows_c == 9  # cached: the 9 distinct sentences, once (validation rows are among them)


def test_the_embeddings_stay_on_disk_for_the_next_fit_of_the_same_encoder(tmp_path, caplog):
    """With a cache_dir the second fit of the same frozen encoder embeds nothing and trains alike; other
    weights get their own file, and a damaged file is rebuilt with a warning."""
    ids, mask = padded([2, 5, 3, 12, 1, 5, 7, 4])
    labels = torch.arange(8) % 3
    train = tx.TextDataset("probe", input_ids=ids, attention_mask=mask, label=labels)
    store = tmp_path / "cache" / "embeddings"

    def fit(name, seed=0):
        model = probe_pair(seed)[0]
        seen = count_rows(model)
        trainer = Trainer(run_dir=tmp_path / name, cache_dir=tmp_path / "cache", max_epochs=2, batch_size=4,
                          lr=1e-2, device="cpu", progress="off", tensorboard=False, seed=0)
        history = trainer.fit(Distiller(Net(model, ["input_ids", "attention_mask"]), [], [Term("ce")]), train,
                              train).history
        return history, sum(seen)

    with caplog.at_level("INFO", logger="mmkd"):
        (first, rows_1), (second, rows_2) = fit("a"), fit("b")
    assert (rows_1, rows_2) == (8, 0)
    assert [h["train/loss"] for h in first] == [h["train/loss"] for h in second]  # the same floats, exactly
    files = sorted(store.glob("*.pt"))
    assert len(files) == 1 and f"feature cache hit: 8 stored embeddings from {files[0]}" in caplog.text
    assert fit("c", seed=1)[1] == 8 and len(list(store.glob("*.pt"))) == 2  # other weights: another entry
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    caplog.clear()
    with caplog.at_level("WARNING", logger="mmkd"):
        assert fit("d")[1] == 8
    assert f"{files[0]}: damaged cache file (100 bytes" in caplog.text, caplog.text
    assert fit("e")[1] == 0  # and the rebuilt entry serves the next fit


def test_the_embedding_cache_is_reused_and_invalidated_when_the_weights_change():
    cached, live = probe_pair()
    cached.eval(), live.eval()
    ids, mask = padded([3, 5, 2, 6])
    with torch.no_grad():
        before = live(ids, mask)
        torch.testing.assert_close(cached(ids, mask), before)  # outside a fit: live, nothing stored
        assert len(cached.cache) == 0 and cached.cache.misses == 0
        cached.on_fit_start(Trainer(device="cpu"), None)  # no cache_dir: in memory only
        seen = count_rows(cached)
        torch.testing.assert_close(cached(ids, mask), before, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cached(ids[[2, 0]], mask[[2, 0]]), before[[2, 0]], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cached(ids[:, :6], mask[:, :6]), before, atol=1e-6, rtol=1e-6)  # narrower padding
        assert seen == [4] and (cached.cache.misses, cached.cache.hits) == (4, 6) and len(cached.cache) == 4
        # new weights by load_state_dict: recomputed, and equal to the live model with those weights
        state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in cached.encoder.state_dict().items()}
        cached.encoder.load_state_dict(state)
        live.encoder.load_state_dict(state)
        after = live(ids, mask)
        assert not torch.allclose(after, before, atol=1e-3)
        torch.testing.assert_close(cached(ids, mask), after, atol=1e-6, rtol=1e-6)
        assert seen == [4, 4]
        # an in-place change of one weight is noticed too
        cached.encoder.embeddings.word_embeddings.weight.add_(0.1)
        live.encoder.embeddings.word_embeddings.weight.add_(0.1)
        torch.testing.assert_close(cached(ids, mask), live(ids, mask), atol=1e-6, rtol=1e-6)
        assert seen == [4, 4, 4]
        # a feature hook on the pooling needs the live forward: it runs, and the feature is there
        out = Net(cached, ["input_ids", "attention_mask"], ["pool"])({"input_ids": ids, "attention_mask": mask})
        assert out.features["pool"].shape == (4, 16) and seen == [4, 4, 4, 4]
        cached.teardown(None)
        assert len(cached.cache) == 0 and not cached.caching


def test_text_minilm_freeze_caches_unless_told_not_to():
    shape = {"input_ids": (8,), "attention_mask": (8,)}
    probe = MODELS["text_minilm"](num_classes=2, in_shape=shape, freeze=True)
    assert isinstance(probe, tx.FrozenTextClassifier) and not any(p.requires_grad for p in probe.encoder.parameters())
    live = MODELS["text_minilm"](num_classes=2, in_shape=shape, freeze=True, cache_features=False)
    assert type(live) is tx.TextClassifier and live.freeze
    assert type(MODELS["text_minilm"](num_classes=2, in_shape=shape)) is tx.TextClassifier


def test_a_frozen_probe_resumes_like_an_uninterrupted_fit(tmp_path):
    """The probe is a callback of its fit (its state is the model's): a fit stopped in its second epoch
    and resumed ends where an uninterrupted one does."""
    from mmkd.callbacks import Callback

    class Stop(Exception):
        pass

    class StopAtEpoch2(Callback):
        def on_epoch_start(self, trainer, module):
            if trainer.epoch == 1:
                raise Stop

    ids, mask = padded([2, 5, 3, 12, 1, 5])
    data = tx.TextDataset("resume", input_ids=ids, attention_mask=mask, label=torch.arange(6) % 3)

    def fit(name, resume=False, callbacks=()):
        trainer = Trainer(run_dir=tmp_path / name, resume=resume, max_epochs=3, batch_size=4, lr=1e-2,
                          device="cpu", progress="off", tensorboard=False, seed=0)
        module = Distiller(Net(probe_pair()[0], ["input_ids", "attention_mask"]), [], [Term("ce")])
        return trainer.fit(module, data, data, callbacks), module

    whole, _ = fit("whole")
    with pytest.raises(Stop):
        fit("resumed", callbacks=[StopAtEpoch2()])
    resumed, module = fit("resumed", resume=True)
    assert [h["train/loss"] for h in resumed.history] == pytest.approx([h["train/loss"] for h in whole.history],
                                                                       abs=1e-6)
    assert len(whole.history) == 3 and isinstance(module.student.model, tx.FrozenTextClassifier)
