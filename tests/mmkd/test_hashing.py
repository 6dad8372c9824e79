"""Content hashes that name caches on users' disks: the data set fingerprint, the teacher hash and the
graph data set fingerprints are pinned to the digests they had before :func:`mmkd.data.hash_tensors`
replaced their three copies of the hashing loop; a change here orphans every existing cache entry."""
import torch
from torch import nn

from mmkd import Teacher, TensorDictDataset
from mmkd.cache import teacher_hash
from mmkd.graphs import FullGraph, NeighborGraph

X = torch.arange(24, dtype=torch.float32).reshape(6, 4) / 7
Y = torch.tensor([0, 1, 2, 0, 1, 2])
RING = torch.tensor([[0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 0]])


def test_dataset_fingerprint_is_unchanged():
    ds = TensorDictDataset("fixed", x=X, label=Y, mask=Y > 0, half=X.half())  # float, int64, bool, float16
    assert ds.fingerprint == "885b93bfa0d22e7c7d9ef617ad122ecfa159cc6d76c17ed3e90ceece4b9c5f06"


def test_teacher_hash_is_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))  # an int64 buffer too
    teacher = Teacher(model, keys=("x",), features=("2",))
    assert teacher_hash(teacher) == "8020a5b58bb0ec7f2e259f4e77d09269d34bc40139002432ac4ddb5fc8786f7e"


def test_graph_fingerprints_are_unchanged():
    full = FullGraph("ring", X, RING, Y, node=torch.arange(10, 16))
    assert full.fingerprint == "7b2d0301741a3104cb2550ae1974f7c81ea0aa73dbefe83e6c4360126a0edbbd"
    sampled = NeighborGraph("ring", X, RING, Y, torch.tensor([0, 2, 4]), [2, -1])
    assert sampled.fingerprint == "e17f87c1a235ad87cb94103243ab12fca3774d10e589cd246d028f946727c5f8"


def test_hash_tensors_feeds_name_dtype_shape_and_bytes_in_name_order():
    import hashlib

    from mmkd.data import hash_tensors

    h = hashlib.sha256()
    hash_tensors(h, {"b": torch.tensor([1, 2], dtype=torch.int16), "a": torch.tensor([True])})
    want = hashlib.sha256(b"a:torch.bool:(1,)\x01b:torch.int16:(2,)\x01\x00\x02\x00")  # little-endian int16
    assert h.hexdigest() == want.hexdigest()
