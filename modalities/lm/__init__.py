"""Language modelling (``mmkd.modalities.lm``): ``tokenizer`` (characters and byte-level BPE, saved as
one JSON file), ``corpus`` (next-token blocks, :class:`TokenBlocks`, and the ``tinyshakespeare`` and
``agnews_lm`` data sets) ``models`` (``causal_lm``), ``on_policy`` (GKD's student-generated data, MGSR's correction) and
``ddk`` (DDK's domain re-weighting policy) and ``miniplm`` (MiniPLM's difference sampling policy)."""
from mmkd.modalities.lm import ddk, miniplm, models, on_policy  # registration: causal_lm, the policies, on_policy
from mmkd.modalities.lm.corpus import DOMAINS, TokenBlocks, pack, pad, stream
from mmkd.modalities.lm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

__all__ = ["ddk", "miniplm", "models", "on_policy", "DOMAINS", "TokenBlocks", "pack", "pad", "stream", "BPETokenizer", "CharTokenizer", "Tokenizer"]
