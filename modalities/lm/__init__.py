"""Language modelling (``mmkd.modalities.lm``): ``tokenizer`` (characters and byte-level BPE, saved as
one JSON file), ``corpus`` (next-token blocks, :class:`TokenBlocks`, and the ``tinyshakespeare`` and
``agnews_lm`` data sets), ``models`` (``causal_lm``), ``on_policy`` (GKD's student-generated data, MGSR's correction),
``ddk`` (DDK's domain re-weighting policy), ``miniplm`` (MiniPLM's difference sampling policy) and
``sampled`` (a model's samples as training data, offline or online, and the ``golden`` metric of the
teacher-hacking study)."""
from mmkd.modalities.lm import ddk, miniplm, models, on_policy, sampled  # registration: causal_lm, policies, transforms
from mmkd.modalities.lm.corpus import DOMAINS, TokenBlocks, pack, pad, stream
from mmkd.modalities.lm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

__all__ = ["ddk", "miniplm", "sampled", "models", "on_policy", "DOMAINS", "TokenBlocks", "pack", "pad", "stream", "BPETokenizer", "CharTokenizer", "Tokenizer"]
