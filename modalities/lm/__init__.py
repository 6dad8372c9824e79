"""Language modelling (``mmkd.modalities.lm``): ``tokenizer`` (characters and byte-level BPE, saved as
one JSON file), ``corpus`` (next-token blocks, :class:`TokenBlocks`, and the ``tinyshakespeare`` and
``agnews_lm`` data sets) and ``models`` (``causal_lm``)."""
from mmkd.modalities.lm import models  # registration: causal_lm
from mmkd.modalities.lm.corpus import DOMAINS, TokenBlocks, pack, pad, stream
from mmkd.modalities.lm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

__all__ = ["models", "DOMAINS", "TokenBlocks", "pack", "pad", "stream", "BPETokenizer", "CharTokenizer", "Tokenizer"]
